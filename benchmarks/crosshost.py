"""The engine across hosts on shaped links: what moving latents costs, per latent size.

Network namespaces on one bridge (``tests/multihost/netns.py``): a broker host, two worker hosts
of 4 synthetic workers each (``--latency-ms`` per forward, 100 by default), and a client host.
Each host's link is shaped with ``tc ... tbf`` to ``--rates`` (``1gbit``; ``none`` leaves it
unshaped: veth pairs on this machine). Per rate and latent size (float32), one sequential
request of N steps and one CHORDS request (K cores, ``core-index:1``: to the fastest core's hit)
run one after the other, and each reports:

- wall time (submit to its last hit), against its ideal (rounds x latency);
- CHORDS' measured speedup (sequential wall / CHORDS wall) against its round-speedup
  (N / the round of its hit), and the ratio of the two;
- bytes through the broker host's interface (received + sent) and through the worker hosts'
  interfaces, in latents per request;
- false worker losses (the broker's ``worker ... lost`` log lines; nothing is killed here) and
  the retries the request's stats count.

    python -m benchmarks.crosshost --label before
    python -m benchmarks.crosshost --rates 1gbit --sizes 16MiB --label after

Needs root (``ip netns``, ``tc``). Writes benchmarks/results/crosshost.json, keeping the other
labels' runs (docs/benchmarks.md quotes "before" and "after"). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from chords_mq.apps.bench import machine_info
from chords_mq.request import RequestSpec
from tests.multihost.conftest import AgentProcess
from tests.multihost.netns import Network, script

RESULTS = Path(__file__).resolve().parent / "results" / "crosshost.json"
SUBNET = "10.232.0"  # not the multi-host tests' subnet: both may run at once
HOSTS = {"broker": 1, "w1": 11, "w2": 12, "client": 21}
WORKER_HOSTS = ("w1", "w2")
CLIENT_PORT, WORKER_PORT = 5555, 5556
SIZES = {"64KiB": 1 << 16, "1MiB": 1 << 20, "4MiB": 1 << 22, "16MiB": 1 << 24}
LOST = re.compile(rb"worker .* lost: ")


class Pool:
    """The namespaces, the broker, the workers and the client agent of one benchmark run."""

    def __init__(self, root: Path, workers_per_host: int, latency_ms: float) -> None:
        self.net = Network(f"cmqx{os.getpid()}", SUBNET, HOSTS, root / "logs")
        self.workers_per_host = workers_per_host
        self.latency_ms = latency_ms
        self.agent: AgentProcess | None = None

    @property
    def client_address(self) -> str:
        return f"tcp://{self.net.addr('broker')}:{CLIENT_PORT}"

    def start(self) -> None:
        reason = self.net.probe()
        if reason is not None:
            raise SystemExit(f"crosshost: cannot run here: {reason}")
        self.net.build()
        broker = self.net.addr("broker")
        self.net.spawn(
            "broker",
            "broker",
            [
                script("chords-broker"),
                "--client-bind",
                self.client_address,
                "--worker-bind",
                f"tcp://{broker}:{WORKER_PORT}",
                "--insecure",  # a benchmark of the links, not of CURVE's cipher
                "--drain-timeout",
                "2",
            ],
        )
        for host in WORKER_HOSTS:
            for index in range(self.workers_per_host):
                self.net.spawn(
                    host,
                    f"{host}-worker{index}",
                    [
                        script("chords-worker"),
                        "--broker",
                        f"tcp://{broker}:{WORKER_PORT}",
                        "--model",
                        "synthetic",
                        "--name",
                        "synthetic",
                        "--threads",
                        "1",
                        "--latency-ms",
                        str(self.latency_ms),
                        "--insecure",  # its data endpoint binds eth0, without CURVE as above
                    ],
                )
        process = self.net.spawn(
            "client",
            "client-agent",
            [sys.executable, "-m", "tests.multihost.agent", "--address", self.client_address],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.agent = AgentProcess(process)
        self.agent.result(None, timeout=120)  # "ready"
        workers = len(WORKER_HOSTS) * self.workers_per_host
        self.agent.call("wait", 130, keys={}, workers=workers, timeout=120)

    def shape(self, rate: str | None) -> None:
        for host in HOSTS:
            self.net.shape(host, rate)

    def losses(self) -> int:
        """``worker ... lost`` lines in the broker's log so far."""
        return len(LOST.findall((self.net.logs / "broker.log").read_bytes()))

    def run(self, spec: RequestSpec, out: Path) -> dict[str, Any]:
        assert self.agent is not None
        before = {host: self.net.counters(host) for host in HOSTS}
        lost = self.losses()
        self.agent.call(
            "run", 900, specs=[spec.to_dict()], out=str(out), timeout=600, latents=False
        )
        after = {host: self.net.counters(host) for host in HOSTS}
        moved = {
            host: (after[host]["rx"] - before[host]["rx"])
            + (after[host]["tx"] - before[host]["tx"])
            for host in HOSTS
        }
        (request,) = json.loads(out.read_text())["requests"]
        hits = request["hits"]
        return {
            "wall_s": hits[-1]["at_s"],
            "round": hits[-1]["round"],
            "core": hits[-1]["core"],
            "hits": len(hits),
            "evaluations": request["stats"].get("evaluations"),
            "retries": request["stats"].get("retries"),
            "broker_bytes": moved["broker"],
            "worker_host_bytes": sum(moved[h] for h in WORKER_HOSTS),
            "false_losses": self.losses() - lost,
        }

    def close(self) -> None:
        if self.agent is not None:
            self.agent.stop()
        self.net.close()


def measure(
    pool: Pool, rate: str, size: str, steps: int, cores: int, latency_s: float, scratch: Path
) -> dict[str, Any]:
    latent = SIZES[size]
    params = {"shape": [latent // 4], "dtype": "float32"}
    sequential = RequestSpec("synthetic", method="sequential", steps=steps, params=params)
    chords = RequestSpec(
        "synthetic", cores=cores, exact_cores=True, stop="core-index:1", steps=steps, params=params
    )
    seq = pool.run(sequential, scratch / f"{rate}-{size}-seq.json")
    cho = pool.run(chords, scratch / f"{rate}-{size}-chords.json")
    round_speedup = steps / cho["round"]
    speedup = seq["wall_s"] / cho["wall_s"]
    row = {
        "rate": rate,
        "latent": size,
        "latent_bytes": latent,
        "sequential_s": round(seq["wall_s"], 3),
        "sequential_over_ideal": round(seq["wall_s"] / (steps * latency_s), 3),
        "chords_s": round(cho["wall_s"], 3),
        "chords_over_ideal": round(cho["wall_s"] / (cho["round"] * latency_s), 3),
        "round_speedup": round(round_speedup, 3),
        "speedup": round(speedup, 3),
        "speedup_over_round_speedup": round(speedup / round_speedup, 3),
        "sequential_broker_latents": round(seq["broker_bytes"] / latent, 2),
        "chords_broker_latents": round(cho["broker_bytes"] / latent, 2),
        "chords_worker_host_latents": round(cho["worker_host_bytes"] / latent, 2),
        "chords_evaluations": cho["evaluations"],
        "false_losses": seq["false_losses"] + cho["false_losses"],
        "retries": (seq["retries"] or 0) + (cho["retries"] or 0),
    }
    print(
        f"{rate:>6} {size:>6}  seq {row['sequential_s']:7.2f}s ({row['sequential_over_ideal']:.2f}"
        f"x ideal)  chords {row['chords_s']:6.2f}s  speedup {row['speedup']:.2f} / "
        f"{row['round_speedup']:.2f} = {row['speedup_over_round_speedup']:.2f}  broker "
        f"{row['chords_broker_latents']:.1f} latents  lost {row['false_losses']}",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", default="current", help="the run's name in the result file")
    parser.add_argument("--rates", default="1gbit,none", help="comma-separated; none: unshaped")
    parser.add_argument(
        "--sizes", default=",".join(SIZES), help="comma-separated, of " + ", ".join(SIZES)
    )
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cores", type=int, default=8)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--workers-per-host", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    sizes = [s for s in args.sizes.split(",") if s]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown sizes {unknown}; choose from {list(SIZES)}")
    rates = [r for r in args.rates.split(",") if r]

    rows = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="crosshost-") as tmp:
        pool = Pool(Path(tmp), args.workers_per_host, args.latency_ms)
        try:
            pool.start()
            for rate in rates:
                pool.shape(None if rate == "none" else rate)
                for size in sizes:
                    rows.append(
                        measure(
                            pool,
                            rate,
                            size,
                            args.steps,
                            args.cores,
                            args.latency_ms / 1000,
                            Path(tmp),
                        )
                    )
        finally:
            pool.close()
    result = {
        "machine": machine_info(),
        "commit": os.popen("git rev-parse --short HEAD").read().strip(),
        "steps": args.steps,
        "cores": args.cores,
        "latency_ms": args.latency_ms,
        "workers": {host: args.workers_per_host for host in WORKER_HOSTS},
        "seconds": round(time.monotonic() - started, 1),
        "rows": rows,
    }
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    previous[args.label] = result
    args.out.write_text(json.dumps(previous, indent=2) + "\n")
    print(f"wrote {args.out} ({args.label})")


if __name__ == "__main__":
    main()
