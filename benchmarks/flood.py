"""Malformed-message flood: does the broker keep serving valid requests, bitwise, in bounded
memory and log?

A real broker and 2 synthetic workers (2 ms per forward) run. First 4 valid CHORDS requests
(N = 50, K = 4, seeds 0..3) run one after another on the quiet cluster; their hits (core,
round, latent bytes) are the reference. Then two sender processes, one per broker port (client
and worker), each send ``--messages`` malformed messages from raw pyzmq DEALER sockets: random
bytes, empty frames, truncated msgpack, msgpack that is not a map, headers of unknown kinds,
missing fields or wrong types, a header over 64 KiB, headers declaring tensors without frames,
well-formed worker messages (RESULT, PREPARED, ...) from unregistered ids and client messages
about requests that do not exist. Sends are non-blocking (a full queue counts as a drop); three
sockets per port drain what the broker answers, two of them reconnecting under new routing ids
as they go (every 2000 and every 250 sends by default; ``--reconnect-every``), and one never
reads. While the flood runs, the same 4 requests run again and a second client calls STATUS
every half second. Afterwards the broker's RSS is polled for up to 10 s. Should the broker
process die, the flood stops, the request in flight is recorded as "broker_died" and the run
ends with what it measured; every wait, the client's included, has a bound.

Reported: whether each request's hits are bitwise the reference, request and STATUS latencies,
the broker's RSS growth (peak during the flood, and after it) over its RSS just before the flood
(after the reference requests), its log's growth over the same span, messages sent and retried
per port, and whether the broker is still alive (else its exit code and its log's last lines).
Targets: bitwise True, RSS growth <= 10 MB, log growth <= 1 MB.

Prints a table and writes benchmarks/results/flood.json. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import multiprocessing
import queue
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import torch
import zmq

from chords_mq.apps.bench import RssSampler, machine_info, reset_peak, run_bounded, status_bytes
from chords_mq.apps.cluster import LocalCluster
from chords_mq.client import AsyncClient, RequestFailed, RequestTimeout
from chords_mq.request import RequestSpec
from chords_mq.wire import (
    DTYPE_NAMES,
    PROTOCOL_VERSION,
    CancelMessage,
    DecodedMessage,
    DisconnectMessage,
    FailedMessage,
    HeartbeatMessage,
    Message,
    PreparedMessage,
    ResultEntry,
    ResultMessage,
    SolverSpec,
    SubmitMessage,
    WireError,
    decode,
    encode,
)

RESULTS = Path(__file__).resolve().parent / "results" / "flood.json"
MB = 1e6
SEEDS = (0, 1, 2, 3)
STEPS, CORES = 50, 4
TARGET_RSS_MB = 10.0
TARGET_LOG_BYTES = 1 << 20
READERS = 3  # sockets per port that drain the broker's answers; one more never reads
# per reader: sends before it reconnects under a new id (0: never; the first one never does)
RECONNECT_EVERY = (0, 2000, 250)
SETTLE_S = 10.0  # how long RSS is polled after the flood
_T0 = time.monotonic()


def say(text: str) -> None:
    """Progress on stderr, so a slow run shows where it is."""
    print(f"[{time.monotonic() - _T0:7.1f} s] {text}", file=sys.stderr, flush=True)


# -- broker observations ------------------------------------------------------------------------


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# -- the malformed messages -----------------------------------------------------------------------


def _header(**fields: Any) -> dict[str, Any]:
    header: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "kind": "STATUS",
        "epoch": 0,
        "req": None,
        "task": None,
        "attempt": None,
        "tensors": [],
        "body": {},
    }
    header.update(fields)
    return header


def _pack(value: Any) -> bytes:
    return bytes(msgpack.packb(value, use_bin_type=True))


def _frames(message: Message) -> list[bytes]:
    """``message`` as the wire encodes it: well formed, for the broker to refuse by its meaning
    (a stray id, a kind from the wrong side)."""
    return [bytes(frame) for frame in encode(message)]


def _raw(tensors: dict[str, torch.Tensor] | None = None, **fields: Any) -> list[bytes]:
    """A header packed by hand (``fields`` as ``_header`` takes them) and the raw frames of
    ``tensors``: a malformed message, which the wire's typed messages cannot hold."""
    specs, frames = [], []
    for name, tensor in (tensors or {}).items():
        specs.append([name, DTYPE_NAMES[tensor.dtype], list(tensor.shape)])
        frames.append(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return [_pack(_header(tensors=specs, **fields)), *frames]


def _bogus_id(rng: random.Random) -> str:
    return f"no-such-request-{rng.getrandbits(48):012x}"


def build_pool(rng: random.Random) -> dict[str, list[list[bytes]]]:
    """Every category's variants: each a list of frames (the DEALER adds the routing id)."""
    latent = torch.zeros(4, 8, 8)
    valid_headers = [
        _frames(SubmitMessage(spec={"model": "synthetic"}, request="r-1"))[0],
        _frames(
            ResultMessage(
                entries=(ResultEntry(0, 0, {1: latent}),),
                compute_s=0.001,
                request="r-2",
                task=0,
                attempt=0,
            )
        )[0],
        _frames(HeartbeatMessage(in_flight=["a", "b", "c"]))[0],
    ]
    pool: dict[str, list[list[bytes]]] = {}
    pool["random_bytes"] = [
        [rng.randbytes(rng.randint(1, 600)) for _ in range(rng.choice((1, 1, 1, 2, 3)))]
        for _ in range(64)
    ]
    pool["empty_frames"] = [[b""], [b"", b""], [b""] * 5, [b"", _pack(_header())]]
    pool["truncated_msgpack"] = [
        [header[: rng.randint(1, len(header) - 1)]] for header in valid_headers for _ in range(16)
    ]
    pool["non_map"] = [
        [_pack(value)]
        for value in ([1, 2, 3], "STATUS", 7, None, b"\x00\x01", 3.5, True, [_header()])
    ]
    pool["unknown_kind"] = [
        [_pack(_header(kind=kind))]
        for kind in ("FROB", "", "status", "HELLO2", "X" * 200, "EVAL ", "DONE\x00")
    ] + [[_pack(_header(kind=7))], [_pack(_header(kind=None))]]
    missing = []
    for key in _header():
        header = _header()
        del header[key]
        missing.append([_pack(header)])
    missing += [
        [_pack({**_header(), "extra": 1})],
        [_pack(_header(kind="SUBMIT", req="r-3"))],  # body lacks "request"
        [_pack(_header(kind="RESULT", req="r-4", task=0, attempt=0))],  # body lacks "tasks"
        [_pack(_header(kind="HELLO", body={"worker": "w"}))],
        [_pack(_header(kind="FAILED", body={"code": "x"}))],
        [_pack({})],
    ]
    pool["missing_fields"] = missing
    pool["wrong_types"] = [
        [_pack(_header(**fields))]
        for fields in (
            {"v": "2"},
            {"v": 1},
            {"v": None},
            {"epoch": -1},
            {"epoch": "e"},
            {"epoch": 1.5},
            {"req": 123},
            {"req": "a request id with spaces"},
            {"req": "x" * 200},
            {"task": -1},
            {"attempt": "a"},
            {"tensors": "latent"},
            {"tensors": [["latent", "float32"]]},
            {"body": [1, 2]},
            {"body": "body"},
            {"kind": "SUBMIT", "req": "r-5", "body": {"request": "synthetic"}},
            {"kind": "SUBMIT", "req": "r-6", "body": {"request": {"model": 5}}},
            {
                "kind": "HELLO",
                "body": {
                    "worker": 1,
                    "model": [],
                    "device": 0,
                    "dtype": None,
                    "max_batch": "1",
                    "version": 2,
                },
            },
            {"kind": "RESULT", "req": "r-7", "task": 0, "attempt": 0, "body": {"tasks": "x"}},
            {"kind": "HIT", "body": {"core": "1", "round": 1.5, "steps": None, "elapsed_s": "0"}},
            {"body": {"nested": [[[[[[[[[[[[1]]]]]]]]]]]]}},
            {"body": {"blob": b"\x00" * 16}},
        )
    ] + [[_pack({1: 2, "kind": "STATUS"})]]
    big = "x" * (70 * 1024)
    pool["oversized_header"] = [
        [_pack(_header(body={"pad": big}))],
        [_pack(_header(kind="SUBMIT", req="r-8", body={"request": {"model": big}}))],
    ]
    pool["tensors_without_frames"] = [
        [
            _pack(
                _header(
                    kind="RESULT",
                    req="r-9",
                    task=0,
                    attempt=0,
                    body={"tasks": [[0, 0, [1]]]},
                    tensors=[["result.0.0", "float32", [4]]],
                )
            )
        ],
        [_pack(_header(tensors=[["a", "float32", [4]], ["b", "float32", [4]]])), b"\x00" * 16],
        [_pack(_header(tensors=[["a", "float32", [4]]])), b"\x00" * 15],  # wrong frame size
        [_pack(_header(tensors=[["a", "int64", [2]]])), b"\x00" * 16],  # dtype not allowed
        [_pack(_header(tensors=[["a", "float32", [1 << 40, 1 << 40]]])), b""],
        [_pack(_header(tensors=[["a", "float32", [-1]]])), b""],
        [_pack(_header(tensors=[["bad name", "float32", [1]]])), b"\x00" * 4],
        [
            _pack(_header(tensors=[["a", "float32", [1]], ["a", "float32", [1]]])),
            b"\0" * 4,
            b"\0" * 4,
        ],
        [_pack(_header()), b"\x00" * 64],  # a frame nobody declared
    ]
    pool["worker_kind_unregistered"] = [
        _frames(
            ResultMessage(
                entries=(ResultEntry(rng.randint(0, 99), 0, {rng.randint(1, 49): latent}),),
                compute_s=0.001,
                epoch=rng.getrandbits(40),
                request=_bogus_id(rng),
                task=rng.randint(0, 99),
                attempt=0,
            )
        )
        for _ in range(8)
    ] + [
        _frames(
            PreparedMessage(solver=SolverSpec({}, {}), x0_digest="0" * 64, request=_bogus_id(rng))
        ),
        # no x0_digest: malformed, so packed by hand
        _raw(
            {"x0": latent},
            kind="PREPARED",
            req=_bogus_id(rng),
            body={"solver": {}, "prepare_s": 0.1},
        ),
        _frames(
            FailedMessage(
                code="oom",
                message="no",
                tasks=((1, 0),),
                request=_bogus_id(rng),
                task=1,
                attempt=0,
            )
        ),
        _frames(
            DecodedMessage(
                media=torch.zeros(4, dtype=torch.uint8), compute_s=0.1, request=_bogus_id(rng)
            )
        ),
        _frames(HeartbeatMessage()),
        _frames(DisconnectMessage(reason="flood")),
    ]
    invalid_specs = [{"bogus": 1}, {"model": "synthetic", "cores": "4"}, {"steps": 10}]
    pool["client_bogus_request"] = (
        [_frames(CancelMessage(request=_bogus_id(rng))) for _ in range(4)]
        + [_frames(SubmitMessage(spec=spec, request=_bogus_id(rng))) for spec in invalid_specs]
        + [
            _frames(SubmitMessage(spec={"model": "synthetic"})),  # no request id
            _frames(HeartbeatMessage(in_flight=[_bogus_id(rng)], request=_bogus_id(rng))),
            [_pack(_header(kind="CANCEL", req="y" * 129))],  # an id over the 128-character limit
            [_pack(_header(kind="CANCEL", req="bad\nid"))],
        ]
    )
    return pool


# weight per category (the oversized header moves 70 KiB a message: rarer)
WEIGHTS = {
    "random_bytes": 4,
    "empty_frames": 4,
    "truncated_msgpack": 4,
    "non_map": 4,
    "unknown_kind": 4,
    "missing_fields": 4,
    "wrong_types": 4,
    "oversized_header": 1,
    "tensors_without_frames": 4,
    "worker_kind_unregistered": 4,
    "client_bogus_request": 4,
}


def pool_summary(pool: dict[str, list[list[bytes]]]) -> dict[str, dict[str, int]]:
    """Per category: variants, and how many of them this build's wire decodes (well-formed
    messages the broker must refuse by their meaning: stray ids, kinds from the wrong side)."""
    summary = {}
    for name, variants in pool.items():
        decodes = 0
        for frames in variants:
            with contextlib.suppress(WireError):
                decode(frames)
                decodes += 1
        summary[name] = {"variants": len(variants), "decode": decodes}
    return summary


# -- the sender process -------------------------------------------------------------------------


def _dealer(ctx: zmq.Context[Any], address: str, identity: bytes) -> zmq.Socket[Any]:
    sock: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, identity)
    sock.setsockopt(zmq.SNDHWM, 1000)
    sock.setsockopt(zmq.RCVHWM, 1000)
    sock.connect(address)
    return sock


def _drain(sock: zmq.Socket[Any], limit: int = 256) -> int:
    got = 0
    for _ in range(limit):
        try:
            sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            break
        got += 1
    return got


def flood_sender(
    address: str,
    port: str,
    messages: int,
    seed: int,
    time_limit: float,
    reconnect_every: tuple[int, ...],
    ready: Any,
    go: Any,
    abort: Any,
    results: Any,
) -> None:
    """One port's flood (a child process): sends, drains, reports a dict on ``results``.
    ``abort`` (set when the broker died) ends it early."""
    rng = random.Random(seed)
    pool = build_pool(rng)
    names = list(WEIGHTS)
    schedule = rng.choices(names, weights=[WEIGHTS[n] for n in names], k=8192)
    picks = [rng.randrange(len(pool[name])) for name in schedule]
    ctx: zmq.Context[Any] = zmq.Context()
    generation = [0] * READERS
    identities: set[bytes] = set()

    def identity(index: int) -> bytes:
        name = f"flood/{port}/{index}/{generation[index] if index < READERS else 'mute'}"
        identities.add(name.encode())
        return name.encode()

    readers = [_dealer(ctx, address, identity(i)) for i in range(READERS)]
    mute = _dealer(ctx, address, identity(READERS))  # never reads
    sockets = [*readers, mute]
    sent = retried = replies = reconnects = 0
    per_reader_sent = [0] * READERS
    by_category = {name: 0 for name in names}
    ready.set()
    go.wait(120)
    started = time.monotonic()
    stopped_early = aborted = False
    try:
        # Every one of ``messages`` is delivered to the broker's socket: a send refused at the
        # high-water mark (counted as "retried", i.e. retried) is tried again on the next turn.
        for i in range(messages * 20):
            if sent >= messages:
                break
            if i % 256 == 0:
                if abort.is_set():
                    aborted = True
                    break
                if time.monotonic() - started > time_limit:
                    stopped_early = True
                    break
            slot = i % len(sockets)
            sock = sockets[slot]
            name = schedule[i % len(schedule)]
            frames = pool[name][picks[i % len(picks)]]
            try:
                sock.send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.Again:
                retried += 1
                sock.poll(1, zmq.POLLOUT)  # back off a millisecond instead of spinning
            else:
                sent += 1
                by_category[name] += 1
                if slot < READERS:
                    per_reader_sent[slot] += 1
            if i % 16 == 0:
                replies += sum(_drain(reader) for reader in sockets[:READERS])
            every = reconnect_every[slot] if slot < READERS else 0
            if every and per_reader_sent[slot] >= every:
                per_reader_sent[slot] = 0
                replies += _drain(sock)
                sock.close(0)
                generation[slot] += 1
                sockets[slot] = _dealer(ctx, address, identity(slot))
                reconnects += 1
        elapsed = time.monotonic() - started
        settle = time.monotonic() + 0.5  # the last answers
        while time.monotonic() < settle:
            got = sum(_drain(reader) for reader in sockets[:READERS])
            replies += got
            if not got:
                time.sleep(0.02)
        mute_pending = _drain(sockets[READERS], limit=100_000)
    finally:
        for sock in sockets:
            sock.close(0)
        ctx.term()
    results.put(
        {
            "port": port,
            "attempted": sent + retried,
            "sent": sent,
            "retried": retried,
            "replies_read": replies,
            "mute_socket_replies_pending": mute_pending,
            "reconnects": reconnects,
            "routing_ids": len(identities),
            "seconds": round(elapsed, 3),
            "rate_per_s": round((sent + retried) / elapsed) if elapsed > 0 else None,
            "stopped_early": stopped_early,
            "aborted_broker_died": aborted,
            "sent_by_category": by_category,
        }
    )


# -- the valid requests ---------------------------------------------------------------------------


def spec_for(seed: int) -> RequestSpec:
    return RequestSpec("synthetic", method="chords", steps=STEPS, cores=CORES, seed=seed)


def hit_digest(latent: torch.Tensor | None) -> tuple[str, list[int], str]:
    if latent is None:
        return ("none", [], "")
    data = latent.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
    return (str(latent.dtype), list(latent.shape), hashlib.sha256(data).hexdigest())


async def run_request(
    client: AsyncClient, seed: int, timeout: float, tag: str, alive: Callable[[], bool]
) -> dict[str, Any]:
    """One valid request: its outcome, latency and hits as (core, round, dtype, shape, sha256).

    It ends early, as "broker_died", when the broker process is gone; "hung" if the stream
    ignored its own timeout by 10 s. Neither waits for the stream's clean-up.
    """
    started = time.perf_counter()
    hits: list[tuple[int, int, str, list[int], str]] = []

    async def collect() -> None:
        stream = client.submit(spec_for(seed), timeout=timeout, request_id=f"flood-{tag}-{seed}")
        async for hit in stream:
            hits.append((hit.core, hit.round, *hit_digest(hit.latent)))

    outcome: str | None = None
    if not alive():
        outcome = "broker_died"
    else:
        task = asyncio.ensure_future(collect())
        give_up = time.monotonic() + timeout + 10.0
        while outcome is None:
            await asyncio.wait({task}, timeout=0.2)
            if task.done():
                error = None if task.cancelled() else task.exception()
                if error is None:
                    outcome = "done"
                elif isinstance(error, RequestFailed):
                    outcome = f"failed:{error.code}"
                elif isinstance(error, RequestTimeout):
                    outcome = "timeout"
                else:  # a benchmark records, it does not stop
                    outcome = f"error:{type(error).__name__}"
            elif not alive():
                outcome = "broker_died"
                task.cancel()
            elif time.monotonic() > give_up:
                outcome = "hung"
                task.cancel()
    say(f"{tag} request seed {seed}: {outcome} in {time.perf_counter() - started:.3f} s")
    return {
        "seed": seed,
        "outcome": outcome,
        "latency_s": round(time.perf_counter() - started, 4),
        "finished_at": time.monotonic(),
        "hits": sorted(hits),
    }


async def poll_status(
    address: str,
    stop: asyncio.Event,
    alive: Callable[[], bool],
    latencies: list[float | None],
    limit: int = 2000,
) -> None:
    """STATUS every half second until ``stop`` or the broker is gone; each latency in seconds,
    None for a timeout (10 s)."""
    async with AsyncClient(address) as client:
        for _ in range(limit):
            if stop.is_set() or not alive():
                break
            started = time.perf_counter()
            try:
                await client.status(timeout=10.0)
                latencies.append(time.perf_counter() - started)
            except RequestTimeout:
                latencies.append(None)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)


async def run_requests(
    address: str, timeout: float, tag: str, alive: Callable[[], bool], runs: list[dict[str, Any]]
) -> None:
    """The 4 requests, one after another, on one client."""
    async with AsyncClient(address) as client:
        for seed in SEEDS:
            runs.append(await run_request(client, seed, timeout, tag, alive))


async def flood_run(
    address: str,
    timeout: float,
    flood_done: threading.Event,
    alive: Callable[[], bool],
    runs: list[dict[str, Any]],
    latencies: list[float | None],
) -> None:
    """The 4 requests and the STATUS poller while the flood runs; STATUS goes on until the
    flood is over (the watcher sets ``flood_done`` within the flood's own time limit)."""
    stop = asyncio.Event()
    poller = asyncio.create_task(poll_status(address, stop, alive, latencies))
    try:
        await run_requests(address, timeout, "during", alive, runs)
        while not flood_done.is_set() and not poller.done():
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.wait({poller}, timeout=15)


# -- the benchmark --------------------------------------------------------------------------------


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def bench(
    messages: int,
    flood_timeout: float,
    request_timeout: float,
    reconnect_every: tuple[int, ...] = RECONNECT_EVERY,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="chords-flood-") as scratch:
        log_dir = Path(scratch)
        cluster = LocalCluster(workers=2, latency_ms=2.0, log_dir=log_dir)
        senders: list[Any] = []
        abort: Any = None
        try:
            cluster.start()
            broker = cluster.broker
            assert broker is not None
            pid = broker.pid

            def alive() -> bool:
                return broker.poll() is None

            broker_log = log_dir / "broker.log"
            time.sleep(0.5)
            startup_rss = status_bytes(pid, "VmRSS") or 0
            startup_log = file_size(broker_log)
            reference: list[dict[str, Any]] = []
            phase_s = len(SEEDS) * (request_timeout + 15.0) + 30.0
            if not run_bounded(
                lambda: run_requests(
                    cluster.client_address, request_timeout, "reference", alive, reference
                ),
                phase_s,
            ):
                say("the reference requests did not finish in time")
            if len(reference) < len(SEEDS) or any(r["outcome"] != "done" for r in reference):
                raise RuntimeError(f"the quiet cluster did not serve the reference: {reference}")
            time.sleep(0.5)
            idle_rss = status_bytes(pid, "VmRSS") or 0
            idle_log = file_size(broker_log)
            hwm_reset = reset_peak(pid)

            mp = multiprocessing.get_context("spawn")
            results: Any = mp.Queue()
            go, abort = mp.Event(), mp.Event()
            readies = []
            for index, (port, address) in enumerate(
                (("client", cluster.client_address), ("worker", cluster.worker_address))
            ):
                ready = mp.Event()
                process = mp.Process(
                    target=flood_sender,
                    args=(
                        address,
                        port,
                        messages,
                        1000 + index,
                        flood_timeout,
                        reconnect_every,
                        ready,
                        go,
                        abort,
                        results,
                    ),
                    daemon=True,
                )
                process.start()
                senders.append(process)
                readies.append(ready)
            for ready, process in zip(readies, senders):
                waited = time.monotonic()
                while not ready.wait(0.5):
                    if not process.is_alive() or time.monotonic() - waited > 120:
                        raise RuntimeError("a flood sender did not start")

            flood_done = threading.Event()
            died_after: list[float] = []

            def watch() -> None:
                """Until the senders end (bounded): stop them at once if the broker dies."""
                end = time.monotonic() + flood_timeout + 60.0
                while time.monotonic() < end and any(p.is_alive() for p in senders):
                    if not alive() and not died_after:
                        died_after.append(time.monotonic() - flood_started)
                        say(f"the broker exited with {broker.returncode}; stopping the flood")
                        abort.set()
                    time.sleep(0.1)
                flood_done.set()

            watcher = threading.Thread(target=watch, daemon=True)
            runs: list[dict[str, Any]] = []
            status_latencies: list[float | None] = []
            with RssSampler(pid) as sampler:
                go.set()
                flood_started = time.monotonic()
                say(f"flooding both ports with {messages} messages each")
                watcher.start()
                finished = run_bounded(
                    lambda: flood_run(
                        cluster.client_address,
                        request_timeout,
                        flood_done,
                        alive,
                        runs,
                        status_latencies,
                    ),
                    phase_s + flood_timeout + 60.0,
                )
                if not finished:
                    say("the requests under the flood did not finish in time")
                watcher.join(flood_timeout + 70.0)
                reports = []
                for _ in senders:
                    try:
                        reports.append(results.get(timeout=10))
                    except queue.Empty:
                        break
                say(f"flood over: {len(reports)} sender report(s); polling the broker's RSS")
                # let the broker settle, then take its RSS (early once it is back within target)
                settle_started = time.monotonic()
                after_rss = status_bytes(pid, "VmRSS")
                while after_rss is not None and time.monotonic() - settle_started < SETTLE_S:
                    time.sleep(0.5)
                    after_rss = status_bytes(pid, "VmRSS")
                    if after_rss is None:
                        break
                    within = after_rss - idle_rss <= TARGET_RSS_MB * MB
                    if within and time.monotonic() - settle_started >= 2.0:
                        break
                settle_s = time.monotonic() - settle_started
            hwm = status_bytes(pid, "VmHWM") if hwm_reset else None
            peak_rss = max(sampler.peak, hwm or 0)
            after_log = file_size(broker_log)
            is_alive = alive()
            workers_after = None
            if is_alive:
                with contextlib.suppress(Exception):
                    workers_after = len(cluster.wait_for_workers(2, timeout=10)["workers"])
            log_tail = broker_log.read_bytes()[-4000:].decode(errors="replace")
            returncode = broker.returncode
        finally:
            if abort is not None:
                abort.set()
            for process in senders:  # ours: end any that is still going
                process.join(5)
                if process.is_alive():
                    process.terminate()
                    process.join(5)
            cluster.stop()

    reference_hits = {run["seed"]: run["hits"] for run in reference}
    # the flood's end as the senders timed it (their clocks start at ``go``)
    flood_end_at = flood_started + max((r["seconds"] for r in reports), default=0.0)
    requests = []
    for run in runs:
        requests.append(
            {
                "seed": run["seed"],
                "outcome": run["outcome"],
                "latency_s": run["latency_s"],
                "hits": len(run["hits"]),
                "bitwise_reference": run["outcome"] == "done"
                and bool(run["hits"])
                and run["hits"] == reference_hits[run["seed"]],
                "finished_during_flood": run["finished_at"] <= flood_end_at,
            }
        )
    for seed in SEEDS[len(runs) :]:  # a request the bounded phase never got to
        requests.append(
            {
                "seed": seed,
                "outcome": "no_outcome",
                "latency_s": None,
                "hits": 0,
                "bitwise_reference": False,
                "finished_during_flood": False,
            }
        )
    latencies = [r["latency_s"] for r in requests if r["latency_s"] is not None]
    answered = [s for s in status_latencies if s is not None]
    rss_growth_after = None if after_rss is None else (after_rss - idle_rss) / MB
    log_growth = after_log - idle_log
    bitwise = [r["bitwise_reference"] for r in requests]
    return {
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "config": {
            "messages_per_port": messages,
            "workers": 2,
            "latency_ms": 2.0,
            "request": {
                "model": "synthetic",
                "method": "chords",
                "steps": STEPS,
                "cores": CORES,
                "seeds": list(SEEDS),
            },
            "sockets_per_port": READERS + 1,
            "reconnect_every": list(reconnect_every),
            "weights": WEIGHTS,
            "pool": pool_summary(build_pool(random.Random(1000))),
        },
        "targets": {
            "bitwise": True,
            "rss_growth_mb": TARGET_RSS_MB,
            "log_growth_bytes": TARGET_LOG_BYTES,
        },
        "broker": {
            "startup_rss_mb": round(startup_rss / MB, 2),
            "idle_rss_mb": round(idle_rss / MB, 2),  # just before the flood
            "peak_rss_growth_mb": round((peak_rss - idle_rss) / MB, 2),
            "rss_growth_after_mb": None if rss_growth_after is None else round(rss_growth_after, 2),
            "settle_s": round(settle_s, 1),
            "log_bytes_at_startup": startup_log,
            "log_bytes_before_flood": idle_log,
            "log_growth_bytes": log_growth,
            "alive": is_alive,
            "returncode": returncode,  # None while alive; -6: aborted (SIGABRT)
            "died_after_flood_start_s": round(died_after[0], 2) if died_after else None,
            "workers_after": workers_after,
            "log_tail": log_tail.splitlines()[-8:],
        },
        "flood": {report["port"]: report for report in reports},
        "reference": [
            {
                "seed": r["seed"],
                "outcome": r["outcome"],
                "latency_s": r["latency_s"],
                "hits": r["hits"],
            }
            for r in reference
        ],
        "under_flood": requests,
        "latency_s": {
            "reference_max": max(r["latency_s"] for r in reference),
            "reference_median": median([r["latency_s"] for r in reference]),
            "max": max(latencies) if latencies else None,
            "median": median(latencies),
        },
        "status": {
            "calls": len(status_latencies),
            "timeouts": len(status_latencies) - len(answered),
            "max_ms": round(max(answered) * 1000, 2) if answered else None,
            "median_ms": round((median(answered) or 0) * 1000, 2) if answered else None,
        },
        "verdict": {
            "bitwise": bool(bitwise) and all(bitwise),
            "rss": rss_growth_after is not None and rss_growth_after <= TARGET_RSS_MB,
            "log": log_growth <= TARGET_LOG_BYTES,
            "alive": is_alive,
        },
    }


def fmt(value: Any, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def print_table(result: dict[str, Any]) -> None:
    broker, verdict = result["broker"], result["verdict"]
    print(
        f"\n{'port':<8} {'attempted':>10} {'sent':>10} {'retried':>9} {'replies':>9} "
        f"{'ids':>5} {'seconds':>8} {'msg/s':>8}"
    )
    for port, report in result["flood"].items():
        print(
            f"{port:<8} {report['attempted']:>10} {report['sent']:>10} {report['retried']:>9} "
            f"{report['replies_read']:>9} {report['routing_ids']:>5} {report['seconds']:>8.1f} "
            f"{report['rate_per_s'] or 0:>8}"
        )
    print(
        f"\n{'seed':>4} {'outcome':<16} {'latency s':>10} {'quiet s':>8} {'hits':>5} "
        f"{'bitwise':>8} {'in flood':>9}"
    )
    quiet = {r["seed"]: r["latency_s"] for r in result["reference"]}
    for row in result["under_flood"]:
        print(
            f"{row['seed']:>4} {row['outcome']:<16} {fmt(row['latency_s'], '.3f'):>10} "
            f"{quiet[row['seed']]:>8.3f} {row['hits']:>5} {row['bitwise_reference']!s:>8} "
            f"{row['finished_during_flood']!s:>9}"
        )
    latency, status = result["latency_s"], result["status"]
    after = broker["workers_after"] if broker["alive"] else f"exit {broker['returncode']}"

    rows = [
        ("hits bitwise = reference", str(verdict["bitwise"]), "True", verdict["bitwise"]),
        (
            "broker RSS growth after, MB",
            fmt(broker["rss_growth_after_mb"]),
            f"<= {TARGET_RSS_MB:g}",
            verdict["rss"],
        ),
        ("broker RSS peak growth, MB", fmt(broker["peak_rss_growth_mb"]), "", None),
        (
            "broker log growth, bytes",
            str(broker["log_growth_bytes"]),
            f"<= {TARGET_LOG_BYTES}",
            verdict["log"],
        ),
        (
            "request latency max / median, s",
            f"{fmt(latency['max'], '.3f')} / {fmt(latency['median'], '.3f')}",
            "",
            None,
        ),
        (
            "quiet latency max / median, s",
            f"{fmt(latency['reference_max'], '.3f')} / {fmt(latency['reference_median'], '.3f')}",
            "",
            None,
        ),
        (
            "STATUS max / median ms (timeouts)",
            f"{fmt(status['max_ms'], '.1f')} / {fmt(status['median_ms'], '.1f')} "
            f"({status['timeouts']}/{status['calls']})",
            "",
            None,
        ),
        (
            "broker alive (workers / exit code)",
            f"{broker['alive']} ({after})",
            "True",
            verdict["alive"],
        ),
    ]
    print(f"\n{'figure':<34} {'value':>22} {'target':>12} {'met':>5}")
    for name, value, target, met in rows:
        print(f"{name:<34} {value:>22} {target:>12} {'' if met is None else str(met):>5}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--messages", type=int, default=100_000, help="malformed messages per port (default 100000)"
    )
    parser.add_argument(
        "--flood-timeout",
        type=float,
        default=600.0,
        help="seconds each port's flood may run at most (default 600)",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=120.0,
        help="seconds one valid request may take (default 120)",
    )
    parser.add_argument(
        "--reconnect-every",
        default=",".join(map(str, RECONNECT_EVERY[1:])),
        help="sends after which the 2nd and 3rd reader sockets reconnect under a new routing "
        "id, as A,B (default %(default)s; 0,0: never)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.messages < 1:
        parser.error("--messages must be at least 1")
    try:
        every = tuple(int(part) for part in args.reconnect_every.split(","))
    except ValueError:
        every = ()
    if len(every) != READERS - 1 or min(every) < 0:
        parser.error("--reconnect-every takes two non-negative integers, as 2000,250")
    result = bench(args.messages, args.flood_timeout, args.request_timeout, (0, *every))
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
