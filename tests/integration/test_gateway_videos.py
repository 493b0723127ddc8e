"""The gateway's video jobs end to end: a tiny Wan pipeline built from configs, served by a real
worker, behind a real broker and gateway; the MP4 read back with imageio."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import imageio.v3 as iio
import pytest

from chords_mq.apps.cluster import LocalCluster
from chords_mq.apps.local_gateway import LocalGateway
from tests import tiny_pipelines as tiny

FRAMES = 9  # Wan: num_frames - 1 a multiple of 4
BODY = {
    "prompt": "a cat",
    "size": "16x16",
    "cores": 4,
    "seed": 1,
    "params": {"num_frames": FRAMES, "max_sequence_length": 32},
}


@pytest.fixture(scope="module")
def video_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("gateway-videos")
    cluster = LocalCluster(workers=0, log_dir=root / "logs")
    cluster.start_broker()
    try:
        folder = tiny.save_tiny(tiny.build_tiny_wan(), root / "tiny-wan")
        cluster.start_worker(extra_args=["--model", str(folder)])
        with LocalGateway(cluster.client_address, log_path=root / "logs" / "gateway.log") as gw:
            status = cluster.wait_for_workers(1, timeout=120)
            yield {"gateway": gw, "cluster": cluster, "model": status["workers"][0]["model"]}
    finally:
        cluster.stop()


def call(stack: dict[str, Any], method: str, path: str, body: Any = None) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(stack["gateway"].url + path, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_a_video_job_reports_rising_progress_and_serves_a_playable_mp4(video_stack):
    status, raw = call(
        video_stack, "POST", "/v1/videos", {"model": video_stack["model"], "steps": 40, **BODY}
    )
    assert status == 200, raw
    job = json.loads(raw)
    assert job["object"] == "video" and job["status"] in ("queued", "in_progress")
    seen = [job["progress"]]
    deadline = time.monotonic() + 120
    while job["status"] not in ("completed", "failed") and time.monotonic() < deadline:
        time.sleep(0.02)
        status, raw = call(video_stack, "GET", f"/v1/videos/{job['id']}")
        assert status == 200
        job = json.loads(raw)
        seen.append(job["progress"])
    assert job["status"] == "completed", job
    assert seen == sorted(seen) and seen[-1] == 100
    assert any(0 < p < 100 for p in seen), seen  # it rose on the way, not only at the end
    status, content = call(video_stack, "GET", f"/v1/videos/{job['id']}/content")
    assert status == 200 and content[4:8] == b"ftyp"  # an MP4 container
    frames = iio.imread(content, extension=".mp4")
    assert frames.shape == (FRAMES, 16, 16, 3)


def test_deleting_a_running_video_job_cancels_it(video_stack):
    status, raw = call(
        video_stack, "POST", "/v1/videos", {"model": video_stack["model"], "steps": 2000, **BODY}
    )
    assert status == 200, raw
    job_id = json.loads(raw)["id"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # running: its worker holds it
        (worker,) = video_stack["cluster"].wait_for_workers(1)["workers"]
        if worker["prepared"]:
            break
        time.sleep(0.05)
    assert worker["prepared"] == 1, worker
    status, raw = call(video_stack, "DELETE", f"/v1/videos/{job_id}")
    assert status == 200 and json.loads(raw) == {
        "id": job_id,
        "object": "video.deleted",
        "deleted": True,
    }
    status, raw = call(video_stack, "GET", f"/v1/videos/{job_id}")
    assert status == 404 and json.loads(raw)["error"]["param"] == "video_id"
    # the broker let go of it: its worker holds no request (STATUS) soon after
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        (worker,) = video_stack["cluster"].wait_for_workers(1)["workers"]
        if worker["prepared"] == 0 and not worker["busy"]:
            break
        time.sleep(0.05)
    assert worker["prepared"] == 0 and not worker["busy"], worker


def test_a_video_body_with_an_unknown_field_is_refused_naming_it(video_stack):
    status, raw = call(
        video_stack, "POST", "/v1/videos", {"model": video_stack["model"], "fps": 30, **BODY}
    )
    assert status == 400 and json.loads(raw)["error"]["param"] == "fps"
