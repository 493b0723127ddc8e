"""chords-gateway at its edges, with real processes: a CURVE broker with one digits worker, the
gateway in front of it with two API keys and a request timeout of a few seconds (set through
``CHORDS_REQUEST_TIMEOUT``), and real HTTP clients (the ``openai`` SDK, http.client). The
broker's STATUS, read with an admin key, says what still runs.

- a request past the timeout gets 504 in OpenAI's shape, and the broker lets go of it;
- one key cannot see, fetch or cancel another key's video job (404, as for no job at all);
- the SDK's own video calls (create sends a form; retrieve, download_content, delete) work.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import imageio.v3 as iio
import openai
import pytest

from chords_mq.apps.cluster import LocalCluster
from chords_mq.apps.local_gateway import LocalGateway
from chords_mq.client import AsyncClient
from chords_mq.gateway.apikeys import create_key
from chords_mq.keys import pool_keys

TIMEOUT_S = 3.0  # the gateway's --request-timeout, from CHORDS_REQUEST_TIMEOUT
LONG = 2000  # steps of a request that runs far past TIMEOUT_S (core 1 walks them one a round)


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("gateway-edges")
    curve = pool_keys(root / "curve", clients=("client", "gateway"), admins=("ops",))
    cluster = LocalCluster(workers=1, model="digits", log_dir=root / "logs", curve=curve)
    cluster.launch()
    keys = {name: create_key(root / "api-keys", name) for name in ("alice", "bob")}
    gateway_keys = cluster.client_keys("gateway")
    gateway = LocalGateway(
        cluster.client_address,
        [
            "--api-keys",
            str(root / "api-keys"),
            "--curve-secret",
            str(gateway_keys["curve_secret"]),
            "--broker-key",
            str(gateway_keys["broker_key"]),
        ],
        log_path=root / "logs" / "gateway.log",
        env={"CHORDS_REQUEST_TIMEOUT": str(TIMEOUT_S)},
    )
    try:
        gateway.start()
        cluster.wait_for_workers(1, timeout=120)
        yield {"cluster": cluster, "gateway": gateway, "keys": keys}
    finally:
        code = gateway.stop()
        cluster.stop()
    assert code == 0


def call(
    edge: dict[str, Any], method: str, path: str, key: str, body: Any = None
) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP request with ``key``'s API key, as curl sends it."""
    connection = http.client.HTTPConnection("127.0.0.1", edge["gateway"].port, timeout=60)
    headers = {"Authorization": f"Bearer {edge['keys'][key]}"}
    payload = None
    if body is not None:
        headers["Content-Type"] = "application/json"
        payload = json.dumps(body).encode()
    try:
        connection.request(method, path, payload, headers)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def error_of(raw: bytes) -> dict[str, Any]:
    error: dict[str, Any] = json.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def sessions(edge: dict[str, Any], principal: str) -> list[str]:
    """The ids of ``principal``'s requests the broker runs (its STATUS, with an admin key)."""
    cluster = edge["cluster"]

    async def ask() -> list[str]:
        async with AsyncClient(cluster.client_address, **cluster.client_keys("ops")) as client:
            status = await client.status(timeout=5.0)
        return [s["id"] for s in status["sessions"] if s["id"].startswith(f"{principal}.")]

    return asyncio.run(ask())


def until(check: Any, limit_s: float) -> float | None:
    """Seconds until ``check()`` is true, polled; None if not within ``limit_s``."""
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        if check():
            return time.monotonic() - start
        time.sleep(0.05)
    return None


def sdk(edge: dict[str, Any], key: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{edge['gateway'].url}/v1", api_key=edge["keys"][key], max_retries=0, timeout=60
    )


# -- 1. a request past the gateway's timeout -------------------------------------------------------


def sdk_stream_past_the_timeout(edge: dict[str, Any]) -> tuple[list[Any], openai.APIError]:
    """A stream under way (its status line sent, partial images arriving) that runs past the
    timeout: the events before, and the error the SDK raised for its ``error`` event."""
    events: list[Any] = []
    try:
        for event in sdk(edge, "alice").images.generate(
            model="digits",
            prompt="a 4",
            stream=True,
            partial_images=2,
            extra_body={"steps": LONG, "cores": 4, "seed": 6},
        ):
            events.append(event)
    except openai.APIError as exc:
        return events, exc
    raise AssertionError(f"the stream ended without an error: {events}")


def test_a_request_past_the_timeout_is_a_504_and_the_broker_lets_go_of_it(edge):
    """Three of alice's requests that would run for many seconds, at once: a plain one and a
    stream that waits for its completed image are each a 504 in OpenAI's shape (code timeout)
    at the gateway's request timeout; a stream under way ends with an ``error`` event (code
    timeout) that the SDK raises. Within 2 s the broker runs nothing of alice's."""
    body = {"model": "digits", "prompt": "a 7", "steps": LONG, "cores": 4, "seed": 5}
    streamed = {**body, "stream": True, "partial_images": 0}  # no event before completed
    with ThreadPoolExecutor(3) as pool:
        answers = [
            pool.submit(call, edge, "POST", "/v1/images/generations", "alice", b)
            for b in (body, streamed)
        ]
        under_way = pool.submit(sdk_stream_past_the_timeout, edge)
        running = until(lambda: len(sessions(edge, "alice")) == 3, TIMEOUT_S)
        assert running is not None, "the three requests should be running in the broker"
        results = [answer.result(timeout=60) for answer in answers]
        events, raised = under_way.result(timeout=60)
    for status, _, raw in results:
        assert status == 504, raw
        error = error_of(raw)
        assert error["code"] == "timeout" and error["type"] == "server_error", error
        assert f"timed out after {TIMEOUT_S}s" in error["message"], error
    assert events and all(e.type == "image_generation.partial_image" for e in events)
    assert isinstance(raised.body, dict) and raised.body["code"] == "timeout", raised.body
    gone = until(lambda: not sessions(edge, "alice"), 10.0)
    assert gone is not None and gone <= 2.0, gone
    print(f"504 at the timeout; alice's requests gone from STATUS {gone:.3f}s after the answers")


# -- 2. one key's video job is not another's -------------------------------------------------------


def test_another_keys_video_job_is_not_found_and_stays_untouched(edge):
    """bob's GET, content and DELETE of alice's running job: 404, the same answer as for an id
    that never existed (nothing says the job exists). Alice's job runs on in the broker; her
    own GET sees it, her own DELETE cancels it."""
    body = {"model": "digits", "prompt": "a 9", "steps": LONG, "cores": 4, "seed": 8}
    status, _, raw = call(edge, "POST", "/v1/videos", "alice", body)
    assert status == 200, raw
    job_id = json.loads(raw)["id"]
    assert until(lambda: len(sessions(edge, "alice")) == 1, TIMEOUT_S) is not None
    nobody = f"video_{uuid.uuid4().hex}"
    for method, tail in (("GET", ""), ("GET", "/content"), ("DELETE", "")):
        got, _, raw = call(edge, method, f"/v1/videos/{job_id}{tail}", "bob")
        none, _, raw_none = call(edge, method, f"/v1/videos/{nobody}{tail}", "bob")
        assert got == none == 404, (method, tail, raw)
        assert error_of(raw) == {**error_of(raw_none), "message": error_of(raw)["message"]}
        assert error_of(raw)["message"] == error_of(raw_none)["message"].replace(nobody, job_id)
    status, _, raw = call(edge, "GET", f"/v1/videos/{job_id}", "alice")
    assert status == 200 and json.loads(raw)["status"] in ("queued", "in_progress"), raw
    assert len(sessions(edge, "alice")) == 1, "bob's DELETE must not cancel alice's job"
    status, _, raw = call(edge, "DELETE", f"/v1/videos/{job_id}", "alice")
    assert status == 200 and json.loads(raw)["deleted"] is True
    gone = until(lambda: not sessions(edge, "alice"), 10.0)
    assert gone is not None and gone <= 2.0, gone


def test_another_keys_finished_video_cannot_be_downloaded(edge):
    body = {"model": "digits", "prompt": "a 2", "steps": 10, "cores": 2, "seed": 9}
    status, _, raw = call(edge, "POST", "/v1/videos", "alice", body)
    assert status == 200, raw
    job_id = json.loads(raw)["id"]

    def done() -> bool:
        return json.loads(call(edge, "GET", f"/v1/videos/{job_id}", "alice")[2])["status"] in (
            "completed",
            "failed",
        )

    assert until(done, 30.0) is not None
    status, _, raw = call(edge, "GET", f"/v1/videos/{job_id}/content", "bob")
    assert status == 404 and error_of(raw)["param"] == "video_id"
    status, _, content = call(edge, "GET", f"/v1/videos/{job_id}/content", "alice")
    assert status == 200 and content[4:8] == b"ftyp"


# -- 4. the openai SDK's own video calls -----------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the SDK marks its videos API so
def test_the_openai_sdks_video_calls_work(edge, tmp_path):
    """``videos.create`` (a multipart form; CHORDS' fields in ``extra_body``, nested params
    included), ``retrieve`` until done, ``download_content`` (a playable MP4), ``delete``; the
    SDK's ``Video`` fields as its type declares them."""
    client = sdk(edge, "alice")
    video = client.videos.create(
        model="digits",
        prompt="a handwritten 3",
        extra_body={"steps": 12, "cores": 3, "seed": 4, "guidance_scale": 1.0, "init": [0, 4, 8]},
    )
    assert video.object == "video" and video.status in ("queued", "in_progress")
    assert video.model == "digits" and video.size is None and video.progress >= 0  # not known
    assert video.model_extra["seed"] == 4
    deadline = time.monotonic() + 30
    while video.status in ("queued", "in_progress") and time.monotonic() < deadline:
        time.sleep(0.05)
        video = client.videos.retrieve(video.id)
    assert video.status == "completed" and video.progress == 100, video
    assert video.seconds == "0.125" and video.size == "64x64"  # the MP4's: 1 frame at 8 fps
    assert video.completed_at is not None and video.expires_at is not None
    content = client.videos.download_content(video.id)
    path = tmp_path / "video.mp4"
    content.write_to_file(path)
    frames = iio.imread(path, extension=".mp4")
    assert frames.shape == (1, 64, 64, 3)
    deleted = client.videos.delete(video.id)
    assert deleted.deleted is True and deleted.id == video.id
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)
    with pytest.raises(openai.BadRequestError) as caught:  # a bad extension, read from the form
        client.videos.create(model="digits", prompt="a 3", extra_body={"steps": "many"})
    assert caught.value.param == "steps"


def test_a_form_body_reads_as_the_json_body_it_stands_for(edge):
    """What a multipart form (as curl -F sends it) may not carry; and a JSON body labelled as
    an urlencoded form (curl -d, urllib) is still read as JSON."""
    boundary = "chords-edge"

    def multipart(fields: list[tuple[str, str, str | None]]) -> bytes:
        parts = []
        for name, value, filename in fields:
            named = f'name="{name}"' + (f'; filename="{filename}"' if filename else "")
            parts.append(
                f"--{boundary}\r\nContent-Disposition: form-data; {named}\r\n\r\n{value}\r\n"
            )
        return ("".join(parts) + f"--{boundary}--\r\n").encode()

    def post(payload: bytes, content_type: str) -> tuple[int, dict[str, Any]]:
        connection = http.client.HTTPConnection("127.0.0.1", edge["gateway"].port, timeout=60)
        headers = {"Authorization": f"Bearer {edge['keys']['bob']}", "Content-Type": content_type}
        try:
            connection.request("POST", "/v1/videos", payload, headers)
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    form = f"multipart/form-data; boundary={boundary}"
    status, body = post(
        multipart([("model", "digits", None), ("prompt", "a 1", None), ("image", "x", "a.png")]),
        form,
    )
    assert status == 400 and body["error"]["param"] == "image", body
    fields = [("model", "digits", None), ("prompt", "a 1", None), ("init[]", "0", None)]
    status, body = post(multipart([*fields, ("init[x]", "2", None)]), form)
    assert status == 400 and body["error"]["param"] == "init", body
    status, body = post(multipart([*fields, ("steps", "x", None)]), form)
    assert status == 400 and body["error"]["param"] == "steps", body
    as_json = {"model": "digits", "prompt": "a 1", "steps": 6, "seed": 12, "cores": 2}
    status, body = post(json.dumps(as_json).encode(), "application/x-www-form-urlencoded")
    assert status == 200 and body["seed"] == 12 and body["prompt"] == "a 1", body
