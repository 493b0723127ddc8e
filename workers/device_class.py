"""A worker's device class, as its HELLO announces it: the kind of device, its name, the torch
build and, on a CPU, a fingerprint of what a few kernels compute here.

Workers of one class are taken to give the same bits for the same task, so the broker verifies
their results by comparing digests (``broker.verify``); a worker of another class is never
compared bitwise with them. Two CPUs of one torch build can still differ (vector units,
thread splits), which is why a CPU's class includes the digest of a few seeded operations the
plans and the synthetic and diffusers models run, rather than the CPU's name alone.
"""

from __future__ import annotations

import functools
import hashlib
import platform

import torch

MAX_CLASS_CHARS = 255  # the broker refuses longer HELLO fields


def device_class(device: str) -> str:
    """``type:name|torch version|fingerprint`` for ``device`` (e.g. ``cuda:NVIDIA H100 80GB
    HBM3|2.5.1+cu124|sm90``, ``cpu:x86_64|2.5.1+cpu|3f2a...``)."""
    kind = torch.device(device).type
    if kind == "cuda":
        index = torch.device(device).index or 0
        name = torch.cuda.get_device_name(index)
        major, minor = torch.cuda.get_device_capability(index)
        tail = f"sm{major}{minor}|cuda {torch.version.cuda}"
    else:
        name = platform.machine() or "unknown"
        tail = cpu_fingerprint()
    return f"{kind}:{name}|{torch.__version__}|{tail}"[:MAX_CLASS_CHARS]


@functools.cache
def cpu_fingerprint() -> str:
    """A 16-hex digest of a few seeded float32 and float64 operations (a matrix product, the
    transcendental functions the fields use, a reduction) as this machine's CPU kernels compute
    them: two CPUs with the same digest are taken to give the same bits."""
    generator = torch.Generator().manual_seed(0)
    digest = hashlib.blake2b(digest_size=8)
    for dtype in (torch.float32, torch.float64):
        a = torch.randn(67, 131, generator=generator, dtype=dtype)
        b = torch.randn(131, 61, generator=generator, dtype=dtype)
        outputs = (
            a @ b,
            torch.tanh(a),
            torch.exp(a),
            torch.sin(a) * torch.cos(a),
            a.sum(dim=1),
            torch.nn.functional.softmax(a, dim=1),
        )
        for out in outputs:
            digest.update(out.contiguous().numpy().tobytes())
    return digest.hexdigest()
