"""``ChordsPipeline``: a diffusers-style pipeline in one call, on the devices of one machine.

``from_pretrained`` starts a private ``LocalCluster`` (a chords-broker and one chords-worker per
device, on loopback ports picked free) serving one model folder; each call is one request
through ``AsyncClient``, and its hits come back as a diffusers-like output. The daemons are
reused across calls and stopped by ``close()``, at the end of a ``with`` block, when the
pipeline is garbage-collected or the interpreter exits, and, through the parent-death signal
``LocalCluster`` sets, when the process that holds the pipeline is killed.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import torch

from chords_mq.apps.cluster import LocalCluster
from chords_mq.apps.pipeline_call import (
    DEFAULT_STEPS,
    FALLBACK_STEPS,
    PARAM_NAMES,
    CallDefaults,
    ChordsPipelineOutput,
    PipelineHit,
    shaped,
)
from chords_mq.client import AsyncClient, RequestTimeout
from chords_mq.errors import (
    InvalidPipelineConfig,
    PipelineClosed,
    PipelineError,
    PipelineStartError,
)
from chords_mq.request import RequestSpec

T = TypeVar("T")

__all__ = ["ChordsPipeline", "ChordsPipelineOutput", "PipelineHit"]

STOP_TIMEOUT_S = 10.0  # SIGTERM, then SIGKILL: how long the daemons get to exit on close()


def _run(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to the end from synchronous code, even inside a running event loop (on
    a helper thread then, as in a notebook)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with ThreadPoolExecutor(max_workers=1) as helper:
        return helper.submit(lambda: asyncio.run(make())).result()


def _log_tail(path: Path | None, lines: int = 12) -> str:
    if path is None or not path.exists():
        return ""
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - 8192))
        text = handle.read().decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])


def _reason(tail: str) -> str:
    """The line that says why a daemon stopped: its ``Error:`` line, else its last line."""
    lines = [line for line in tail.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    return (errors or lines or ["(nothing in its log)"])[-1]


def _shutdown(
    cluster: LocalCluster, release: threading.Event, keeper: threading.Thread, scratch: str | None
) -> None:
    """Stop the daemons, then let the thread that started them end (not before: their
    parent-death signal follows that thread), then remove the private log folder."""
    try:
        cluster.stop(STOP_TIMEOUT_S)
    finally:
        release.set()
        keeper.join(timeout=5.0)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


class ChordsPipeline:
    """``ChordsPipeline.from_pretrained(folder, devices=["cuda:0", "cuda:1"], cores=4)``.

    A call takes the diffusers arguments (``prompt``, ``negative_prompt``,
    ``num_inference_steps``, ``guidance_scale``, ``height``, ``width``, ``num_frames``, and a
    family's others such as ``max_sequence_length`` as keywords) with their diffusers meaning
    and defaults, plus ``seed`` (the workers draw the noise as
    ``torch.Generator("cpu").manual_seed(seed)`` would), ``cores`` (K, default the pipeline's),
    ``method``, ``stop`` and ``on_hit`` (called with each ``PipelineHit`` as it lands).
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        devices: Sequence[str] = ("cpu",),
        cores: int | None = None,
        torch_dtype: torch.dtype | str | None = None,
        scheduler: str | None = None,
        family: str | None = None,
        threads: int | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        start_timeout: float = 600.0,
        worker_args: Sequence[str] = (),
    ) -> None:
        """See ``from_pretrained``."""
        self.devices = _checked_devices(devices)
        self.cores = len(self.devices) if cores is None else cores
        if isinstance(self.cores, bool) or not isinstance(self.cores, int) or self.cores < 1:
            raise InvalidPipelineConfig(f"cores must be an integer >= 1, got {cores!r}")
        self.source, self.model, pipeline = _served(str(model), family)
        self.defaults = CallDefaults(
            self.model,
            DEFAULT_STEPS.get(pipeline or "", FALLBACK_STEPS),
            self.cores,
            PARAM_NAMES.get(self.model.partition(":")[0], {}),
        )
        args = [*_worker_options(torch_dtype, scheduler, family), *worker_args]
        self._scratch = None if log_dir is not None else tempfile.mkdtemp(prefix="chords-pipe-")
        self.log_dir = Path(log_dir if log_dir is not None else str(self._scratch))
        self._cluster = LocalCluster(
            model=self.source,
            devices=self.devices,
            threads=threads,
            log_dir=self.log_dir,
            extra_worker_args=args,
        )
        self._closed = False
        self._start(start_timeout)

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike[str],
        *,
        devices: Sequence[str] = ("cpu",),
        cores: int | None = None,
        torch_dtype: torch.dtype | str | None = None,
        scheduler: str | None = None,
        family: str | None = None,
        threads: int | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        start_timeout: float = 600.0,
        worker_args: Sequence[str] = (),
    ) -> ChordsPipeline:
        """Start a private broker and one worker per entry of ``devices`` (``"cuda:0"``,
        ``"cpu"``, ...) serving ``model`` (a local diffusers pipeline folder, or ``digits`` /
        ``synthetic``), and wait until every worker has registered.

        ``cores``: each call's K (default: one per device). ``torch_dtype`` (``torch.bfloat16``
        or ``"bfloat16"``; default as saved), ``scheduler`` (a diffusers scheduler class name)
        and ``family`` are the workers' ``--dtype``, ``--scheduler`` and ``--family``;
        ``worker_args`` any other ``chords-worker`` options. ``threads``: each CPU worker's
        torch threads; None keeps torch's default, as your own process has it, which is what
        makes core 1 bitwise your ``pipe()`` output (on a CPU, at that count); with several CPU
        workers on a few cores, 1 is faster. The daemons log to ``log_dir`` (default: a private
        folder removed on ``close()``). A worker that exits while starting (a folder it cannot
        serve, a device that does not exist) raises ``PipelineStartError`` naming it, with its
        log's last lines; so does ``start_timeout`` seconds without every worker registered.
        """
        return cls(
            model,
            devices=devices,
            cores=cores,
            torch_dtype=torch_dtype,
            scheduler=scheduler,
            family=family,
            threads=threads,
            log_dir=log_dir,
            start_timeout=start_timeout,
            worker_args=worker_args,
        )

    # ------------------------------------------------------------------ the daemons

    def _start(self, timeout: float) -> None:
        # PR_SET_PDEATHSIG fires when the *thread* that started a child ends, not the process:
        # daemons started from a caller's short-lived thread would die with it. A thread of
        # the pipeline's own starts them and lives until they are stopped.
        cluster, launched, release = self._cluster, threading.Event(), threading.Event()
        failed: list[BaseException] = []

        def keep() -> None:
            try:
                cluster.launch()
            except BaseException as exc:
                failed.append(exc)
                return
            finally:
                launched.set()
            release.wait()

        keeper = threading.Thread(target=keep, name="chords-pipeline-daemons", daemon=True)
        keeper.start()
        launched.wait(timeout=60.0)  # one Popen per daemon: seconds at most
        self._finalizer = weakref.finalize(self, _shutdown, cluster, release, keeper, self._scratch)
        try:
            if failed:
                raise PipelineStartError(f"could not start the daemons: {failed[0]}") from None
            _run(lambda: self._wait_registered(timeout))
        except BaseException:
            self._closed = True
            self._finalizer()
            raise

    async def _wait_registered(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        wanted = len(self.devices)
        registered = 0
        async with AsyncClient(self._cluster.client_address, accept_timeout_s=1.0) as client:
            while True:
                self._raise_if_exited(starting=True)
                try:
                    status = await client.status(timeout=1.0)
                    workers = [w for w in status["workers"] if w.get("model") == self.model]
                    registered = len(workers)
                    if registered >= wanted:
                        return
                except RequestTimeout:
                    pass  # the broker is still binding
                if time.monotonic() > deadline:
                    self._raise_timeout(registered, timeout)
                await asyncio.sleep(0.05)

    def _names(self) -> list[tuple[str, Any, str]]:
        """(name, process, log name) of the broker and each worker."""
        cluster = self._cluster
        daemons: list[tuple[str, Any, str]] = [("chords-broker", cluster.broker, "broker")]
        for index, process in enumerate(cluster.workers):
            device = cluster.worker_device(index)
            daemons.append((f"chords-worker {index} on {device}", process, f"worker{index}"))
        return daemons

    def _raise_if_exited(self, starting: bool) -> None:
        for name, process, log in self._names():
            if process is None or process.poll() is None:
                continue
            if not starting and name != "chords-broker":
                continue  # a lost worker's tasks run on the others
            tail = _log_tail(self.log_dir / f"{log}.log")
            if not starting:  # the broker died under a started pipeline
                raise PipelineError(
                    f"{name} of this pipeline exited with {process.returncode}: "
                    f"{_reason(tail)}; close it and start a new one\nits log ends:\n{tail}"
                )
            raise PipelineStartError(
                f"{name} exited with {process.returncode} while the pipeline started: "
                f"{_reason(tail)}\nits log ends:\n{tail}",
                process=name,
                returncode=process.returncode,
                log_tail=tail,
            )
        if not starting and not self._cluster.alive_workers():
            raise PipelineError(
                f"every chords-worker of this pipeline exited; see the logs in {self.log_dir} "
                "(pass log_dir= to keep them) and start a new one"
            )

    def _raise_timeout(self, registered: int, timeout: float) -> None:
        lines = [
            f"{name}: {_reason(_log_tail(self.log_dir / f'{log}.log'))}"
            for name, _, log in self._names()[1:]
        ]
        raise PipelineStartError(
            f"{registered} of {len(self.devices)} worker(s) registered in {timeout:g}s "
            "(start_timeout=); each worker's last log line:\n" + "\n".join(lines)
        )

    @property
    def pids(self) -> dict[str, int]:
        """The daemons' process ids: ``broker``, ``worker0``, ``worker1``, ..."""
        cluster = self._cluster
        pids = {"broker": cluster.broker.pid} if cluster.broker is not None else {}
        pids.update({f"worker{i}": p.pid for i, p in enumerate(cluster.workers)})
        return pids

    @property
    def client_address(self) -> str:
        """The private broker's client endpoint (loopback), for ``AsyncClient`` or
        ``chords status --broker``."""
        return self._cluster.client_address

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop the broker and the workers (SIGTERM, then SIGKILL after 10 s) and wait for
        them. Calling again does nothing; a call after it raises ``PipelineClosed``."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> ChordsPipeline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"on {self.devices}"
        return f"ChordsPipeline({self.source!r}, cores={self.cores}, {state})"

    # ------------------------------------------------------------------ calls

    def spec_for(self, prompt: str | None = None, **arguments: Any) -> RequestSpec:
        """The request a call with these arguments sends (``CallDefaults.spec``)."""
        return self.defaults.spec(prompt, **arguments)

    def __call__(
        self,
        prompt: str | None = None,
        *,
        on_hit: Callable[[PipelineHit], Any] | None = None,
        timeout: float | None = None,
        **arguments: Any,
    ) -> ChordsPipelineOutput:
        """One image (or video) with CHORDS across the pipeline's workers; the arguments are
        ``spec_for``'s. Blocks until the request is done; ``on_hit`` runs as each hit lands."""
        spec = self.spec_for(prompt, **arguments)
        return _run(lambda: self._generate(spec, on_hit, timeout))

    async def agenerate(
        self,
        prompt: str | None = None,
        *,
        on_hit: Callable[[PipelineHit], Any] | None = None,
        timeout: float | None = None,
        **arguments: Any,
    ) -> ChordsPipelineOutput:
        """``await pipe.agenerate(...)``: the call in a running event loop; ``on_hit`` may be a
        coroutine function."""
        spec = self.spec_for(prompt, **arguments)
        return await self._generate(spec, on_hit, timeout)

    async def _generate(
        self,
        spec: RequestSpec,
        on_hit: Callable[[PipelineHit], Any] | None,
        timeout: float | None,
    ) -> ChordsPipelineOutput:
        if self._closed:
            raise PipelineClosed(
                "this ChordsPipeline is closed: close() (or the end of its with block) stopped "
                "its broker and workers; make a new one with ChordsPipeline.from_pretrained(...)"
            )
        self._raise_if_exited(starting=False)
        started = time.perf_counter()
        first: float | None = None
        hits: list[PipelineHit] = []
        async with AsyncClient(self._cluster.client_address) as client:
            stream = client.submit(spec, timeout=timeout)
            async for landed in stream:
                hit = PipelineHit.of(landed)
                first = time.perf_counter() - started if first is None else first
                hits.append(hit)
                if on_hit is not None:
                    result = on_hit(hit)
                    if inspect.isawaitable(result):
                        await _awaited(result)
        stats = stream.stats or {}
        core = (stats.get("returned") or {}).get("core")
        returned = next((h for h in hits if h.core == core), hits[-1] if hits else None)
        images, frames = shaped(returned, spec.output)
        return ChordsPipelineOutput(
            images=images,
            frames=frames,
            hits=hits,
            returned=returned,
            cores=(stream.accepted or {}).get("cores"),
            stats=stats,
            wall_s=time.perf_counter() - started,
            first_hit_s=first,
        )


async def _awaited(result: Awaitable[Any]) -> None:
    await result


def _checked_devices(devices: Sequence[str]) -> list[str]:
    if isinstance(devices, str):
        raise InvalidPipelineConfig(
            f"devices must be a list of devices, one worker each (e.g. [{devices!r}]), not a string"
        )
    listed = list(devices)
    if not listed or not all(isinstance(d, str) and d.strip() for d in listed):
        raise InvalidPipelineConfig(
            f"devices must be a non-empty list of torch devices such as 'cuda:0' or 'cpu', got "
            f"{devices!r}"
        )
    return listed


def _served(model: str, family: str | None) -> tuple[str, str, str | None]:
    """(what the workers load, the name they serve it under, its diffusers pipeline class or
    None for a spec). A path that is no pipeline folder raises ``ModelPathError`` here, before
    any daemon starts."""
    from chords_mq.workers.models import (
        FAMILY_NAMES,
        pipeline_class,
        pipeline_index,
        served_name,
    )

    if model in ("synthetic", "digits") or model.startswith("digits:"):
        return model, served_name(model), None
    index = pipeline_index(model)
    source = str(Path(model).resolve())
    pipeline = FAMILY_NAMES.get(family or "") or pipeline_class(index)
    return source, served_name(source), pipeline


def _worker_options(
    torch_dtype: torch.dtype | str | None, scheduler: str | None, family: str | None
) -> list[str]:
    options = []
    if torch_dtype is not None:
        name = str(torch_dtype).removeprefix("torch.")
        if name not in ("float32", "bfloat16", "float16"):
            raise InvalidPipelineConfig(
                f"torch_dtype must be float32, bfloat16 or float16, got {torch_dtype!r}"
            )
        options += ["--dtype", name]
    if scheduler is not None:
        options += ["--scheduler", scheduler]
    if family is not None:
        options += ["--family", family]
    return options
