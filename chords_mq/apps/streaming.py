"""One stream of a request's hits, for ``chords generate`` and ``chords run``.

``stream_request`` submits a request, hands every hit to the caller as it lands together with
its row of the summary (core, round, speedup, seconds since submission; the caller may add to
it), and returns the summary. ``save_hit`` writes one hit's latent and media, and
``write_summary`` the summary, in the layout both commands share: ``hit-core<k>.safetensors``,
``hit-core<k>.png`` or ``.mp4``, ``summary.json``. ``HitLines`` is ``generate``'s terminal
writer (``run`` has its own live display, ``chords_mq.apps.runner.LiveDisplay``).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from chords_mq.client import AsyncClient, ClientHit
from chords_mq.request import RequestSpec

# Called with each hit and its summary row, as the hit lands.
OnHit = Callable[[ClientHit, dict[str, Any]], None]


async def stream_request(
    address: str,
    spec: RequestSpec,
    timeout: float | None,
    on_hit: OnHit | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    keys: dict[str, Any] | None = None,
    wait_for_worker: float | None = None,
) -> dict[str, Any]:
    """Submit ``spec`` to the broker at ``address`` and stream its hits; returns the summary:
    the hits' rows, the init sequence and cores the broker granted (and the cores asked for),
    the request, its stats and the wall time."""
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    async with AsyncClient(address, **(keys or {})) as client:
        stream = client.submit(
            spec, timeout=timeout, on_progress=on_progress, wait_for_worker=wait_for_worker
        )
        async for hit in stream:
            row = {
                "core": hit.core,
                "round": hit.round,
                "speedup": round(hit.speedup, 3),
                "elapsed_s": round(time.perf_counter() - started, 4),
            }
            if on_hit is not None:
                on_hit(hit, row)
            rows.append(row)
        accepted = stream.accepted or {}
    sequence = accepted.get("init_sequence") or [0]  # sequential is one core starting at step 0
    return {
        "hits": rows,
        "init_sequence": sequence,
        # the cores the broker granted (its cores policy), and what was asked
        "cores": accepted.get("cores", len(sequence)),
        "requested_cores": accepted.get("requested_cores"),
        "steps": spec.steps,
        "method": spec.method,
        "request": spec.to_dict(),
        "stats": stream.stats,
        "wall_s": round(time.perf_counter() - started, 4),
    }


def save_hit(out_dir: str | Path, core: int, latent: Any, media: Any) -> None:
    """hit-core<k>.safetensors (the latent), and the media if there is any: hit-core<k>.png for
    an image ((H, W), (H, W, 1) or (H, W, 3) uint8), hit-core<k>.mp4 for video frames."""
    from safetensors.torch import save_file

    from chords_mq.media import save_png

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if latent is not None:
        save_file({"latent": latent.contiguous()}, str(folder / f"hit-core{core}.safetensors"))
    if media is None:
        return
    if media.dim() == 4:  # video frames (F, H, W, C)
        from chords_mq.media import save_mp4

        save_mp4(media, folder / f"hit-core{core}.mp4")
        return
    image = media.squeeze(-1) if media.dim() == 3 and media.shape[-1] == 1 else media
    save_png(image, folder / f"hit-core{core}.png")


def write_summary(out_dir: str | Path, summary: dict[str, Any]) -> None:
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def waiting_notice(progress: dict[str, Any], was_waiting: bool) -> str | None:
    """The line to print when a request starts or stops waiting for a worker (PROGRESS's
    ``waiting``), or None when nothing changed."""
    waiting = progress.get("waiting")
    if waiting is not None and not was_waiting:
        return (
            f"waiting for a worker: none serves model {waiting.get('model')!r} now; the "
            f"request fails in {waiting.get('fails_in_s', 0):.0f}s unless one registers"
        )
    if waiting is None and was_waiting:
        return "a worker is back: the request goes on"
    return None


class HitLines:
    """``chords generate``'s stderr: one line per hit, a line when the request starts or stops
    waiting for a worker, and on a terminal a progress line (the evaluations and hits so far)
    that each hit line replaces."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.waiting = False

    def _clear(self) -> None:
        if self.tty:
            click.echo("\r\033[K", nl=False, err=True)

    def progress(self, progress: dict[str, Any]) -> None:
        notice = waiting_notice(progress, self.waiting)
        if notice is not None:
            self.waiting = not self.waiting
            self._clear()
            click.echo(notice, err=True)
        if self.tty:
            click.echo(
                f"\r  {progress['evaluations']} evaluations, {progress.get('hits', 0)} hit(s)",
                nl=False,
                err=True,
            )

    def hit(self, row: dict[str, Any]) -> None:
        self._clear()
        click.echo(
            f"  hit: core {row['core']:>2}  round {row['round']:>4}  "
            f"{row['speedup']:6.3f}x  {row['elapsed_s']:8.3f}s",
            err=True,
        )

    def close(self) -> None:
        self._clear()
