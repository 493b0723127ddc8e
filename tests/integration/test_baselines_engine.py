"""The baselines through real broker and worker processes, and ``chords bench`` end to end."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chords_mq.client import AsyncClient
from chords_mq.local import run_tasks
from chords_mq.request import RequestSpec
from chords_mq.workers.models.base import in_process
from chords_mq.workers.models.digits import DigitsAdapter
from tests.integration.conftest import assert_same_hits, hits_and_stats, local_hits

BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "spec",
    [
        RequestSpec("synthetic", method="paradigms", steps=30, cores=4, seed=1, tolerance=0.05),
        RequestSpec("synthetic", method="srds", steps=30, cores=4, seed=2),
        RequestSpec("synthetic", method="srds-parareal", steps=25, cores=4, seed=3),
        RequestSpec("synthetic", method="srds-parareal", steps=25, cores=2, iterations=2),
    ],
    ids=["paradigms", "srds", "srds-parareal", "srds-parareal-P2"],
)
def test_baselines_through_the_engine_equal_the_in_process_plan(clusters, spec):
    """Whatever order four workers finish in, every hit is bitwise the in-process result."""
    hits, stats = asyncio.run(hits_and_stats(clusters[4].client_address, spec))
    expected = local_hits(spec)
    assert_same_hits(hits, expected)
    assert stats["returned"] == {"core": expected[-1].core, "round": expected[-1].round}
    assert stats["evaluations"] >= spec.steps


def bench(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "chords"), "bench", *args],
        capture_output=True,
        text=True,
        check=check,
        timeout=600,
    )


def in_process_rmse(spec: RequestSpec, adapter: DigitsAdapter) -> tuple[int, float]:
    """The returned hit's round and its RMSE against sequential, computed without the engine."""
    prepared = adapter.prepare(spec)
    evaluate = in_process(adapter, prepared)
    sequential = RequestSpec(
        "digits", method="sequential", steps=spec.steps, seed=spec.seed, params=spec.params
    )
    ref = run_tasks(sequential.build_plan(prepared.x0, prepared.solver), evaluate).returned.latent
    returned = run_tasks(spec.build_plan(prepared.x0, prepared.solver), evaluate).returned
    error = float(torch.sqrt(torch.mean((returned.latent.double() - ref.double()) ** 2)))
    return returned.round, error


def test_bench_on_the_demo_model(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two digits\na handwritten 3\n\nseven\n")
    out = tmp_path / "bench"
    result = bench(
        "--model",
        "digits",
        "--cores",
        "2,3",
        "--steps",
        "12",
        "--seeds",
        "0",  # (two prompts: rows still average over samples)
        "--prompts",
        str(prompts),
        "--tolerance",
        "0.1,0",
        "--out",
        str(out),
        "--methods",
        "sequential,chords,srds,srds-parareal,paradigms",
    )
    data = json.loads((out / "bench.json").read_text())
    rows = data["rows"]
    keys = {
        "method",
        "cores",
        "steps",
        "round_speedup",
        "wall_speedup",
        "evaluations",
        "latent_rmse",
        "quality",
    }
    assert all(keys <= set(row) for row in rows)
    # sequential, then per K: paradigms x 2 tolerances, srds, srds-parareal, chords
    assert [(r["method"], r["cores"]) for r in rows] == [("sequential", 1)] + [
        (m, k)
        for k in (2, 3)
        for m in ("paradigms", "paradigms", "srds", "srds-parareal", "chords")
    ]
    assert all(row["samples"] == 2 for row in rows)
    sequential = rows[0]
    assert sequential["round_speedup"] == 1.0 and sequential["latent_rmse"] == 0.0
    assert sequential["evaluations"] == 12
    # ParaDIGMS with tolerance 0 is sequential up to summation order
    exact = next(r for r in rows if r["method"] == "paradigms" and r["tolerance"] == 0)
    assert exact["latent_rmse"] < 1e-5
    # every row's round and RMSE are what the plan gives in-process, averaged
    adapter = DigitsAdapter()
    for row in rows[1:]:
        measured = []
        for prompt in ("a handwritten 3", "seven"):
            for seed in (0,):
                spec = RequestSpec(
                    "digits",
                    method=row["method"],
                    steps=12,
                    cores=row["cores"],
                    seed=seed,
                    params={"prompt": prompt},
                    stop="core-index:1" if row["method"] == "chords" else None,
                    tolerance=row.get("tolerance"),
                )
                measured.append(in_process_rmse(spec, adapter))
        mean_round = sum(r for r, _ in measured) / len(measured)
        assert row["round"] == pytest.approx(mean_round)
        assert row["round_speedup"] == pytest.approx(12 / mean_round, abs=1e-3)
        assert row["latent_rmse"] == pytest.approx(
            sum(e for _, e in measured) / len(measured), abs=1e-6
        )
        assert row["evaluations"] >= mean_round
        assert math.isfinite(row["wall_speedup"]) and row["wall_speedup"] > 0
        assert 0 <= row["quality"] <= 100
    # CHORDS returns core K, which hits at round N - i_K + K - 1
    last_start = RequestSpec("digits", cores=3, steps=12).resolved_init_sequence()[-1]
    assert rows[-1]["round"] == 12 - last_start + 3 - 1
    table = (out / "bench.md").read_text()
    assert table.strip() in result.stdout
    for label in (
        "| Sequential | 1 |",
        "| CHORDS | 3 |",
        "| SRDS (pipelined) | 2 |",
        "| ParaDIGMS (tau=0.1) | 2 |",
        "| SRDS (Parareal DAG) | 3 |",
    ):
        assert label in table
    assert data["machine"]["torch"] == torch.__version__
    assert data["machine"]["worker_devices"] == ["cpu"]
    assert len(data["samples"]) == 2 * len(rows)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "chords,bogus"], "unknown methods"),
        (["--methods", "chords"], "must include sequential"),
        (["--cores", "4,x"], "--cores"),
        (["--seeds", ""], "--seeds"),
        (["--tolerance", "-1"], "--tolerance"),
        (["--prompts", "/nonexistent/prompts.txt"], "cannot read prompts file"),
        (["--cores", "9", "--steps", "50"], "SRDS with 9 cores"),
    ],
)
def test_bench_refuses_bad_options_before_starting_anything(args, message):
    result = bench("--model", "digits", *args, check=False)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.parametrize(
    "fields",
    [
        {"method": "paradigms", "tolerance": 0.05},
        {"method": "srds-parareal", "iterations": 3},
    ],
    ids=["paradigms", "srds-parareal"],
)
async def test_a_killed_worker_does_not_change_a_baseline_result(fresh_cluster, fields):
    """Fault isolation holds for the baselines too: a worker killed mid-request leaves the pool,
    its work re-runs elsewhere, and every hit is still bitwise the in-process result."""
    spec = RequestSpec("synthetic", steps=30, cores=3, seed=4, **fields)
    cluster = fresh_cluster(workers=3, latency_ms=30.0)
    victim = cluster.workers[1].pid

    def kill_once(progress: dict) -> None:
        nonlocal victim
        if victim is not None and progress["evaluations"] >= 3:
            os.kill(victim, signal.SIGKILL)
            victim = None

    async with AsyncClient(cluster.client_address) as client:
        stream = client.submit(spec, timeout=120, on_progress=kill_once)
        hits = [hit async for hit in stream]
        status = await client.status()
    assert victim is None, "the worker was never killed: the request ended too soon"
    assert_same_hits(hits, local_hits(spec))
    assert len(status["workers"]) == 2
