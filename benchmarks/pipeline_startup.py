"""Start-up of ``ChordsPipeline``: what a user's process pays before and around its calls.

For each model (a tiny Stable Diffusion folder built from configs by tests/tiny_pipelines.py,
and the shipped ``digits`` demo model) and each worker thread setting, a fresh Python process
(``--repeats`` of them) times:

- ``import``: ``from chords_mq import ChordsPipeline``;
- ``from_pretrained``: a private broker and ``--devices`` CPU workers started, until all have
  registered;
- calls 1, 2 and 3 (seeds 0, 1, 2; CHORDS K=4, N=``--steps``, every hit decoded by a worker):
  the call's start to its first hit, to its return, the broker's own wall time of the request
  (``stats["wall_s"]``) and the call's overhead over it (return minus the broker's wall);
- ``close``: ``close()`` until every daemon has exited.

Medians over the repeats. Prints a table and writes benchmarks/results/pipeline_startup.json
(``--out``). Not a test. Run from the repository root: ``python -m benchmarks.pipeline_startup``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from chords_mq.apps.bench import machine_info

RESULTS = Path(__file__).resolve().parent / "results" / "pipeline_startup.json"
CALLS = 3

CHILD = f"""
import json, sys, time
t = time.perf_counter()
from chords_mq import ChordsPipeline
imported = time.perf_counter() - t
model, devices, threads, steps, prompt, kwargs = json.loads(sys.argv[1])
t = time.perf_counter()
pipe = ChordsPipeline.from_pretrained(model, devices=["cpu"] * devices, cores=4, threads=threads)
started = time.perf_counter() - t
calls = []
for seed in range({CALLS}):
    out = pipe(prompt, num_inference_steps=steps, seed=seed, **kwargs)
    assert sorted(h.core for h in out.hits) == [0, 1, 2, 3, 4] and out.returned.core == 1
    request = out.stats["wall_s"]
    calls.append({{"first_hit_s": out.first_hit_s, "wall_s": out.wall_s, "request_s": request,
                  "overhead_s": out.wall_s - request}})
t = time.perf_counter()
pipe.close()
closed = time.perf_counter() - t
print(json.dumps({{"import_s": imported, "from_pretrained_s": started, "calls": calls,
                  "close_s": closed}}))
"""


def one_run(model: str, devices: int, threads: int | None, steps: int, prompt: str,
            kwargs: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    argument = json.dumps([model, devices, threads, steps, prompt, kwargs])
    out = subprocess.run(
        [sys.executable, "-c", CHILD, argument],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def flatten(run: dict[str, Any]) -> dict[str, float]:
    row = {key: run[key] for key in ("import_s", "from_pretrained_s", "close_s")}
    for index, call in enumerate(run["calls"], start=1):
        row.update({f"call{index}_{key}": value for key, value in call.items()})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument(
        "--threads", default="1,default", help="worker torch threads to try ('default': None)"
    )
    parser.add_argument("--models", default="tiny-sd,digits")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    threads_list = [None if t == "default" else int(t) for t in args.threads.split(",")]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        models: dict[str, tuple[str, str, dict[str, Any]]] = {}
        for name in args.models.split(","):
            if name == "tiny-sd":
                from tests import tiny_pipelines as tiny

                folder = tiny.save_tiny(tiny.build_tiny_sd(), Path(tmp) / "tiny-sd")
                models[name] = (str(folder), "a photo of a cat", dict(tiny.SD_CALL_KWARGS))
            else:
                models[name] = (name, "a handwritten 7", {})
        for name, (model, prompt, kwargs) in models.items():
            for threads in threads_list:
                runs = []
                for _ in range(args.repeats):
                    runs.append(flatten(one_run(model, args.devices, threads, args.steps,
                                                prompt, kwargs)))  # fmt: skip
                medians = {
                    key: round(statistics.median(run[key] for run in runs), 3) for key in runs[0]
                }
                results.append(
                    {
                        "model": name,
                        "threads": "default" if threads is None else threads,
                        "medians_s": medians,
                        "runs_s": [{k: round(v, 3) for k, v in run.items()} for run in runs],
                    }
                )
                print_row(results[-1])
    document = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine_info(),
        "devices": ["cpu"] * args.devices,
        "cores": 4,
        "steps": args.steps,
        "repeats": args.repeats,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {args.out}")


def print_row(result: dict[str, Any]) -> None:
    m = result["medians_s"]
    calls = "  ".join(
        f"call{i}: first hit {m[f'call{i}_first_hit_s']:.3f} return {m[f'call{i}_wall_s']:.3f} "
        f"request {m[f'call{i}_request_s']:.3f} overhead {m[f'call{i}_overhead_s']:.3f}"
        for i in range(1, CALLS + 1)
    )
    print(
        f"{result['model']:8s} threads={result['threads']!s:8s} import {m['import_s']:.3f}  "
        f"from_pretrained {m['from_pretrained_s']:.3f}  {calls}  close {m['close_s']:.3f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
