"""A 1 GiB latent over the broker's budget: how much the broker's memory grows before it refuses
the request (``too_large``), and how long the refusal takes (issue 26: "a 1 GiB latent over
budget is refused before the broker's RSS grows by more than 1 latent").

A real broker (default ``--max-request-bytes``, 8 GiB) gets a CHORDS K=4 request of the
synthetic model whose params make a 1 GiB float32 latent (its working set is about 18 of them).
Two workers are tried, each alone in the pool:

- ``honest``: a real ``chords-worker``. Its PREPARED declares the latent's shape and dtype and,
  as the PREPARE's ``max_latent_bytes`` tells it, keeps x0 at home.
- ``forced``: a fake worker in this process that declares the same latent and sends the 1 GiB
  x0 all the same (a worker of an older protocol, or one that ignores the limit). The broker
  still refuses from the declaration, without reading the tensor; what it costs is the frames'
  receipt.

Each with the data plane on and off. The broker's RSS growth is ``VmHWM`` above its idle
``VmRSS`` (``/proc/PID/clear_refs`` resets the high-water mark, as benchmarks/big_latents.py).
The time is from SUBMIT to the ``too_large`` error at the client (the honest worker's own
PREPARE, drawing the 1 GiB x0 and its digest, included).

    python -m benchmarks.oversize

Prints a table and writes benchmarks/results/oversize.json. Not a test: nothing asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import zmq

from benchmarks.common import outcome, plane_args
from chords_mq import __version__
from chords_mq.apps.bench import machine_info
from chords_mq.apps.cluster import LocalCluster
from chords_mq.request import RequestSpec
from chords_mq.solvers import flow_match_euler, solver_spec
from chords_mq.transport import decode_frames, send_now
from chords_mq.wire import (
    PROTOCOL_VERSION,
    HeartbeatMessage,
    HelloMessage,
    PreparedMessage,
    PrepareMessage,
    SolverSpec,
    WelcomeMessage,
    encode,
    tensor_digest,
)

RESULTS = Path(__file__).resolve().parent / "results" / "oversize.json"
MIB = 1 << 20
SHAPE = [256, 1024, 1024]  # float32: 1 GiB, the synthetic model's and a frame's largest
LATENT = 4 * math.prod(SHAPE)


def status_bytes(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


class ForcedWorker(threading.Thread):
    """A worker that declares its latent and sends x0 whatever the PREPARE's limit says."""

    def __init__(self, address: str) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.stopping = threading.Event()
        self.sent_x0 = 0
        self.x0 = torch.zeros(SHAPE)  # drawn before it registers: it answers at once
        self.digest = tensor_digest(self.x0)

    def run(self) -> None:
        ctx: zmq.Context[Any] = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, b"worker/forced")
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.address)
        hello = HelloMessage(
            worker="forced",
            model="synthetic",
            device="cpu",
            dtype="float32",
            max_batch=1,
            version=__version__,
            protocol=PROTOCOL_VERSION,
            capabilities=["eval", "decode"],
            session="forced-1",
            data="tcp://127.0.0.1:9",
        )
        epoch = 0
        x0, digest = self.x0, self.digest
        fields, tensors = solver_spec(flow_match_euler(torch.linspace(1, 0, 21)))
        try:
            while not self.stopping.is_set():
                if epoch == 0:
                    send_now(sock, hello)
                elif sock.poll(0) == 0:
                    send_now(sock, HeartbeatMessage(epoch=epoch))
                if sock.poll(100) == 0:
                    continue
                message = decode_frames(sock.recv_multipart(copy=False))
                if isinstance(message, WelcomeMessage):
                    epoch = message.epoch
                elif isinstance(message, PrepareMessage):
                    prepared = PreparedMessage(
                        solver=SolverSpec(fields, tensors),
                        x0_digest=digest,
                        x0=x0 if message.initial else None,
                        shape=SHAPE,
                        dtype="float32",
                        result_dtype="float32",
                    ).ids(message)
                    self.sent_x0 += message.initial
                    sock.send_multipart(list(encode(prepared)))
        finally:
            sock.close(0)
            ctx.term()


def refuse(address: str, pid: int) -> dict[str, Any]:
    """Submit the 1 GiB request; the broker's RSS growth and the time to ``too_large``."""
    spec = RequestSpec("synthetic", cores=4, steps=20, params={"shape": SHAPE, "dtype": "float32"})
    idle = status_bytes(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS

    code, seconds = asyncio.run(outcome(address, spec))
    peak = status_bytes(pid, "VmHWM")
    return {
        "code": code,
        "seconds": round(seconds, 3),
        "broker_idle_rss_mib": round(idle / MIB, 1),
        "broker_growth_mib": round((peak - idle) / MIB, 1),
        "broker_growth_latents": round((peak - idle) / LATENT, 3),
    }


def run(worker: str, plane: str, logs: Path) -> dict[str, Any]:
    args = plane_args(plane)
    with LocalCluster(
        workers=1 if worker == "honest" else 0, log_dir=logs, extra_broker_args=args
    ) as cluster:
        assert cluster.broker is not None
        forced = None
        if worker == "forced":
            forced = ForcedWorker(cluster.worker_address)
            forced.start()
            cluster.wait_for_workers(1, timeout=60)
        try:
            row = {
                "worker": worker,
                "data_plane": plane,
                **refuse(cluster.client_address, cluster.broker.pid),
            }
        finally:
            if forced is not None:
                forced.stopping.set()
                forced.join(10)
        if forced is not None:
            row["x0_sent"] = forced.sent_x0
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--workers", nargs="+", default=["honest", "forced"])
    parser.add_argument("--logs", type=Path, default=None, help="keep the daemons' logs here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        logs = args.logs or Path(scratch)
        for worker in args.workers:
            for plane in ("on", "off"):
                rows.append(run(worker, plane, logs / f"{worker}-{plane}"))
                print(rows[-1], flush=True)
    print("\n1 GiB latent, --max-request-bytes 8 GiB, CHORDS K=4 (working set ~18 latents)")
    print(f"{'worker':>8} {'plane':>6} {'refusal':>10} {'seconds':>8} {'RSS growth':>18}")
    for row in rows:
        growth = f"{row['broker_growth_mib']:.0f} MiB ({row['broker_growth_latents']:.2f})"
        print(
            f"{row['worker']:>8} {row['data_plane']:>6} {row['code']:>10} "
            f"{row['seconds']:>8.2f} {growth:>18}"
        )
    result = {
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "latent_bytes": LATENT,
        "shape": SHAPE,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
