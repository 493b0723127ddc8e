"""Golden hits: the bits every plan produced on CPU before the engine-core redesign.

``python -m tests.golden_hits`` runs a fixed set of requests in-process (the adapter's own
velocity, one torch thread, as the test suite runs) and writes ``tests/data/golden_hits.json``:
for every hit its core, round, dtype, shape and the SHA-256 of its bytes. The file committed
was written by landed ``main`` before solver steps moved to the workers
(``recorded_at`` in the file); ``tests/test_golden_hits.py`` recomputes every case with the
current code and requires the same hits, bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from chords_mq.local import run_tasks
from chords_mq.request import RequestSpec

GOLDEN = Path(__file__).resolve().parent / "data" / "golden_hits.json"

SYNTHETIC_F32 = {"shape": [4, 16, 16], "dtype": "float32"}
SYNTHETIC_BF16 = {"shape": [2, 8, 8], "dtype": "bfloat16"}
SYNTHETIC_F64 = {"shape": [64], "dtype": "float64"}
PROMPT = "a photo of a cat"

# (case name, model, request fields). Pipeline models name a tiny_pipelines family.
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("seq-f32", "synthetic", {"method": "sequential", "steps": 20, "params": SYNTHETIC_F32}),
    ("chords-k4-f32", "synthetic", {"cores": 4, "steps": 50, "params": SYNTHETIC_F32}),
    ("chords-k8-f32", "synthetic", {"cores": 8, "steps": 50, "params": SYNTHETIC_F32, "seed": 3}),
    ("chords-k6-n25-f32", "synthetic", {"cores": 6, "steps": 25, "params": SYNTHETIC_F32}),
    (
        "chords-gaps1-f32",
        "synthetic",
        {"init_sequence": [0, 1, 2, 3], "steps": 10, "params": SYNTHETIC_F32},
    ),
    (
        "chords-k8-stop-f64",
        "synthetic",
        {"cores": 8, "steps": 50, "stop": "residual:1e-3", "params": SYNTHETIC_F64},
    ),
    ("chords-k4-bf16", "synthetic", {"cores": 4, "steps": 20, "params": SYNTHETIC_BF16}),
    (
        "srds-k4-f32",
        "synthetic",
        {"method": "srds", "cores": 4, "steps": 49, "params": SYNTHETIC_F32},
    ),
    (
        "parareal-k4-f32",
        "synthetic",
        {"method": "srds-parareal", "cores": 4, "steps": 50, "params": SYNTHETIC_F32},
    ),
    (
        "parareal-k3-bf16",
        "synthetic",
        {"method": "srds-parareal", "cores": 3, "steps": 16, "params": SYNTHETIC_BF16},
    ),
    (
        "paradigms-k4-f32",
        "synthetic",
        {"method": "paradigms", "cores": 4, "steps": 50, "params": SYNTHETIC_F32},
    ),
    (
        "paradigms-k8-tol0-f32",
        "synthetic",
        {"method": "paradigms", "cores": 8, "steps": 30, "tolerance": 0.0, "params": SYNTHETIC_F32},
    ),
    (
        "paradigms-k4-bf16",
        "synthetic",
        {"method": "paradigms", "cores": 4, "steps": 20, "params": SYNTHETIC_BF16},
    ),
    ("digits-chords-k4", "digits", {"cores": 4, "steps": 50, "params": {"prompt": "7"}}),
    (
        "digits-paradigms-k4",
        "digits",
        {"method": "paradigms", "cores": 4, "steps": 50, "params": {"prompt": "3"}},
    ),
    ("sd-chords-k4", "stable-diffusion", {"cores": 4, "steps": 12, "seed": 3}),
    (
        "sd-paradigms-k4",
        "stable-diffusion",
        {"method": "paradigms", "cores": 4, "steps": 12, "seed": 3},
    ),
    ("sd-bf16-chords-k4", "stable-diffusion:bfloat16", {"cores": 4, "steps": 12, "seed": 3}),
    ("flux-chords-k4", "flux", {"cores": 4, "steps": 12, "seed": 3}),
    ("flux-parareal-k3", "flux", {"method": "srds-parareal", "cores": 3, "steps": 9, "seed": 3}),
    ("cogvideox-chords-k4", "cogvideox", {"cores": 4, "steps": 12, "seed": 3}),
    ("wan-bf16-chords-k4", "wan:bfloat16", {"cores": 4, "steps": 12, "seed": 3}),
]


def digest(tensor: torch.Tensor) -> str:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()


def describe(hits: list[Any]) -> list[dict[str, Any]]:
    return [
        {
            "core": h.core,
            "round": h.round,
            "dtype": str(h.latent.dtype).removeprefix("torch."),
            "shape": list(h.latent.shape),
            "sha256": digest(h.latent),
        }
        for h in hits
    ]


def family_call_kwargs(family: str) -> dict[str, Any]:
    from tests import tiny_pipelines as tiny

    return {
        "flux": tiny.FLUX_CALL_KWARGS,
        "stable-diffusion": tiny.SD_CALL_KWARGS,
        "cogvideox": tiny.COGVIDEOX_CALL_KWARGS,
        "wan": tiny.WAN_CALL_KWARGS,
    }[family]


def load_model(model: str, folders: dict[str, Path]) -> Any:
    """The adapter for a case's model name (pipelines are saved once per family)."""
    from tests import tiny_pipelines as tiny
    from workers.models import load_adapter

    if model in ("synthetic", "digits"):
        return load_adapter(model, "cpu")
    family, _, dtype = model.partition(":")
    builders: dict[str, Callable[[], Any]] = {
        "flux": tiny.build_tiny_flux,
        "stable-diffusion": tiny.build_tiny_sd,
        "cogvideox": tiny.build_tiny_cogvideox,
        "wan": tiny.build_tiny_wan,
    }
    if family not in folders:
        folders[family] = tiny.save_tiny(builders[family](), folders["root"] / family)
    return load_adapter(str(folders[family]), "cpu", dtype=getattr(torch, dtype) if dtype else None)


def spec_for(model: str, fields: dict[str, Any]) -> RequestSpec:
    fields = dict(fields)
    family = model.partition(":")[0]
    if family not in ("synthetic", "digits"):
        fields["params"] = {"prompt": PROMPT, **family_call_kwargs(family)}
    return RequestSpec(model=family, **fields)


def run_case(adapter: Any, spec: RequestSpec) -> list[Any]:
    """The case's hits in-process, each task evaluated as a worker evaluates it.

    (Landed main, which recorded the file, ran ``simulate(plan, velocity)`` with the solver in
    the plan; the tasks now carry targets and the solver runs next to the model.)
    """
    from workers.models.base import in_process

    prepared = adapter.prepare(spec)
    plan = spec.build_plan(prepared.x0, prepared.solver)
    return list(run_tasks(plan, in_process(adapter, prepared)).hits)


def main() -> None:
    import tempfile

    torch.set_num_threads(1)  # as tests/conftest.py runs the suite
    with tempfile.TemporaryDirectory() as root:
        folders: dict[str, Path] = {"root": Path(root)}
        cases = {}
        for name, model, fields in CASES:
            spec = spec_for(model, fields)
            hits = run_case(load_model(model, folders), spec)
            cases[name] = {"model": model, "request": spec.to_dict(), "hits": describe(hits)}
            print(f"{name}: {len(hits)} hits", file=sys.stderr)
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(
        json.dumps(
            {
                "recorded_at": commit,
                "torch": torch.__version__,
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "machine": platform.machine(),
                "cases": cases,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {GOLDEN}", file=sys.stderr)


if __name__ == "__main__":
    main()
