"""Kernel fingerprint: which bits this machine's torch CPU kernels give, in a few dozen digests.

The golden hits (``tests/golden_hits.py``) are bit-exact, and the bits of torch's CPU kernels
depend on more than ``torch.backends.cpu.get_cpu_capability()``: two machines that both report
AVX512 round GEMM, tanh or attention differently when one also has AMX or AVX512-FP16, and
oneDNN picks its kernels by the exact ISA. So the golden hits are keyed by what the kernels
actually do: ``kernel_fingerprint()`` runs the operations the golden cases use (seeded
``randn``, ``rand``, ``normal_`` and ``uniform_``, whose vectorised kernels differ from the
scalar ones: every case's starting noise and the tiny pipelines' weights come from them;
elementwise sin, cos, tanh, exp, sigmoid, SiLU, GELU; sums and norms; GEMM as matmul, addmm,
linear and bmm; conv2d, conv3d; softmax, layer_norm, group_norm; scaled_dot_product_attention)
in float32, bfloat16 and (the cheap ones) float64 on fixed inputs, at one torch thread as the
test suite runs, and returns ``{"op/dtype": sha256 of the output's bytes}``. Two machines with
the same fingerprint are taken to give the same golden hits; ``fingerprint_id`` names a
fingerprint and ``differing_ops`` says which ops set two apart.

The random ops draw from ``torch.Generator`` seeded with fixed integers; every other input is
built from integer arithmetic only (an integer hash of ``arange``, divided by a power of two),
so it is the same bits on every machine whatever its kernels. The sizes are odd (4099
elements, GEMM 67x129 @ 129x71) so that vectorised bodies and their scalar tails both run, and
one GEMM is large enough (256x512 @ 512x256) for the blocked paths.

``python -m tests.kernel_fingerprint`` prints this machine's fingerprint id and how it stands
against the machines recorded in ``tests/data/golden_hits.json``.

Changing the ops or their inputs changes every fingerprint: the machines recorded in the golden
file must then be recorded again (``tests/test_kernel_fingerprint.py`` checks that the recorded
fingerprints have the ops of this module).
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

# The CPU flags recorded with a machine (those that change which kernel torch or oneDNN runs).
RELEVANT_CPU_FLAGS = (
    "sse4_2",
    "avx",
    "f16c",
    "fma",
    "avx2",
    "avx_vnni",
    "avx512f",
    "avx512dq",
    "avx512cd",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "amx_fp16",
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def values(shape: tuple[int, ...], dtype: torch.dtype, salt: int, scale: int = 1) -> torch.Tensor:
    """Fixed values in [-4, 4) / scale from integer arithmetic: the same bits on every machine.

    A quadratic integer hash of the element index modulo a 16-bit prime, divided by a power of
    two: every value is exact in float32 and float64 (bfloat16 rounds it to nearest even, in
    one conversion).
    """
    n = math.prod(shape)
    i = torch.arange(n, dtype=torch.int64)
    h = (i * (i * 40503 + 2654435761) + salt * 7919 + 12345) % 65521
    x = (h.to(torch.float64) - 32760.0) / (8192.0 * scale)
    return x.reshape(shape).to(dtype)


Op = Callable[[torch.dtype, int], torch.Tensor]
N = 4099  # elementwise ops: odd, so the vectorised body and the scalar tail both run


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> Op:
    return lambda dtype, salt: fn(values((N,), dtype, salt))


def _gemm(m: int, k: int, n: int) -> Op:
    return lambda dtype, salt: values((m, k), dtype, salt, 4) @ values((k, n), dtype, salt + 1, 4)


def _linear(dtype: torch.dtype, salt: int) -> torch.Tensor:
    x = values((33, 200), dtype, salt, 4)
    return F.linear(x, values((150, 200), dtype, salt + 1, 4), values((150,), dtype, salt + 2))


def _addmm(dtype: torch.dtype, salt: int) -> torch.Tensor:
    bias = values((71,), dtype, salt + 2)
    return torch.addmm(bias, values((67, 129), dtype, salt, 4), values((129, 71), dtype, salt + 1))


def _bmm(dtype: torch.dtype, salt: int) -> torch.Tensor:
    return torch.bmm(values((4, 77, 64), dtype, salt, 4), values((4, 64, 93), dtype, salt + 1, 4))


def _conv2d(dtype: torch.dtype, salt: int) -> torch.Tensor:
    x = values((2, 8, 17, 19), dtype, salt)
    w = values((16, 8, 3, 3), dtype, salt + 1, 8)
    return F.conv2d(x, w, values((16,), dtype, salt + 2), padding=1)


def _conv2d_patch(dtype: torch.dtype, salt: int) -> torch.Tensor:
    x = values((1, 16, 18, 22), dtype, salt)
    w = values((24, 16, 2, 2), dtype, salt + 1, 8)
    return F.conv2d(x, w, values((24,), dtype, salt + 2), stride=2)


def _conv3d(dtype: torch.dtype, salt: int) -> torch.Tensor:
    x = values((1, 4, 3, 10, 14), dtype, salt)
    w = values((12, 4, 1, 2, 2), dtype, salt + 1, 8)
    return F.conv3d(x, w, values((12,), dtype, salt + 2), stride=(1, 2, 2))


def _softmax(dtype: torch.dtype, salt: int) -> torch.Tensor:
    return torch.softmax(values((64, 257), dtype, salt), dim=-1)


def _layer_norm(dtype: torch.dtype, salt: int) -> torch.Tensor:
    x = values((64, 320), dtype, salt)
    w, b = values((320,), dtype, salt + 1), values((320,), dtype, salt + 2)
    return F.layer_norm(x, (320,), w, b, eps=1e-5)


def _group_norm(dtype: torch.dtype, salt: int) -> torch.Tensor:
    x = values((2, 32, 9, 11), dtype, salt)
    w, b = values((32,), dtype, salt + 1), values((32,), dtype, salt + 2)
    return F.group_norm(x, 8, w, b, eps=1e-6)


def _sdpa(dtype: torch.dtype, salt: int) -> torch.Tensor:
    q = values((1, 4, 77, 64), dtype, salt, 4)
    k = values((1, 4, 93, 64), dtype, salt + 1, 4)
    v = values((1, 4, 93, 64), dtype, salt + 2)
    return F.scaled_dot_product_attention(q, k, v)


def _generator(salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(salt)


def _randn(dtype: torch.dtype, salt: int) -> torch.Tensor:
    return torch.randn((N,), generator=_generator(salt), dtype=dtype)


def _rand(dtype: torch.dtype, salt: int) -> torch.Tensor:
    return torch.rand((N,), generator=_generator(salt), dtype=dtype)


def _normal_(dtype: torch.dtype, salt: int) -> torch.Tensor:
    return torch.empty((3, N), dtype=dtype).normal_(0.5, 2.0, generator=_generator(salt))


def _uniform_(dtype: torch.dtype, salt: int) -> torch.Tensor:
    return torch.empty((3, N), dtype=dtype).uniform_(-0.3, 0.7, generator=_generator(salt))


def _sum(dtype: torch.dtype, salt: int) -> torch.Tensor:
    x = values((N,), dtype, salt)
    return torch.stack([x.sum(), x.mean(), torch.linalg.vector_norm(x)])


# (op name, computation, dtypes it runs in): the fingerprint's keys are "name/dtype".
OPS: list[tuple[str, Op, tuple[str, ...]]] = [
    # seeded noise (every case's x0) and weight init (the tiny pipelines' weights)
    ("randn", _randn, ("float32", "bfloat16", "float64")),
    ("rand", _rand, ("float32", "bfloat16", "float64")),
    ("normal_", _normal_, ("float32", "float64")),
    ("uniform_", _uniform_, ("float32", "float64")),
    ("sin", _unary(torch.sin), ("float32", "bfloat16", "float64")),
    ("cos", _unary(torch.cos), ("float32", "bfloat16", "float64")),
    ("tanh", _unary(torch.tanh), ("float32", "bfloat16", "float64")),
    ("exp", _unary(torch.exp), ("float32", "bfloat16", "float64")),
    ("sigmoid", _unary(torch.sigmoid), ("float32", "bfloat16", "float64")),
    ("silu", _unary(F.silu), ("float32", "bfloat16", "float64")),
    ("gelu", _unary(F.gelu), ("float32", "bfloat16", "float64")),
    ("gelu-tanh", _unary(lambda x: F.gelu(x, approximate="tanh")), ("float32", "bfloat16")),
    ("sum-mean-norm", _sum, ("float32", "bfloat16", "float64")),
    ("matmul-67x129x71", _gemm(67, 129, 71), ("float32", "bfloat16", "float64")),
    ("matmul-256x512x256", _gemm(256, 512, 256), ("float32", "bfloat16")),
    ("addmm", _addmm, ("float32", "bfloat16", "float64")),
    ("linear", _linear, ("float32", "bfloat16")),
    ("bmm", _bmm, ("float32", "bfloat16")),
    ("conv2d-3x3", _conv2d, ("float32", "bfloat16")),
    ("conv2d-patch", _conv2d_patch, ("float32", "bfloat16")),
    ("conv3d-patch", _conv3d, ("float32", "bfloat16")),
    ("softmax", _softmax, ("float32", "bfloat16")),
    ("layer_norm", _layer_norm, ("float32", "bfloat16")),
    ("group_norm", _group_norm, ("float32", "bfloat16")),
    ("sdpa", _sdpa, ("float32", "bfloat16")),
]


def digest(tensor: torch.Tensor) -> str:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()


@contextmanager
def one_thread() -> Iterator[None]:
    """One torch thread, as ``tests/conftest.py`` runs the suite; the previous count after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def kernel_fingerprint(seed: int = 0) -> dict[str, str]:
    """``{"op/dtype": sha256}`` of every op in ``OPS`` at one torch thread.

    ``seed`` moves every input (the golden files use seed 0; another seed is for tests that the
    fingerprint can tell inputs apart).
    """
    fingerprint = {}
    with one_thread():
        for index, (name, op, dtypes) in enumerate(OPS):
            for dtype in dtypes:
                salt = seed * 1000 + index * 10
                fingerprint[f"{name}/{dtype}"] = digest(op(DTYPES[dtype], salt))
    return fingerprint


def fingerprint_id(fingerprint: dict[str, str]) -> str:
    """A short name for a fingerprint: 16 hex digits of the SHA-256 of its sorted JSON."""
    text = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def differing_ops(a: dict[str, str], b: dict[str, str]) -> list[str]:
    """The ops whose digests differ between two fingerprints (or that only one of them has)."""
    return sorted(op for op in a.keys() | b.keys() if a.get(op) != b.get(op))


def nearest(
    fingerprint: dict[str, str], recorded: dict[str, dict[str, str]]
) -> tuple[str, list[str]] | None:
    """The recorded fingerprint (by id) with the fewest ops differing, and those ops."""
    if not recorded:
        return None
    best = min(recorded, key=lambda key: (len(differing_ops(fingerprint, recorded[key])), key))
    return best, differing_ops(fingerprint, recorded[best])


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU flags among ``RELEVANT_CPU_FLAGS`` that /proc/cpuinfo lists (empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.partition(":")[2].split())
                return [flag for flag in RELEVANT_CPU_FLAGS if flag in present]
    except OSError:
        pass
    return []


def main() -> None:
    from tests.golden_hits import GOLDEN, RECORD_COMMAND, select_machine

    fingerprint = kernel_fingerprint()
    print(f"kernel fingerprint {fingerprint_id(fingerprint)} ({len(fingerprint)} ops)")
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {cpu_model()}")
    print(f"cpu flags: {' '.join(cpu_flags()) or '(none read)'}")
    entry, reason = select_machine(json.loads(GOLDEN.read_text()), fingerprint)
    print(reason)
    if entry is None:
        print(f"record it with: {RECORD_COMMAND}")


if __name__ == "__main__":
    main()
