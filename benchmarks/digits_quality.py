"""Digits demo quality: sample quality of every CHORDS hit against plain sequential sampling.

The shipped digits model (workers/models/digits.py, a class-conditional rectified-flow UNet on
8x8 digits) samples --seeds samples per class for the 10 classes: labels are
``arange(10).repeat_interleave(seeds)`` and sample i uses seed i (so class c takes seeds
c * seeds .. (c + 1) * seeds - 1), x0 made exactly as the adapter's ``prepare`` makes it.

* sequential: ``sample_sequential_batch``, N = --steps Euler steps.
* CHORDS: ``sample_chords_batch`` with ``init_sequence(--cores, --steps)`` under the reference
  round-by-round schedule; every hit (the coarse zero-th hit, core 0, and cores K .. 1) is scored.

All samples of one variant run as one batched plan in-process: each forward evaluates the whole
batch at one step. That changes low bits versus one request at a time, which is fine for
statistics; core 1 and sequential use the same batch shape, so they should agree exactly.

Scored by ``chords_mq.workers.models.digits_metrics.DigitScorer``: classifier accuracy (an RBF
SVC fitted on the real training digits; agreement with the requested class), Frechet distance in
a PCA-16 space against the real held-out digits, within-class spread ratio, plus the latent RMSE
``sqrt(mean((x - x_seq) ** 2))`` of each hit against the sequential batch. The real reference row
is the held-out digits' classifier accuracy, with the training digits' Frechet distance and
spread ratio against the held-out digits.

Prints a table and writes benchmarks/results/digits_quality.json (quoted by docs/benchmarks.md).
Not a test: nothing here asserts a number.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import time
from pathlib import Path
from typing import Any

import torch

from chords_mq.algorithms import init_sequence
from chords_mq.workers.models.digits import DigitsAdapter
from chords_mq.workers.models.digits_metrics import (
    DigitScorer,
    sample_chords_batch,
    sample_sequential_batch,
)

RESULTS = Path(__file__).resolve().parent / "results" / "digits_quality.json"


def rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.sqrt(torch.mean((x.double() - ref.double()) ** 2)))


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=100, help="samples (seeds) per class")
    parser.add_argument("--cores", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()

    labels = torch.arange(10).repeat_interleave(args.seeds)
    seeds = list(range(len(labels)))
    init = init_sequence(args.cores, args.steps)
    adapter = DigitsAdapter()
    scorer = DigitScorer()

    t0 = time.perf_counter()
    sequential = sample_sequential_batch(adapter, labels, seeds, args.steps)
    sequential_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    hits = sample_chords_batch(adapter, labels, seeds, args.steps, init)
    chords_s = time.perf_counter() - t0

    fastest = min((h for h in hits if h[0] >= 1), key=lambda h: h[1])
    rows: list[dict[str, Any]] = [
        {
            "output": "sequential",
            "core": None,
            "round": args.steps,
            "speedup": 1.0,
            **scorer.score(sequential, labels),
            "rmse_vs_sequential": 0.0,
            "max_abs_diff_vs_sequential": 0.0,
        }
    ]
    for core, rnd, latents in sorted(hits, key=lambda h: h[1]):
        name = "zero-th hit" if core == 0 else "fastest hit" if core == fastest[0] else "hit"
        rows.append(
            {
                "output": f"chords {name}",
                "core": core,
                "round": rnd,
                "speedup": round(args.steps / rnd, 3),
                **scorer.score(latents, labels),
                "rmse_vs_sequential": rmse(latents, sequential),
                "max_abs_diff_vs_sequential": float((latents - sequential).abs().max()),
            }
        )
    real = {
        "accuracy_held_out": round(scorer.real_accuracy(), 4),
        "frechet_train_vs_held_out": round(scorer.frechet(scorer.x_train), 4),
        "std_ratio_train_vs_held_out": round(scorer.std_ratio(scorer.x_train, scorer.y_train), 4),
    }
    rows.append(
        {
            "output": "real digits",
            "core": None,
            "round": None,
            "speedup": None,
            "accuracy": real["accuracy_held_out"],
            "frechet": real["frechet_train_vs_held_out"],
            "std_ratio": real["std_ratio_train_vs_held_out"],
            "rmse_vs_sequential": None,
            "max_abs_diff_vs_sequential": None,
        }
    )
    core1 = next(latents for core, _, latents in hits if core == 1)
    core1_max_abs = float((core1 - sequential).abs().max())
    total_s = time.perf_counter() - started

    print(
        f"digits demo, {len(labels)} samples ({args.seeds} seeds x 10 classes, batched: one "
        f"forward per step for the whole batch), K={args.cores}, N={args.steps}, init={init}"
    )
    header = (
        f"{'output':<20} {'core':>4} {'round':>5} {'speedup':>7} {'accuracy':>8} "
        f"{'frechet':>8} {'std_ratio':>9} {'rmse vs seq':>11}"
    )
    print(header)
    for row in rows:
        print(
            f"{row['output']:<20} {fmt(row['core'], 'd'):>4} {fmt(row['round'], 'd'):>5} "
            f"{fmt(row['speedup'], '.3f'):>7} {row['accuracy']:>8.3f} {row['frechet']:>8.4f} "
            f"{row['std_ratio']:>9.4f} {fmt(row['rmse_vs_sequential'], '.3g'):>11}"
        )
    print(
        "real digits: accuracy on the held-out digits; frechet and std_ratio of the training "
        "digits against the held-out digits"
    )
    print(f"core 1 vs sequential: max abs difference {core1_max_abs:.3g}")
    fastest_row = next(row for row in rows if row["core"] == fastest[0])
    gap = fastest_row["accuracy"] - rows[0]["accuracy"]
    print(
        f"fastest hit (core {fastest[0]}, round {fastest[1]}) accuracy minus sequential: "
        f"{100 * gap:+.1f} points"
    )
    print(f"time: sequential {sequential_s:.1f} s, chords {chords_s:.1f} s, total {total_s:.1f} s")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "machine": {
                    "platform": platform.platform(),
                    "cpus": multiprocessing.cpu_count(),
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(),
                },
                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "args": {
                    "seeds": args.seeds,
                    "cores": args.cores,
                    "steps": args.steps,
                    "out": str(args.out),
                },
                "samples": len(labels),
                "labels": "arange(10).repeat_interleave(seeds); sample i uses seed i",
                "batched": "each variant is one batched plan: one forward per step evaluates "
                "every sample (changes low bits versus one request at a time)",
                "init_sequence": init,
                "fastest_hit": {"core": fastest[0], "round": fastest[1]},
                "fastest_minus_sequential_accuracy_points": round(100 * gap, 2),
                "rows": rows,
                "real": real,
                "core1_vs_sequential_max_abs_diff": core1_max_abs,
                "timing_s": {
                    "sequential": round(sequential_s, 2),
                    "chords": round(chords_s, 2),
                    "total": round(total_s, 2),
                },
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
