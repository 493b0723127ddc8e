"""Chaos: random SIGKILLs of workers while CHORDS requests run, every output checked bit for bit.

Issue 25's fault acceptance: "a chaos run of at least 50 random kills over 20 requests: 0 wrong
outputs". A real broker and W synthetic workers (a per-forward latency, so requests last long
enough to be hit) on loopback run R CHORDS requests (K drawn from 4 to 8, exact cores, N steps,
each its own seed), C at a time. Meanwhile a killer, at random moments (uniform gaps), SIGKILLs a
random worker of the pool (one whose log says it registered; sometimes two at once) and starts
a new one at once, until it has killed ``--kills`` workers, paced by the requests' progress so
that kills land all through the run; it never kills the pool's last worker, so a capable worker
is always left. Each request's hits are compared with the same request run in-process
(chords_mq.local: the plan and the adapter, no daemons): a hit list that differs in any core,
round, dtype or bit is *wrong*. Also reported: how many requests ran while a kill landed,
typed failures (RequestFailed, by code), the broker's retries and replays (re-runs of lost
results, where the broker reports them), the client's resubmissions, and the wall time.

    python -m benchmarks.chaos --label before --data-plane off   # today's path
    python -m benchmarks.chaos --label after --data-plane on     # latents on the workers

``--data-plane on|off`` is passed to the broker only if it accepts the option (checked at run
time). Prints a table and writes the run under its label in benchmarks/results/chaos.json
(docs/benchmarks.md quotes it), keeping the other labels' runs. Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import plane_args, save_labelled
from chords_mq.apps.bench import machine_info
from chords_mq.apps.cluster import LocalCluster
from chords_mq.client import AsyncClient, ClientHit, RequestFailed, RequestTimeout
from chords_mq.errors import DuplicateCoreWarning
from chords_mq.local import run_tasks
from chords_mq.request import RequestSpec
from chords_mq.workers.models.base import in_process
from chords_mq.workers.models.synthetic import SyntheticAdapter

RESULTS = Path(__file__).resolve().parent / "results" / "chaos.json"


def reference(spec: RequestSpec) -> list[Any]:
    """The request's hits computed in-process, with the adapter the workers run."""
    adapter = SyntheticAdapter()
    prepared = adapter.prepare(spec)
    plan = spec.build_plan(prepared.x0, prepared.solver)
    return run_tasks(plan, in_process(adapter, prepared)).hits


def same_hits(got: list[ClientHit], want: list[Any]) -> bool:
    if [(h.core, h.round) for h in got] != [(h.core, h.round) for h in want]:
        return False
    return all(
        g.latent is not None
        and g.latent.dtype == w.latent.dtype
        and torch.equal(g.latent, w.latent)
        for g, w in zip(got, want)
    )


def registered(cluster: LocalCluster) -> list[subprocess.Popen[bytes]]:
    """The live workers that have joined the pool: their log says so (a worker killed while
    it still imports torch was never in the pool; killing only those could leave none)."""
    assert cluster.log_dir is not None
    joined = []
    for index, process in enumerate(cluster.workers):
        log = cluster.log_dir / f"worker{index}.log"
        if process.poll() is None and "registered with broker" in log.read_text(errors="replace"):
            joined.append(process)
    return joined


class Killer:
    """Kills a random worker of the pool at random moments and starts a new one in its place."""

    def __init__(self, cluster: LocalCluster, rng: random.Random, args: argparse.Namespace):
        self.cluster, self.rng, self.args = cluster, rng, args
        self.kills = 0
        self.events: list[dict[str, Any]] = []  # when, how many at once
        self.started = time.monotonic()

    def kill_now(self) -> None:
        pool = registered(self.cluster)
        at_once = 2 if self.rng.random() < self.args.double else 1
        if len(pool) <= at_once:
            return  # never the pool's last worker: a capable one is always left
        victims = self.rng.sample(pool, at_once)
        for process in victims:
            os.kill(process.pid, signal.SIGKILL)
        for process in victims:
            process.wait(10)
            self.cluster.start_worker()
        self.kills += at_once
        self.events.append({"at": time.monotonic(), "killed": at_once, "pool": len(pool)})

    async def run(self, requests_done: asyncio.Event, finished: list[int]) -> None:
        """Kill at random gaps while requests run, paced by their progress: with f of R
        requests finished and C running, at most kills * (f + C) / R so far, so every stretch
        of the run (every request) is hit, not only the first ones."""
        while self.kills < self.args.kills and not requests_done.is_set():
            gap = self.rng.uniform(self.args.min_gap_s, self.args.max_gap_s)
            try:
                await asyncio.wait_for(requests_done.wait(), gap)
            except asyncio.TimeoutError:
                started = finished[0] + self.args.concurrency
                if self.kills < self.args.kills * started / self.args.requests:
                    self.kill_now()


async def run_one(address: str, spec: RequestSpec, timeout: float) -> dict[str, Any]:
    started = time.monotonic()
    row: dict[str, Any] = {"cores": spec.cores, "seed": spec.seed}
    async with AsyncClient(address) as client:
        stream = client.submit(spec, timeout=timeout)
        try:
            hits = [hit async for hit in stream]
        except RequestFailed as exc:
            row.update(outcome="failed", code=exc.code, message=exc.message)
        except RequestTimeout as exc:
            row.update(outcome="timeout", message=str(exc))
        else:
            stats = stream.stats or {}
            row.update(
                outcome="bitwise" if same_hits(hits, reference(spec)) else "wrong",
                retries=stats.get("retries", 0),
                replays=sum(v for k, v in stats.items() if "replay" in k and isinstance(v, int)),
                evaluations=stats.get("evaluations"),
                hit_parts=stats.get("hit_parts", 0),  # pieces of hits' latents sent on
            )
        row["resubmissions"] = stream.resubmissions
    row["wall_s"] = round(time.monotonic() - started, 2)
    row["span"] = (started, time.monotonic())  # replaced by the kills it saw, in chaos()
    return row


def shape_params(shape: str | None) -> dict[str, Any]:
    """The synthetic model's latent shape from ``--shape`` ("4,512,512"); none: its default."""
    if not shape:
        return {}
    return {"shape": [int(size) for size in shape.split(",")], "dtype": "float32"}


async def chaos(cluster: LocalCluster, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    specs = [
        RequestSpec(
            "synthetic",
            cores=rng.randint(4, 8),
            steps=args.steps,
            seed=args.seed * 1000 + i,
            exact_cores=True,
            params=shape_params(args.shape),
        )
        for i in range(args.requests)
    ]
    gate = asyncio.Semaphore(args.concurrency)

    finished = [0]

    async def gated(spec: RequestSpec) -> dict[str, Any]:
        async with gate:
            row = await run_one(cluster.client_address, spec, args.request_timeout)
            finished[0] += 1
            return row

    killer = Killer(cluster, random.Random(args.seed + 1), args)
    done = asyncio.Event()
    started = time.monotonic()
    killing = asyncio.ensure_future(killer.run(done, finished))
    rows = await asyncio.gather(*(gated(spec) for spec in specs))
    done.set()
    await killing
    wall = time.monotonic() - started
    for row in rows:  # the kill events each request saw while it ran
        begin, end = row.pop("span")
        row["kills_seen"] = sum(e["killed"] for e in killer.events if begin <= e["at"] <= end)
    for event in killer.events:
        event["t_s"] = round(event.pop("at") - started, 2)
    return {"rows": list(rows), "kills": killer.kills, "events": killer.events, "wall_s": wall}


def summarize(run: dict[str, Any]) -> dict[str, Any]:
    rows = run["rows"]
    codes: dict[str, int] = {}
    for row in rows:
        if row["outcome"] == "failed":
            codes[row["code"]] = codes.get(row["code"], 0) + 1
    return {
        "requests": len(rows),
        "kills": run["kills"],
        "kill_events": len(run["events"]),
        "requests_hit": sum(r["kills_seen"] > 0 for r in rows),
        "bitwise": sum(r["outcome"] == "bitwise" for r in rows),
        "wrong": sum(r["outcome"] == "wrong" for r in rows),
        "typed_failures": codes,
        "timeouts": sum(r["outcome"] == "timeout" for r in rows),
        "retries": sum(r.get("retries", 0) for r in rows),
        "replays": sum(r.get("replays", 0) for r in rows),
        "resubmissions": sum(r["resubmissions"] for r in rows),
        "hit_parts": sum(r.get("hit_parts", 0) for r in rows),
        "wall_s": round(run["wall_s"], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", default="current", help="the run's name in the result file")
    parser.add_argument("--data-plane", choices=["on", "off"], default=None)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--kills", type=int, default=50, help="kill this many workers in all")
    parser.add_argument("--concurrency", type=int, default=4, help="requests running at once")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--steps", type=int, default=40)
    # gaps averaging 1 s spread 50 kills over the whole run of 20 requests (about a minute here)
    parser.add_argument("--min-gap-s", type=float, default=0.4)
    parser.add_argument("--max-gap-s", type=float, default=1.6)
    parser.add_argument("--double", type=float, default=0.2, help="chance a kill takes two")
    parser.add_argument("--request-timeout", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--shape",
        default=None,
        help="the latent's shape, float32 (e.g. 4,512,512: 4 MiB, whose hits go to the client in "
        "pieces); default: the synthetic model's own, a few KiB",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--logs", type=Path, default=None, help="keep the daemons' logs here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the workers (--threads 1); the field is elementwise anyway
    # K=8 at N=40 repeats a core (its init sequence); the broker runs it as asked
    warnings.filterwarnings("ignore", category=DuplicateCoreWarning)
    with tempfile.TemporaryDirectory(prefix="chaos-") as scratch:
        logs = args.logs or Path(scratch)
        cluster = LocalCluster(
            workers=args.workers,
            latency_ms=args.latency_ms,
            log_dir=logs,
            extra_broker_args=plane_args(args.data_plane),
        )
        with cluster:
            run = asyncio.run(chaos(cluster, args))
            broker_alive = cluster.broker is not None and cluster.broker.poll() is None
    summary = summarize(run)
    result = {
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "data_plane": args.data_plane or "default (no --data-plane given)",
        "settings": {
            k: getattr(args, k)
            for k in (
                "requests",
                "kills",
                "concurrency",
                "workers",
                "latency_ms",
                "steps",
                "min_gap_s",
                "max_gap_s",
                "double",
                "seed",
                "shape",
            )
        },
        "summary": summary,
        "broker_alive_after": broker_alive,
        "rows": run["rows"],
        "events": run["events"],
    }
    print(
        f"\n{'label':<8} {'plane':<8} {'requests':>8} {'kills':>6} {'hit':>4} {'bitwise':>8} "
        f"{'wrong':>6} "
        f"{'typed failures':>15} {'retries':>8} {'replays':>8} {'resubmit':>9} {'wall s':>7}"
    )
    failures = ", ".join(f"{c}: {n}" for c, n in summary["typed_failures"].items()) or "0"
    print(
        f"{args.label:<8} {args.data_plane or '-':<8} {summary['requests']:>8} "
        f"{summary['kills']:>6} {summary['requests_hit']:>4} {summary['bitwise']:>8} "
        f"{summary['wrong']:>6} {failures:>15} "
        f"{summary['retries']:>8} {summary['replays']:>8} {summary['resubmissions']:>9} "
        f"{summary['wall_s']:>7.1f}"
    )
    if summary["hit_parts"]:
        print(f"{summary['hit_parts']} pieces of hits' latents sent on as they arrived")
    if summary["timeouts"]:
        print(f"{summary['timeouts']} request(s) timed out")
    save_labelled(args.out, args.label, result)


if __name__ == "__main__":
    main()
