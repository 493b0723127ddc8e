"""Core 1 against the diffusers pipeline on a given device (a GPU check, not a test).

``tests/test_pipeline_adapters.py`` checks on CPU that the engine's sequential sample and
CHORDS' core 1 equal each pipeline's own ``pipe(..., output_type="latent")`` bit for bit. This
script runs the same comparison on ``--device`` (for example ``cuda``) for every tiny pipeline
family in float32 and bfloat16:

* ``sequential``: the adapter's sequential plan, run in-process on the device;
* ``core1``: CHORDS K=4's core 1, in-process, each task as a worker runs it (``in_process``);
* ``engine``: for the families named by ``--engine``, the same CHORDS request through a real
  broker and two real worker processes on the device;
* with ``--published`` (the default), the same in-process checks for each family saved with
  the scheduler its published folder ships (``tests/integration/test_published_schedulers.py``:
  SD 1.x PNDM, SD 2.1 and SDXL Euler discrete, Wan UniPC, CogVideoX 5B DPM, the flow
  families), against ``pipe()`` with the scheduler ``docs/models.md`` names;
* with ``--resaved`` (the default), the same for folders re-saved with DPM-Solver++ ("DPM++ 2M",
  with and without Karras sigmas) and UniPC (``tests/test_multistep_schedulers.py``), against
  ``pipe()`` with their first-order form (``solver_order=1``; UniPC with no corrector).

Each row gives whether the latent is bitwise equal to the pipeline's, and the largest absolute
difference. Prints a table and writes ``--out`` (JSON). Run from the repository root, with the
repository on the path (it reuses the tests' tiny pipelines):

    PYTHONPATH=. python benchmarks/device_numerics.py --device cuda --out results.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import platform
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from chords_mq.apps.cluster import LocalCluster
from chords_mq.request import RequestSpec
from chords_mq.workers.models import load_adapter, served_name
from tests import tiny_pipelines as tiny
from tests.test_pipeline_adapters import (
    DTYPES,
    FAMILIES,
    engine_hits,
    load_pipe,
    local_hits,
    pipeline_output,
)

STEPS, SEED = 12, 3


def compare(got: torch.Tensor, want: torch.Tensor) -> dict[str, Any]:
    got, want = got.cpu(), want.cpu()
    same_shape = got.shape == want.shape and got.dtype == want.dtype
    diff = (got.float() - want.float()).abs().max().item() if same_shape else float("nan")
    return {"bitwise": bool(same_shape and torch.equal(got, want)), "max_abs_diff": diff}


def check(
    family: Any,
    dtype_name: str,
    folder: Path,
    device: str,
    engine: bool,
    rows: list[dict],
    published: Any = None,
) -> None:
    """Append one row per check to ``rows`` (so the rows before a failure are kept).
    ``published``: a ``Published`` case (its folder ships that scheduler; the reference
    swaps in the scheduler the docs name)."""
    dtype = DTYPES[dtype_name]
    pipe = load_pipe(folder, dtype).to(device)
    if published is not None and published.reference is not None:
        published.reference(pipe)
        family = dataclasses.replace(family, reference=None)  # the case's swap, not the family's
    expected = pipeline_output(pipe, family, STEPS, SEED, "latent")
    del pipe
    model = served_name(str(folder))
    params = family.params
    sequential = RequestSpec(
        model=model, method="sequential", steps=STEPS, seed=SEED, params=params
    )
    chords = RequestSpec(model=model, cores=4, steps=STEPS, seed=SEED, params=params)
    adapter = load_adapter(str(folder), device=device, dtype=dtype)
    kind = getattr(published, "kind", "published")  # or re-saved (test_multistep_schedulers)
    name = family.name if published is None else f"{published.id} ({kind})"
    base = {"family": name, "dtype": dtype_name, "device": device}
    (seq_hit,) = local_hits(adapter, sequential)
    rows.append({**base, "check": "sequential", **compare(seq_hit.latent, expected)})
    core1 = next(h for h in local_hits(adapter, chords) if h.core == 1)
    rows.append({**base, "check": "core1", **compare(core1.latent, expected)})
    del adapter
    if engine:
        with tempfile.TemporaryDirectory() as logs:
            cluster = LocalCluster(
                workers=2,
                model=str(folder),
                device=device,
                log_dir=logs,
                extra_worker_args=["--dtype", dtype_name],
            ).start()
            try:
                hits = asyncio.run(engine_hits(cluster.client_address, model, chords))
            finally:
                cluster.stop()
        core1 = next(h for h in hits if h.core == 1)
        rows.append({**base, "check": "engine core1", **compare(core1.latent, expected)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--families", default=",".join(f.name for f in FAMILIES))
    parser.add_argument(
        "--engine",
        default=",".join(f.name for f in FAMILIES),
        help="families also run through the engine (default: all)",
    )
    parser.add_argument(
        "--published",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also check each family saved with its published folder's scheduler",
    )
    parser.add_argument(
        "--resaved",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also check folders re-saved with DPM++ 2M or UniPC (their first-order forms)",
    )
    parser.add_argument("--out", type=Path, default=Path("device_numerics.json"))
    args = parser.parse_args()
    if args.device == "cpu":
        # Local workers run one intra-op thread (LocalCluster sets OMP_NUM_THREADS=1), and a
        # float32 CPU matmul's summation order depends on the thread count: match it, as the
        # tests do.
        torch.set_num_threads(1)
    wanted = args.families.split(",")
    engine = set(args.engine.split(",")) if args.engine else set()
    rows: list[dict] = []
    started = time.perf_counter()
    cases: list[tuple[Any, Any]] = [(f, None) for f in FAMILIES if f.name in wanted]
    if args.published:
        from tests.integration.test_published_schedulers import FOLDERS, family_of

        cases += [(family_of(c), c) for c in FOLDERS if c.family in wanted]
    if args.resaved:
        from tests.test_multistep_schedulers import RESAVED

        by_name = {f.name: f for f in FAMILIES}
        cases += [(by_name[c.family], c) for c in RESAVED if c.family in wanted]
    with tempfile.TemporaryDirectory() as root:
        for family, published in cases:
            pipe = family.build()
            label = family.name
            if published is not None:
                import diffusers

                scheduler = getattr(diffusers, published.scheduler)
                pipe.scheduler = scheduler.from_config(published.config)
                label = f"{published.id} ({getattr(published, 'kind', 'published')})"
            folder = tiny.save_tiny(pipe, Path(root) / f"tiny-{label.split()[0]}")
            for dtype_name in DTYPES:
                found: list[dict] = []
                try:
                    run_engine = published is None and family.name in engine
                    check(family, dtype_name, folder, args.device, run_engine, found, published)
                except Exception as exc:  # report and go on: one family must not hide the rest
                    found.append(
                        {
                            "family": label,
                            "dtype": dtype_name,
                            "device": args.device,
                            "check": "error",
                            "bitwise": False,
                            "max_abs_diff": float("nan"),
                            "error": f"{type(exc).__name__}: {exc}",
                            "traceback": traceback.format_exc(limit=-4),
                        }
                    )
                for row in found:
                    print(
                        f"{row['family']:28s} {row['dtype']:9s} {row['check']:13s} "
                        f"bitwise={row['bitwise']!s:5s} max|diff|={row['max_abs_diff']:.3g}"
                        + (f"  {row['error']}\n{row['traceback']}" if "error" in row else ""),
                        flush=True,
                    )
                rows.extend(found)
                write(args.out, rows, started)  # after every check: a cut-off run keeps its rows
    print(f"{sum(r['bitwise'] for r in rows)}/{len(rows)} bitwise; wrote {args.out}")


def write(out: Path, rows: list[dict], started: float) -> None:
    result = {
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "seconds": round(time.perf_counter() - started, 1),
        "steps": STEPS,
        "seed": SEED,
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
