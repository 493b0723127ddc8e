"""``chords run``: the whole system on one machine, for a newcomer's first command.

Starts a local broker and one worker per core, computes the sequential reference in-process with
the same adapter (so every hit gets its RMSE against sequential as it lands), streams the
request with a live per-core progress display, saves each hit (safetensors, PNG for pixel-space
models, a labelled grid ``hits.png``) and ``summary.json``, and always shuts the daemons down,
Ctrl-C included.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Any

import click
import torch

from chords_mq.algorithms.base import as_tensor
from chords_mq.apps.cluster import LocalCluster
from chords_mq.apps.streaming import save_hit, stream_request, waiting_notice, write_summary
from chords_mq.client import ClientHit
from chords_mq.errors import ChordsError
from chords_mq.local import run_tasks
from chords_mq.request import RequestSpec


class Stopped(BaseException):
    """SIGTERM or SIGHUP reached ``chords run``: unwind so its daemons are stopped."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals() -> Any:
    """Turn SIGTERM and SIGHUP into ``Stopped`` while the daemons run (Ctrl-C already raises
    KeyboardInterrupt); the previous handlers come back afterwards."""

    def handler(signum: int, frame: Any) -> None:
        raise Stopped(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def sequential_reference(adapter: Any, spec: RequestSpec) -> torch.Tensor:
    """The plain sequential sample with this adapter, in-process (CHORDS' core 1 equals it)."""
    sequential = RequestSpec(
        model=spec.model, method="sequential", steps=spec.steps, seed=spec.seed, params=spec.params
    )
    from chords_mq.workers.models.base import in_process

    prepared = adapter.prepare(sequential)
    plan = sequential.build_plan(prepared.x0, prepared.solver)
    return as_tensor(run_tasks(plan, in_process(adapter, prepared)).returned.latent)


def overlap_start(workers: int) -> bool:
    """Start the daemons while the reference is computed? Only with a CPU for the broker and
    each worker besides the reference's own: on fewer (2 vCPUs, 4 workers) the parallel torch
    imports, model loads and the reference's own threads slow each other down by more than the
    overlap saves (docs/benchmarks.md, "Start-up of chords run"). ``CHORDS_OVERLAP_START``
    set to 1 or 0 decides instead."""
    forced = os.environ.get("CHORDS_OVERLAP_START")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return cpus >= workers + 2


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).mean().sqrt())


class LiveDisplay:
    """One line per core showing its step; hit lines scroll above. Plain lines off a TTY."""

    def __init__(self, steps: int, cores: int, enabled: bool) -> None:
        self.steps, self.cores, self.enabled = steps, cores, enabled
        self.drawn = 0
        self.positions: dict[int, int] = {}
        self.waiting = False

    def _clear(self) -> None:
        if self.drawn:
            sys.stderr.write(f"\033[{self.drawn}F\033[J")
            self.drawn = 0

    def _draw(self) -> None:
        width = 30
        for core in range(1, self.cores + 1):
            step = self.positions.get(core, -1) + 1
            filled = round(width * step / self.steps)
            done = "done" if step >= self.steps else f"step {step:>3}/{self.steps}"
            sys.stderr.write(f"  core {core:>2} |{'#' * filled}{'.' * (width - filled)}| {done}\n")
        self.drawn = self.cores
        sys.stderr.flush()

    def progress(self, body: dict[str, Any]) -> None:
        notice = waiting_notice(body, self.waiting)
        if notice is not None:
            self.waiting = not self.waiting
            self._clear()
            click.echo(notice, err=True)
        if not self.enabled:
            return
        self.positions.update({core: step for core, step in body.get("cores", [])})
        self._clear()
        self._draw()

    def line(self, text: str) -> None:
        if self.enabled:
            self._clear()
        click.echo(text)
        if self.enabled:
            self._draw()

    def close(self) -> None:
        if self.enabled:
            self._clear()


async def stream_hits(
    address: str,
    spec: RequestSpec,
    reference: torch.Tensor | None,
    display: LiveDisplay,
    timeout: float | None,
) -> dict[str, Any]:
    """The request's stream (``stream_request``), each hit's row with its RMSE against the
    sequential reference, shown as it lands; the summary also keeps each core's latent."""
    latents: dict[int, torch.Tensor] = {}

    def on_hit(hit: ClientHit, row: dict[str, Any]) -> None:
        if hit.latent is None:  # pragma: no cover - run always asks for latents
            raise ChordsError("the broker sent a hit without its latent")
        error = None if reference is None else rmse(hit.latent, reference)
        row["rmse_vs_sequential"] = error
        latents[hit.core] = hit.latent
        shown = "" if error is None else f"{error:.3e}"
        display.line(
            f"   {hit.core:>4}  {hit.round:>5}  {hit.speedup:>6.3f}x  "
            f"{row['elapsed_s']:>7.3f}   {shown}"
        )

    display.line("   core  round  speedup   wall s   RMSE vs sequential")
    try:
        summary = await stream_request(address, spec, timeout, on_hit, display.progress)
    finally:
        display.close()
    return {**summary, "latents": latents}


def save_outputs(out_dir: Path, adapter: Any, result: dict[str, Any]) -> None:
    """Each hit (``save_hit``: its latent, and its picture for a pixel-space model), a labelled
    grid of the pictures (hits.png) and summary.json."""
    from chords_mq.media import hits_grid

    images, labels = [], []
    for row in result["hits"]:
        core, latent = row["core"], result["latents"][row["core"]]
        image = adapter.decode(None, latent) if getattr(adapter, "pixel_space", False) else None
        save_hit(out_dir, core, latent, image)
        if image is not None:
            images.append(image)
            name = "zero-th" if core == 0 else f"core {core}"
            labels.append(f"{name}\nr{row['round']} {row['speedup']:.2f}x")
    if images:
        hits_grid(images, labels, out_dir / "hits.png")
    write_summary(out_dir, {key: value for key, value in result.items() if key != "latents"})


def run_locally(
    spec: RequestSpec,
    workers: int,
    latency_ms: float,
    out_dir: Path | None,
    logs: str | None,
    timeout: float | None,
) -> dict[str, Any]:
    """Start, stream, save, stop. Returns the result (rows, stats)."""
    from chords_mq.workers.models import load_adapter

    options: dict[str, Any] = {"latency_ms": 0.0} if spec.model == "synthetic" else {}
    try:
        adapter = load_adapter(spec.model, "cpu", **options)
    except (ValueError, OSError) as exc:
        raise click.UsageError(str(exc)) from None
    cores = spec.resolved_cores()
    display = LiveDisplay(spec.steps, cores, enabled=sys.stderr.isatty())
    click.echo(
        f"starting a local broker and {workers} worker(s) on model {spec.model}...", err=True
    )
    cluster = LocalCluster(workers=workers, model=spec.model, latency_ms=latency_ms, log_dir=logs)
    try:
        with stop_on_signals():
            overlap = overlap_start(workers)
            if overlap:  # the daemons import and register while the reference runs
                cluster.launch()
            try:
                reference = sequential_reference(adapter, spec)
            except ChordsError as exc:  # a prompt or a parameter the model cannot take
                raise click.UsageError(str(exc)) from None
            if not overlap:
                cluster.launch()
            result = _serve(cluster, spec, workers, reference, display, timeout)
    except Stopped as exc:
        display.close()
        name = signal.Signals(exc.signum).name
        click.echo(f"{name}: stopping the local broker and workers", err=True)
        raise SystemExit(128 + exc.signum) from None
    except KeyboardInterrupt:
        display.close()
        click.echo("interrupted: stopping the local broker and workers", err=True)
        raise SystemExit(130) from None
    finally:
        cluster.stop()
    stats = result["stats"] or {}
    click.echo(
        f"evaluations: {stats.get('evaluations')}  retries: {stats.get('retries')}  "
        f"wall: {result['wall_s']:.3f}s"
    )
    if out_dir is not None:
        save_outputs(out_dir, adapter, result)
        pictures = " and hits.png" if (out_dir / "hits.png").exists() else ""
        click.echo(f"saved each hit{pictures} in {out_dir}/")
    return result


def _serve(
    cluster: LocalCluster,
    spec: RequestSpec,
    workers: int,
    reference: torch.Tensor,
    display: Any,
    timeout: float | None,
) -> dict[str, Any]:
    try:
        cluster.wait_for_workers(cluster.worker_count, 60.0)
        sequence = spec.resolved_init_sequence()
        shape = "" if sequence is None else f", init sequence {sequence}"
        click.echo(
            f"{spec.method} on {spec.model}: N={spec.steps} steps, {workers} worker(s){shape}"
        )
        return asyncio.run(stream_hits(cluster.client_address, spec, reference, display, timeout))
    except ChordsError as exc:
        display.close()
        raise click.ClickException(str(exc)) from None
