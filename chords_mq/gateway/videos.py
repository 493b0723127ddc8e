"""Video jobs, as SGLang and OpenAI serve them: ``POST /v1/videos`` starts one, ``GET
/v1/videos/{id}`` reads its status and progress (0..100, from the broker's PROGRESS: the
step core 1 has reached), ``GET /v1/videos/{id}/content`` is its MP4 and ``DELETE``
cancels it. The table is bounded; a finished job and its file go after ``video_ttl_s``.

A job reads as the ``openai`` SDK's ``Video`` (``client.videos.create``, which sends a form,
``retrieve``, ``download_content``, ``delete``): ``status`` queued, in_progress, completed or
failed; ``size`` "WxH" and ``seconds`` the clip's length as text (the asked-for size and
``num_frames`` until the MP4 is made, then the MP4's).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from chords_mq.client import AsyncClient
from chords_mq.gateway.errors import ApiError, from_failure
from chords_mq.gateway.images import EXTENSIONS, ImageRequest, parse_image_request, run_to_end
from chords_mq.media import save_mp4

VIDEO_FIELDS = frozenset({"model", "prompt", "size", "seconds"})
FPS = 8


@dataclass
class VideoJob:
    id: str
    owner: str
    request: ImageRequest
    created_at: int = field(default_factory=lambda: int(time.time()))
    status: str = "queued"  # queued, in_progress, completed, failed (OpenAI's)
    progress: int = 0
    completed_at: int | None = None
    finished: float | None = None  # monotonic, for expiry
    error: dict[str, Any] | None = None
    path: Path | None = None
    task: asyncio.Task[None] | None = None
    made: tuple[int, int, int] | None = None  # the MP4's frames, width and height

    def body(self, ttl_s: float) -> dict[str, Any]:
        spec = self.request.specs[0]
        frames = spec.params.get("num_frames")
        size = self.request.size
        if self.made is not None:
            frames, size = self.made[0], self.made[1:]
        seconds = f"{frames / FPS:g}" if isinstance(frames, int) and frames > 0 else None
        return {
            "id": self.id,
            "object": "video",
            "model": spec.model,
            "status": self.status,
            "progress": self.progress,
            "created_at": self.created_at,
            "completed_at": self.completed_at,
            "expires_at": None if self.completed_at is None else self.completed_at + int(ttl_s),
            "prompt": spec.params.get("prompt"),
            "seconds": seconds,
            "size": None if size is None else f"{size[0]}x{size[1]}",
            "seed": spec.seed,
            "error": self.error,
        }

    def on_progress(self, body: dict[str, Any]) -> None:
        if self.status == "queued":
            self.status = "in_progress"
        # Core 1 (the sequential solve, the hit a request returns by default) walks its steps
        # one per round, so its step is the share of the work done; without it, the furthest.
        steps = self.request.specs[0].steps
        reached = {int(core): int(step) for core, step in body.get("cores") or []}
        step = reached.get(1, max(reached.values(), default=0))
        self.progress = max(self.progress, min(99, 100 * step // max(1, steps)))


def parse_video_request(body: Any, *, max_prompt_chars: int) -> ImageRequest:
    """A ``/v1/videos`` body: ``model``, ``prompt``, ``size`` and CHORDS' extensions
    (``params`` carries the family's own, e.g. ``num_frames``); ``seconds`` is ignored."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    unknown = sorted(set(body) - VIDEO_FIELDS - EXTENSIONS)
    if unknown:
        raise ApiError(
            400, f"unknown parameter: {unknown[0]!r}", param=unknown[0], code="unknown_parameter"
        )
    fields = {key: value for key, value in body.items() if key != "seconds"}
    return parse_image_request(fields, max_n=1, max_prompt_chars=max_prompt_chars)


def frames_of(media: torch.Tensor) -> torch.Tensor:
    """uint8 frames (F, H, W, 3) of a decoded hit (a video, or one picture as one frame)."""
    frames = media if media.dim() == 4 else media.unsqueeze(0)
    if frames.dim() == 3:
        frames = frames.unsqueeze(-1)
    if frames.shape[-1] == 1:
        frames = frames.expand(*frames.shape[:-1], 3)
    return frames


class VideoJobs:
    """The job table: at most ``limit`` jobs, each its owner's only."""

    def __init__(self, limit: int, ttl_s: float) -> None:
        self.limit = limit
        self.ttl_s = ttl_s
        self.jobs: dict[str, VideoJob] = {}
        self._folder: Path | None = None

    @property
    def folder(self) -> Path:
        """Where the MP4s are kept: a private temporary folder, made on first use."""
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="chords-gateway-videos-"))
        return self._folder

    def expire(self) -> None:
        now = time.monotonic()
        for job in [j for j in self.jobs.values() if j.finished is not None]:
            if now - job.finished >= self.ttl_s:  # type: ignore[operator]
                self.drop(job)

    def drop(self, job: VideoJob) -> None:
        self.jobs.pop(job.id, None)
        if job.task is not None and not job.task.done():
            job.task.cancel()
        if job.path is not None:
            job.path.unlink(missing_ok=True)

    def start(
        self,
        owner: str,
        request: ImageRequest,
        client: AsyncClient,
        timeout: float,
        on_end: Any,
    ) -> VideoJob:
        self.expire()
        if len(self.jobs) >= self.limit:
            raise ApiError(
                429,
                f"the gateway holds {len(self.jobs)} video jobs, its limit; delete finished ones "
                "or wait for them to expire",
                code="too_many_jobs",
                retry_after_s=5.0,
            )
        job = VideoJob(f"video_{uuid.uuid4().hex}", owner, request)
        self.jobs[job.id] = job
        job.task = asyncio.create_task(self._run(job, client, timeout, on_end))
        return job

    def get(self, owner: str, job_id: str) -> VideoJob:
        self.expire()
        job = self.jobs.get(job_id)
        if job is None or job.owner != owner:  # another key's job does not exist for you
            raise ApiError(404, f"no video job {job_id!r}", param="video_id", code="not_found")
        return job

    async def _run(self, job: VideoJob, client: AsyncClient, timeout: float, on_end: Any) -> None:
        spec = job.request.specs[0]
        try:
            stream_id = f"{job.owner}.{job.id}"
            outcome = await run_to_end(
                client, spec, stream_id, timeout, on_progress=job.on_progress
            )
            media = outcome.returned.media
            if media is None:
                raise ApiError(502, "the request finished without media", code="no_media")
            path = self.folder / f"{job.id}.mp4"
            frames = frames_of(media)
            await asyncio.to_thread(save_mp4, frames, path, FPS)
            job.made = (frames.shape[0], frames.shape[2], frames.shape[1])
            job.path, job.status, job.progress = path, "completed", 100
        except asyncio.CancelledError:
            job.status = "failed"
            job.error = {"code": "cancelled", "message": "the job was deleted"}
            raise
        except Exception as exc:
            error = exc if isinstance(exc, ApiError) else from_failure(exc)
            job.status = "failed"
            job.error = {"code": error.code or "failed", "message": error.message}
        finally:
            job.completed_at = int(time.time())
            job.finished = time.monotonic()
            on_end()

    async def close(self) -> None:
        tasks = [j.task for j in self.jobs.values() if j.task is not None and not j.task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        if self._folder is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(self._folder)
