"""chords-worker: one process per device; holds one model and runs the broker's tasks.

A DEALER socket with a stable routing id talks to the broker. The event loop only does I/O and
heartbeats; every model call (prepare, denoise, decode) runs in a single compute thread, so
heartbeats continue during long steps and the device sees one call at a time. Per-request
contexts live in a bounded LRU cache. If the broker goes silent or restarts (new epoch), the
worker opens a fresh socket and says HELLO again.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import click
import torch
import zmq
import zmq.asyncio

from chords_mq import __version__
from chords_mq.request import InvalidRequest, RequestSpec
from chords_mq.solvers import solver_spec
from chords_mq.transport import PeerCongested, dealer, decode_frames, send_now, stable_identity
from chords_mq.wire import PROTOCOL_VERSION, Message, WireError, task_entries
from workers.models import FAMILY_NAMES, ModelAdapter, load_adapter, resolve

log = logging.getLogger("chords.worker")
T = TypeVar("T")


class Worker:
    """The worker's state: one adapter, one compute thread, a cache of prepared requests."""

    def __init__(
        self,
        broker: str,
        adapter: ModelAdapter,
        model: str,
        device: str,
        heartbeat_ms: int = 250,
        cache_size: int = 16,
        broker_timeout_s: float = 2.0,
    ) -> None:
        self.broker = broker
        self.adapter = adapter
        self.model = model
        self.device = device
        self.identity = stable_identity("worker", device)
        self.heartbeat_s = heartbeat_ms / 1000.0
        self.broker_timeout_s = broker_timeout_s
        self.cache: OrderedDict[tuple[int, str], Any] = OrderedDict()
        self.cache_size = cache_size
        # OpenMP thread counts are per thread: give the compute thread the process's setting,
        # or it runs with every core and its reductions (so its bits) differ from a user's run.
        self.compute = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="compute",
            initializer=torch.set_num_threads,
            initargs=(torch.get_num_threads(),),
        )
        self.epoch = 0
        self.stopping = asyncio.Event()
        self.sock: zmq.asyncio.Socket | None = None
        self.jobs: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        ctx = zmq.asyncio.Context()
        try:
            while not self.stopping.is_set():
                self.sock = dealer(ctx, self.broker, self.identity)
                try:
                    await self._session()
                finally:
                    self.sock.close(0)
                    self.sock = None
        finally:
            ctx.term()
            self.compute.shutdown(wait=False, cancel_futures=True)

    def _send(self, message: Message) -> None:
        if self.sock is None:
            return
        try:
            send_now(self.sock, message)
        except PeerCongested:
            log.warning("broker queue full; dropped %s", message.kind)

    async def _session(self) -> None:
        """One connection: HELLO, then serve until the broker goes silent or asks us to leave."""
        assert self.sock is not None
        self.epoch = 0
        self._hello()
        beat = asyncio.create_task(self._heartbeats())
        last_heard = time.monotonic()
        receiving: Any = None  # the pending receive, kept across heartbeat timeouts
        try:
            while not self.stopping.is_set():
                if receiving is None:
                    receiving = self.sock.recv_multipart(copy=False)
                done, _ = await asyncio.wait([receiving], timeout=self.heartbeat_s)
                if not done:
                    if time.monotonic() - last_heard > self.broker_timeout_s:
                        log.warning("broker silent for %.1fs; reconnecting", self.broker_timeout_s)
                        return
                    if self.epoch == 0:
                        self._hello()  # no WELCOME yet: the broker may not be up
                    continue
                frames, receiving = receiving.result(), None
                last_heard = time.monotonic()
                try:
                    message = decode_frames(frames)
                except WireError as exc:
                    log.error("dropped a malformed message from the broker: %s", exc)
                    continue
                if not await self._handle(message):
                    return
        finally:
            beat.cancel()
            if receiving is not None:
                receiving.cancel()
            if self.stopping.is_set():
                self._send(Message("DISCONNECT", {"reason": "worker shutting down"}))

    def _hello(self) -> None:
        self._send(
            Message(
                "HELLO",
                {
                    "worker": self.identity.decode(),
                    "model": self.model,
                    "device": self.device,
                    "dtype": self.adapter.dtype,
                    "max_batch": self.adapter.max_batch,
                    "version": __version__,
                    "protocol": PROTOCOL_VERSION,
                    "capabilities": ["eval", "decode"],
                },
            )
        )

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            if self.epoch:
                self._send(Message("HEARTBEAT", epoch=self.epoch))

    async def _handle(self, message: Message) -> bool:
        """Handle one broker message; False means: drop this connection and register again."""
        kind = message.kind
        if kind == "WELCOME":
            self.epoch = message.epoch
            log.info("registered with broker epoch %d", self.epoch)
        elif kind == "DISCONNECT":
            log.warning("broker asked us to re-register: %s", message.body.get("reason", ""))
            await asyncio.sleep(0.05)
            return False
        elif kind == "HEARTBEAT":
            if self.epoch and message.epoch != self.epoch:
                log.warning("broker restarted (epoch %d -> %d)", self.epoch, message.epoch)
                return False
        elif kind in ("PREPARE", "EVAL", "DECODE"):
            job = asyncio.create_task(self._job(message))
            self.jobs.add(job)
            job.add_done_callback(self.jobs.discard)
        elif kind == "RELEASE":
            self.cache.pop((message.epoch, message.request or ""), None)
        else:
            log.error("unexpected %s from the broker", kind)
        return True

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.compute, fn, *args)

    async def _job(self, message: Message) -> None:
        """Run one PREPARE / EVAL / DECODE in the compute thread and answer it."""
        reply = {
            "epoch": message.epoch,
            "request": message.request,
            "task": message.task,
            "attempt": message.attempt,
        }
        key = (message.epoch, message.request or "")
        try:
            if message.kind == "PREPARE":
                out = await self._prepare(message, key)
            elif key not in self.cache:
                out = Message(
                    "FAILED",
                    {"code": "not_prepared", "message": "request not prepared on this worker"},
                )
            elif message.kind == "EVAL":
                out = await self._eval(message, key)
            else:
                started = time.perf_counter()
                media = await self._in_thread(
                    self.adapter.decode, self.cache[key], message.tensors["latent"]
                )
                out = Message(
                    "DECODED", {"compute_s": time.perf_counter() - started}, {"media": media}
                )
        except InvalidRequest as exc:
            out = Message("FAILED", {"code": "invalid_request", "message": str(exc)})
        except WireError as exc:
            out = Message("FAILED", {"code": "bad_message", "message": str(exc)})
        except Exception as exc:  # an adapter failure is a value for the broker, not a crash
            log.exception("%s failed", message.kind)
            out = Message(
                "FAILED", {"code": "worker_error", "message": f"{type(exc).__name__}: {exc}"}
            )
        for name, value in reply.items():
            setattr(out, name, value)
        if out.kind == "FAILED" and message.kind == "EVAL":
            tasks = message.body.get("tasks")
            if isinstance(tasks, list):
                out.body["tasks"] = [t[:2] for t in tasks if isinstance(t, list)]
        self._send(out)

    async def _prepare(self, message: Message, key: tuple[int, str]) -> Message:
        started = time.perf_counter()
        request = RequestSpec.from_dict(message.body["request"])
        prepared = await self._in_thread(self.adapter.prepare, request)
        self.cache[key] = prepared.context
        self.cache.move_to_end(key)
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        fields, tensors = solver_spec(prepared.solver)
        tensors = {f"solver.{name}": tensor for name, tensor in tensors.items()}
        return Message(
            "PREPARED",
            {"solver": fields, "prepare_s": time.perf_counter() - started},
            {"x0": prepared.x0, **tensors},
        )

    async def _eval(self, message: Message, key: tuple[int, str]) -> Message:
        """One forward for all of the EVAL's tasks (usually one), each at its own step."""
        started = time.perf_counter()
        self.cache.move_to_end(key)
        entries = task_entries(message, 4, "latent")
        batch = torch.stack([latent for _, latent in entries])
        steps = [entry[2] for entry, _ in entries]
        out = await self._in_thread(self.adapter.denoise, self.cache[key], batch, steps)
        return Message(
            "RESULT",
            {
                "tasks": [entry[:2] for entry, _ in entries],
                "compute_s": time.perf_counter() - started,
            },
            {f"output.{i}": out[i].contiguous() for i in range(len(entries))},
        )


def _parse_device(device: str | None, gpu: int | None) -> str:
    if gpu is not None:
        if device not in (None, "cuda"):
            raise click.UsageError("--gpu selects a CUDA device; do not combine it with --device")
        if not torch.cuda.is_available():
            raise click.UsageError(f"--gpu {gpu}: CUDA is not available on this machine")
        return f"cuda:{gpu}"
    return device or "cpu"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--broker",
    default="tcp://127.0.0.1:5556",
    show_default=True,
    help="The broker's worker endpoint.",
)
@click.option(
    "--model",
    default="synthetic",
    show_default=True,
    help="synthetic, digits[:PATH], or a local diffusers pipeline folder.",
)
@click.option(
    "--name", default=None, help="Serve the model under this name (default: folder name)."
)
@click.option(
    "--family",
    type=click.Choice(sorted(FAMILY_NAMES)),
    default=None,
    help="Pipeline family, if model_index.json should not decide.",
)
@click.option(
    "--registry",
    type=click.Path(dir_okay=False),
    envvar="CHORDS_MODELS",
    default=None,
    help="JSON file mapping model names to folders ($CHORDS_MODELS).",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default=None,
    help="Load a pipeline in this dtype (default: as saved).",
)
@click.option("--gpu", type=click.IntRange(min=0), default=None, help="CUDA device index.")
@click.option("--device", default=None, help="Torch device instead of --gpu, e.g. cpu.")
@click.option(
    "--latency-ms",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="synthetic model: emulate a forward of this many milliseconds.",
)
@click.option("--heartbeat-ms", type=click.IntRange(min=20), default=250, show_default=True)
@click.option(
    "--cache-size",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Prepared requests kept per worker.",
)
@click.option("--log-level", default="INFO", show_default=True)
@click.version_option(__version__, prog_name="chords-worker")
def main(
    broker: str,
    model: str,
    name: str | None,
    family: str | None,
    registry: str | None,
    dtype: str | None,
    gpu: int | None,
    device: str | None,
    latency_ms: float,
    heartbeat_ms: int,
    cache_size: int,
    log_level: str,
) -> None:
    """Run one chords-mq worker: one device, one model, tasks from the broker."""
    logging.basicConfig(
        level=log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s chords-worker %(levelname)s %(message)s",
    )
    resolved = _parse_device(device, gpu)
    if resolved == "cpu":
        torch.set_num_threads(1)  # steady timings when several workers share a few cores
    options: dict[str, Any] = {}
    if model == "synthetic":
        options["latency_ms"] = latency_ms
    elif latency_ms:
        raise click.UsageError("--latency-ms only applies to --model synthetic")
    try:
        entry = resolve(model, registry)
        wanted = dtype or entry.dtype
        torch_dtype = None if wanted is None else getattr(torch, wanted)
        adapter = load_adapter(
            entry.source, resolved, dtype=torch_dtype, family=family or entry.family, **options
        )
    except (ValueError, OSError, AttributeError) as exc:
        raise click.UsageError(str(exc)) from None
    served = name or entry.name
    worker = Worker(
        broker, adapter, served, resolved, heartbeat_ms=heartbeat_ms, cache_size=cache_size
    )
    asyncio.run(_run_until_signal(worker.run, worker.stopping))


async def _run_until_signal(run: Callable[[], Awaitable[None]], stopping: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await run()
