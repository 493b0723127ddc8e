"""The engine across hosts on shaped links: what moving latents costs, per latent size.

Network namespaces on one bridge (``tests/multihost/netns.py``): a broker host, two worker hosts
of 4 synthetic workers each (``--latency-ms`` per forward, 100 by default), and a client host.
Each host's link is shaped with ``tc ... tbf`` to ``--rates`` (``1gbit``; ``none`` leaves it
unshaped: veth pairs on this machine). Per rate and latent size (float32), one sequential
request of N steps and one CHORDS request (K cores, ``core-index:1``: to the fastest core's hit)
run one after the other, after ``--warmup`` unmeasured CHORDS requests of that size (default 1:
the workers and the broker have served before, as in a running service; their walls are kept as
``warmup_chords_s``), and each reports:

- wall time (submit to its last hit), against its ideal (rounds x latency);
- CHORDS' measured speedup (sequential wall / CHORDS wall) against its round-speedup
  (N / the round of its hit), and the ratio of the two;
- bytes through the broker host's interface (received + sent) and through the worker hosts'
  interfaces, in latents per request, and the worker hosts' traffic split by where it goes:
  to and from the broker host, between the two worker hosts (worker-to-worker data over the
  bridge), and within one worker host (its loopback: workers of one host fetch each other's
  results through ``lo``). The split comes from the interface counters: every byte between
  the worker hosts crosses both worker hosts' eth0 and no other, every byte between a worker
  and the broker crosses one worker host's eth0 and the broker's, and the broker's traffic
  with the client is the client host's eth0; so between workers = (w1 + w2 - (broker -
  client)) / 2, headers included;
- false worker losses (the broker's ``worker ... lost`` log lines; nothing is killed here) and
  the retries the request's stats count.

    python -m benchmarks.crosshost --label before --data-plane off
    python -m benchmarks.crosshost --rates 1gbit --sizes 16MiB --label after

``--data-plane on|off`` is passed to the broker (default: on).

Needs root (``ip netns``, ``tc``). Writes benchmarks/results/crosshost.json, keeping the other
labels' runs (docs/benchmarks.md quotes "before" and "after"). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import plane_args, save_labelled
from chords_mq.apps.bench import machine_info, process_cpu_seconds
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

    def __init__(
        self, root: Path, workers_per_host: int, latency_ms: float, broker_args: list[str]
    ) -> None:
        self.net = Network(f"cmqx{os.getpid()}", SUBNET, HOSTS, root / "logs")
        self.workers_per_host = workers_per_host
        self.latency_ms = latency_ms
        self.broker_args = broker_args
        self.log_args: list[str] = []
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
                *self.broker_args,
                *self.log_args,
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
                        *self.log_args,
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

    def loopback_sent(self, host: str) -> int:
        """Bytes ``host``'s lo has carried so far (sent; each byte also counts as received)."""
        out = subprocess.run(
            ["ip", "-n", self.net.ns(host), "-s", "-j", "link", "show", "lo"],
            capture_output=True,
            text=True,
            timeout=15,
            check=True,
        ).stdout
        return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds so far of the broker and of all the workers together (every thread)."""
        workers = [p for h in WORKER_HOSTS for p in self.net.alive(h)]
        return {
            "broker": sum(process_cpu_seconds(p.pid) for p in self.net.alive("broker")),
            "workers": sum(process_cpu_seconds(p.pid) for p in workers),
        }

    def run(self, spec: RequestSpec, out: Path) -> dict[str, Any]:
        assert self.agent is not None
        cpu_before = self.cpu_seconds()
        before = {host: self.net.counters(host) for host in HOSTS}
        lo_before = {host: self.loopback_sent(host) for host in WORKER_HOSTS}
        lost = self.losses()
        self.agent.call(
            "run", 900, specs=[spec.to_dict()], out=str(out), timeout=600, latents=False
        )
        after = {host: self.net.counters(host) for host in HOSTS}
        lo_after = {host: self.loopback_sent(host) for host in WORKER_HOSTS}
        cpu_after = self.cpu_seconds()
        moved = {
            host: (after[host]["rx"] - before[host]["rx"])
            + (after[host]["tx"] - before[host]["tx"])
            for host in HOSTS
        }
        worker_hosts = sum(moved[h] for h in WORKER_HOSTS)
        workers_broker = moved["broker"] - moved["client"]
        (request,) = json.loads(out.read_text())["requests"]
        hits = request["hits"]
        return {
            "wall_s": hits[-1]["at_s"],
            "round": hits[-1]["round"],
            "core": hits[-1]["core"],
            "hits": len(hits),
            "evaluations": request["stats"].get("evaluations"),
            "retries": request["stats"].get("retries"),
            "pushes": request["stats"].get("pushes"),
            "pushed_inputs": request["stats"].get("pushed_inputs"),
            "hit_parts": request["stats"].get("hit_parts"),
            "broker_bytes": moved["broker"],
            "worker_host_bytes": worker_hosts,
            "workers_broker_bytes": workers_broker,
            "between_worker_hosts_bytes": max(0, worker_hosts - workers_broker) // 2,
            "within_worker_hosts_bytes": sum(lo_after[h] - lo_before[h] for h in WORKER_HOSTS),
            "false_losses": self.losses() - lost,
            "compute_s": request["stats"].get("compute_s"),
            "broker_cpu_s": cpu_after["broker"] - cpu_before["broker"],
            "workers_cpu_s": cpu_after["workers"] - cpu_before["workers"],
        }

    def close(self) -> None:
        if self.agent is not None:
            self.agent.stop()
        self.net.close()


def measure(
    pool: Pool,
    rate: str,
    size: str,
    steps: int,
    cores: int,
    latency_s: float,
    scratch: Path,
    field: str = "linear",
    warmup: int = 1,
) -> dict[str, Any]:
    latent = SIZES[size]
    params = {"shape": [latent // 4], "dtype": "float32", "field": field}
    sequential = RequestSpec("synthetic", method="sequential", steps=steps, params=params)
    chords = RequestSpec(
        "synthetic", cores=cores, exact_cores=True, stop="core-index:1", steps=steps, params=params
    )
    # Unmeasured CHORDS requests first: every worker's first forward of this size, its first
    # x0, the broker's first request of the run (cold: 0.3 to 0.5 s more than warm here)
    warm = [
        pool.run(chords, scratch / f"{rate}-{size}-warmup{i}.json")["wall_s"] for i in range(warmup)
    ]
    seq = pool.run(sequential, scratch / f"{rate}-{size}-seq.json")
    cho = pool.run(chords, scratch / f"{rate}-{size}-chords.json")
    round_speedup = steps / cho["round"]
    speedup = seq["wall_s"] / cho["wall_s"]
    row = {
        "rate": rate,
        "latent": size,
        "latent_bytes": latent,
        "warmup_chords_s": [round(w, 3) for w in warm],
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
        "sequential_workers_broker_latents": round(seq["workers_broker_bytes"] / latent, 2),
        "sequential_between_worker_hosts_latents": round(
            seq["between_worker_hosts_bytes"] / latent, 2
        ),
        "sequential_within_worker_hosts_latents": round(
            seq["within_worker_hosts_bytes"] / latent, 2
        ),
        "chords_workers_broker_latents": round(cho["workers_broker_bytes"] / latent, 2),
        "chords_between_worker_hosts_latents": round(cho["between_worker_hosts_bytes"] / latent, 2),
        "chords_within_worker_hosts_latents": round(cho["within_worker_hosts_bytes"] / latent, 2),
        "chords_evaluations": cho["evaluations"],
        "false_losses": seq["false_losses"] + cho["false_losses"],
        "sequential_compute_s": seq["compute_s"],
        "chords_compute_s": cho["compute_s"],
        "sequential_workers_cpu_s": round(seq["workers_cpu_s"], 2),
        "chords_workers_cpu_s": round(cho["workers_cpu_s"], 2),
        "sequential_broker_cpu_s": round(seq["broker_cpu_s"], 2),
        "chords_broker_cpu_s": round(cho["broker_cpu_s"], 2),
        "loadavg_1min": round(os.getloadavg()[0], 2),
        "retries": (seq["retries"] or 0) + (cho["retries"] or 0),
        "chords_pushes": cho["pushes"],  # results pushed to a reader's worker (asked)
        "chords_pushed_inputs": cho["pushed_inputs"],  # inputs named pushed to their worker
        # pieces of hits' latents the broker sent on to the client as they arrived
        "sequential_hit_parts": seq["hit_parts"],
        "chords_hit_parts": cho["hit_parts"],
    }
    print(
        f"{rate:>6} {size:>6}  seq {row['sequential_s']:7.2f}s ({row['sequential_over_ideal']:.2f}"
        f"x ideal)  chords {row['chords_s']:6.2f}s  speedup {row['speedup']:.2f} / "
        f"{row['round_speedup']:.2f} = {row['speedup_over_round_speedup']:.2f}  broker "
        f"seq {row['sequential_broker_latents']:.1f} chords {row['chords_broker_latents']:.1f} "
        f"latents  between worker hosts seq {row['sequential_between_worker_hosts_latents']:.1f}"
        f" chords {row['chords_between_worker_hosts_latents']:.1f}  within "
        f"{row['chords_within_worker_hosts_latents']:.1f}  lost {row['false_losses']}  workers' "
        f"CPU seq {row['sequential_workers_cpu_s']:.1f}s chords {row['chords_workers_cpu_s']:.1f}s"
        f"  pushes {row['chords_pushes']} (read {row['chords_pushed_inputs']})  hit parts seq "
        f"{row['sequential_hit_parts']} chords {row['chords_hit_parts']}",
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
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="unmeasured CHORDS requests of each size before its measured pair (default 1: a "
        "pool that has served before; 0: the measured sequential request meets cold workers, "
        "as every run before 2026-12-07d did)",
    )
    parser.add_argument(
        "--field",
        choices=["linear", "analytic"],
        default="linear",
        help="the synthetic model's field: linear costs one pass over the latent, so 8 workers"
        " on a few host cores measure the links, not the field's host-CPU cost (analytic: about"
        " 20 ms per 16 MiB forward; the runs before 2026-12-06 used it)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--data-plane",
        choices=["on", "off"],
        default=None,
        help="passed to the broker (default: on where chords-broker has the option)",
    )
    parser.add_argument(
        "--verify",
        choices=["off", "sample", "all"],
        default="off",
        help="the broker's --verify (default off: this measures the transport; with sample, "
        "every task of these new workers would be replicated)",
    )
    parser.add_argument(
        "--link-placement",
        choices=["on", "off"],
        default="on",
        help="the broker's --link-placement (on, its default) or --no-link-placement",
    )
    parser.add_argument(
        "--push",
        choices=["on", "off"],
        default="on",
        help="the broker's --push (on, its default: a result another core reads goes to that "
        "core's worker on the other host as soon as it exists) or --no-push (readers pull)",
    )
    parser.add_argument(
        "--push-local",
        choices=["on", "off"],
        default="on",
        help="the broker's --push-local (on, its default: pushed to readers on the same host "
        "too) or --no-push-local (across hosts only)",
    )
    parser.add_argument(
        "--hit-parts",
        choices=["on", "off"],
        default="on",
        help="the broker's --hit-parts (on, its default: a hit's latent sent on to the client "
        "in pieces as they arrive) or --no-hit-parts (whole: the second hop after the first)",
    )
    parser.add_argument(
        "--chain",
        type=int,
        default=None,
        help="the broker's --chain (a core's steps per EVAL; 1: none; default: the broker's)",
    )
    parser.add_argument(
        "--keep-logs",
        type=Path,
        default=None,
        help="copy the daemons' logs and each request's hits and stats to this folder",
    )
    parser.add_argument(
        "--log-level", default=None, help="the broker's and workers' --log-level (e.g. debug)"
    )
    args = parser.parse_args()
    plane = args.data_plane or "on"
    broker_args = [*plane_args(plane), "--verify", args.verify]
    if plane == "on":
        broker_args.append(
            "--link-placement" if args.link_placement == "on" else "--no-link-placement"
        )
        broker_args.append("--push" if args.push == "on" else "--no-push")
        broker_args.append("--hit-parts" if args.hit_parts == "on" else "--no-hit-parts")
        broker_args.append("--push-local" if args.push_local == "on" else "--no-push-local")
    if args.chain is not None:
        broker_args += ["--chain", str(args.chain)]
    sizes = [s for s in args.sizes.split(",") if s]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown sizes {unknown}; choose from {list(SIZES)}")
    rates = [r for r in args.rates.split(",") if r]

    rows = []
    load_at_start = os.getloadavg()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="crosshost-") as tmp:
        pool = Pool(Path(tmp), args.workers_per_host, args.latency_ms, broker_args)
        if args.log_level is not None:
            pool.log_args = ["--log-level", args.log_level]
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
                            args.field,
                            args.warmup,
                        )
                    )
        finally:
            pool.close()
            if args.keep_logs is not None:
                shutil.copytree(tmp, args.keep_logs, dirs_exist_ok=True)
    result = {
        "machine": machine_info(),
        "commit": os.popen("git rev-parse --short HEAD").read().strip(),
        "steps": args.steps,
        "cores": args.cores,
        "latency_ms": args.latency_ms,
        "field": args.field,
        "warmup": args.warmup,
        "workers": {host: args.workers_per_host for host in WORKER_HOSTS},
        "data_plane": plane,
        "verify": args.verify,
        "link_placement": args.link_placement if plane == "on" else None,
        "push": args.push if plane == "on" else None,
        "loadavg_at_start": [round(x, 2) for x in load_at_start],
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "seconds": round(time.monotonic() - started, 1),
        "rows": rows,
    }
    save_labelled(args.out, args.label, result)


if __name__ == "__main__":
    main()
