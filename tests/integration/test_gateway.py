"""chords-gateway end to end: a CURVE broker with digits workers, the gateway as a real process
in front of it with two API keys, and the real ``openai`` SDK, curl-style raw HTTP and the
broker's own STATUS (seen with an admin key) checking what the gateway does."""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
from PIL import Image

from chords_mq.apps.cluster import LocalCluster, free_port
from chords_mq.apps.local_gateway import LocalGateway, gateway_command
from chords_mq.client import AsyncClient
from chords_mq.keys import pool_keys

BIN = Path(sys.executable).parent


def apikey(keys: Path, name: str) -> str:
    """``chords apikey create NAME --file KEYS``: the secret, alone on its one line."""
    result = subprocess.run(
        [str(BIN / "chords"), "apikey", "create", name, "--file", str(keys)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    (secret,) = result.stdout.splitlines()
    return secret


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("gateway")
    curve = pool_keys(root / "curve", clients=("client", "gateway"), admins=("ops",))
    cluster = LocalCluster(
        workers=2,
        model="digits",
        log_dir=root / "logs",
        curve=curve,
        # the gateway is one client of the broker: past 3 requests at once it answers busy
        extra_broker_args=["--max-client-requests", "3"],
    )
    cluster.launch()
    keys = root / "api-keys"
    secrets = {name: apikey(keys, name) for name in ("alice", "bob")}
    gateway_keys = cluster.client_keys("gateway")
    gateway = LocalGateway(
        cluster.client_address,
        [
            "--api-keys",
            str(keys),
            "--max-requests-per-key",
            "2",
            "--curve-secret",
            str(gateway_keys["curve_secret"]),
            "--broker-key",
            str(gateway_keys["broker_key"]),
            "--log-format",
            "json",
        ],
        log_path=root / "logs" / "gateway.log",
    )
    try:
        gateway.start()
        cluster.wait_for_workers(2, timeout=120)
        yield {"cluster": cluster, "gateway": gateway, "keys": secrets, "root": root}
    finally:
        code = gateway.stop()
        cluster.stop()
    assert code == 0, "chords-gateway did not stop cleanly on SIGTERM"


def sdk(stack: dict[str, Any], key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{stack['gateway'].url}/v1",
        api_key=key or stack["keys"]["alice"],
        max_retries=0,
        timeout=120,
    )


def png(b64: str) -> Image.Image:
    data = base64.b64decode(b64)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return Image.open(io.BytesIO(data))


def post(
    stack: dict[str, Any], path: str, body: bytes | dict[str, Any], key: str | None = "alice"
) -> tuple[int, dict[str, str], bytes]:
    """A raw HTTP POST, as curl sends it."""
    connection = http.client.HTTPConnection("127.0.0.1", stack["gateway"].port, timeout=120)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {stack['keys'].get(key, key)}"
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        connection.request("POST", path, payload, headers)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def error_of(raw: bytes) -> dict[str, Any]:
    error: dict[str, Any] = json.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


# -- the acceptance list, through the real openai SDK ----------------------------------------------


def test_sdk_generate_returns_a_png_of_the_models_size(stack):
    result = sdk(stack).images.generate(
        model="digits", prompt="a handwritten 7", response_format="b64_json"
    )
    (image,) = result.data
    picture = png(image.b64_json)
    assert picture.size == (64, 64)  # digits: 8x8 pixels drawn 8 times larger
    assert result.size == "64x64"
    assert image.model_extra["core"] == 1  # the returned hit: core 1, the sequential solve


def test_sdk_stream_gives_partials_then_the_completed_image_of_the_same_seed(stack):
    client = sdk(stack)
    extra = {"seed": 11, "steps": 20, "cores": 4}
    plain = client.images.generate(
        model="digits", prompt="a handwritten 3", response_format="b64_json", extra_body=extra
    )
    events = list(
        client.images.generate(
            model="digits",
            prompt="a handwritten 3",
            stream=True,
            partial_images=3,
            extra_body=extra,
        )
    )
    kinds = [event.type for event in events]
    assert kinds[-1] == "image_generation.completed" and kinds.count(kinds[-1]) == 1
    partials = events[:-1]
    assert 1 <= len(partials) <= 3
    assert all(e.type == "image_generation.partial_image" for e in partials)
    assert [e.partial_image_index for e in partials] == list(range(len(partials)))
    rounds = [e.model_extra["round"] for e in partials]
    assert rounds == sorted(rounds)  # fastest core first
    assert partials[0].model_extra["round_speedup"] > 1.0
    completed = events[-1]
    assert completed.usage.total_tokens == 0
    assert png(completed.b64_json).tobytes() == png(plain.data[0].b64_json).tobytes()


def test_sdk_wrong_key_is_an_authentication_error(stack):
    with pytest.raises(openai.AuthenticationError):
        sdk(stack, key="sk-chords-not-a-key").models.list()
    status, _, raw = post(stack, "/v1/images/generations", {"model": "digits"}, key=None)
    assert status == 401 and error_of(raw)["code"] == "missing_api_key"


def test_sdk_bad_steps_is_a_bad_request_naming_steps(stack):
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(stack).images.generate(model="digits", prompt="7", extra_body={"steps": -1})
    assert caught.value.param == "steps"
    assert "steps" in caught.value.message


def test_sdk_models_list_lists_digits(stack):
    assert [model.id for model in sdk(stack).models.list()] == ["digits"]


# -- raw HTTP, as curl sends it ------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        ({"model": "digits", "prompt": "7", "colour": "red"}, 400, "colour"),
        ({"model": "digits", "prompt": "7", "n": 1000}, 400, "n"),
        ({"model": "digits", "prompt": "7" * 5000}, 400, "prompt"),
        ({"model": "digits", "prompt": "7", "size": "big"}, 400, "size"),
        ({"model": "digits", "prompt": "7", "cores": "four"}, 400, "cores"),
        ({"model": "digits", "prompt": "7", "init": [0, 5, 3]}, 400, "init"),
        ({"model": "digits", "prompt": "7", "stop": "soon"}, 400, "stop"),
        ({"model": "digits", "prompt": "7", "method": "magic"}, 400, "method"),
        ({"model": "digits", "prompt": "no digit here", "steps": 4}, 400, "prompt"),
        ({"model": "flux-dev", "prompt": "7"}, 404, "model"),
        (b"x" * (2 << 20), 413, None),
    ],
    ids=lambda v: str(v)[:24],
)
def test_bad_requests_get_openai_shaped_errors_naming_the_param(stack, body, status, param):
    got, _, raw = post(stack, "/v1/images/generations", body)
    assert got == status, raw
    error = error_of(raw)
    assert error["param"] == param, error
    if status == 404:
        assert "digits" in error["message"]  # it lists the served models


def test_n_images_are_n_seeds(stack):
    status, _, raw = post(
        stack,
        "/v1/images/generations",
        {"model": "digits", "prompt": "a handwritten 5", "n": 3, "seed": 7, "steps": 10},
    )
    assert status == 200, raw
    data = json.loads(raw)["data"]
    assert [item["seed"] for item in data] == [7, 8, 9]
    assert len({item["b64_json"] for item in data}) == 3


def test_past_the_per_key_limit_a_request_gets_429_with_retry_after(stack):
    """Limit 2 per key: of 5 slow requests from alice at once, the ones past 2 get 429 with
    Retry-After, the others 200; bob's key has its own limit."""
    body = {"model": "digits", "prompt": "7", "steps": 300, "seed": 1}
    with ThreadPoolExecutor(6) as pool:
        mine = [pool.submit(post, stack, "/v1/images/generations", body) for _ in range(5)]
        time.sleep(0.5)
        theirs = pool.submit(post, stack, "/v1/images/generations", {**body, "steps": 4}, "bob")
        answers = [future.result(timeout=120) for future in mine]
        assert theirs.result(timeout=120)[0] == 200
    statuses = sorted(status for status, _, _ in answers)
    assert set(statuses) == {200, 429} and statuses.count(200) >= 2, statuses
    for status, headers, raw in answers:
        if status == 429:
            assert int(headers["retry-after"]) >= 1
            assert error_of(raw)["type"] == "rate_limit_error"


def test_a_busy_broker_is_a_429_with_retry_after(stack):
    """The broker takes 3 requests of the gateway at once: alice's 2 and bob's 2 make 4, and
    the one past 3 is refused busy, which the gateway answers 429 with Retry-After."""
    body = {"model": "digits", "prompt": "7", "steps": 300, "seed": 2}
    with ThreadPoolExecutor(4) as pool:
        futures = [
            pool.submit(post, stack, "/v1/images/generations", body, key)
            for key in ("alice", "alice", "bob", "bob")
        ]
        answers = [future.result(timeout=120) for future in futures]
    busy = [(headers, error_of(raw)) for status, headers, raw in answers if status == 429]
    assert sorted(status for status, _, _ in answers) == [200, 200, 200, 429], answers
    ((headers, error),) = busy
    assert error["code"] == "busy" and int(headers["retry-after"]) >= 1


# -- a client that goes away cancels its request in the broker ------------------------------------


def running_of(stack: dict[str, Any], principal: str) -> list[str]:
    """The ids of ``principal``'s requests the broker runs, from its STATUS (an admin key)."""
    cluster = stack["cluster"]

    async def ask() -> list[str]:
        async with AsyncClient(cluster.client_address, **cluster.client_keys("ops")) as client:
            status = await client.status(timeout=5.0)
        return [s["id"] for s in status["sessions"] if s["id"].startswith(f"{principal}.")]

    return asyncio.run(ask())


def gone_within(stack: dict[str, Any], principal: str, limit_s: float) -> float | None:
    """Seconds until the broker runs nothing of ``principal``'s (None: not within limit_s)."""
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        if not running_of(stack, principal):
            return time.monotonic() - start
        time.sleep(0.05)
    return None


def open_request(
    stack: dict[str, Any], body: dict[str, Any], key: str
) -> http.client.HTTPConnection:
    connection = http.client.HTTPConnection("127.0.0.1", stack["gateway"].port, timeout=60)
    connection.request(
        "POST",
        "/v1/images/generations",
        json.dumps(body),
        {"Authorization": f"Bearer {stack['keys'][key]}", "Content-Type": "application/json"},
    )
    return connection


def test_a_client_that_disconnects_mid_stream_cancels_its_request(stack):
    body = {
        "model": "digits",
        "prompt": "7",
        "steps": 2000,
        "cores": 8,
        "stream": True,
        "partial_images": 3,
    }
    connection = open_request(stack, body, "bob")
    response = connection.getresponse()
    assert response.status == 200
    first = response.readline()
    assert first.startswith(b"event: image_generation.partial_image"), first
    assert running_of(stack, "bob"), "the request should still run after its first hit"
    connection.sock.close()  # the client goes away mid-stream
    connection.close()
    seconds = gone_within(stack, "bob", 10.0)
    assert seconds is not None and seconds <= 2.0, seconds
    print(f"mid-stream disconnect: bob's request gone from STATUS after {seconds:.3f}s")


def test_a_client_that_disconnects_mid_request_cancels_its_requests(stack):
    body = {"model": "digits", "prompt": "7", "steps": 2000, "n": 2}
    connection = open_request(stack, body, "bob")
    deadline = time.monotonic() + 30
    while len(running_of(stack, "bob")) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(running_of(stack, "bob")) == 2
    connection.sock.close()
    connection.close()
    seconds = gone_within(stack, "bob", 10.0)
    assert seconds is not None and seconds <= 2.0, seconds
    print(f"mid-request disconnect: bob's 2 requests gone from STATUS after {seconds:.3f}s")


# -- the daemon's conventions ---------------------------------------------------------------


def test_healthz_and_metrics(stack):
    import urllib.request

    with urllib.request.urlopen(f"{stack['gateway'].url}/healthz", timeout=10) as response:
        report = json.load(response)
    assert report["status"] == "ok" and report["models"] == ["digits"]
    with urllib.request.urlopen(f"{stack['gateway'].url}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert 'chords_gateway_requests_total{route="/v1/images/generations",status="200"}' in text
    log = (stack["root"] / "logs" / "gateway.log").read_text().splitlines()
    assert log and all(json.loads(line)["daemon"] == "chords-gateway" for line in log)


def test_without_a_broker_healthz_and_requests_answer_503(tmp_path):
    config = tmp_path / "gateway.toml"
    config.write_text('broker-timeout = 1.0\nlog-format = "json"\n')
    port = free_port()
    gateway = LocalGateway(
        f"tcp://127.0.0.1:{free_port()}",  # nothing listens there
        ["--config", str(config)],
        log_path=tmp_path / "gateway.log",
        port=port,
    )
    with gateway:
        status, _, raw = post(
            {"gateway": gateway, "keys": {}},
            "/v1/images/generations",
            {"model": "digits", "prompt": "7"},
            key=None,
        )
        assert status == 503 and error_of(raw)["code"] == "broker_unreachable"
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"{gateway.url}/healthz", timeout=10)
        assert caught.value.code == 503
    assert gateway.process is not None and gateway.process.returncode == 0
    lines = (tmp_path / "gateway.log").read_text().splitlines()  # log-format from --config
    assert lines and all(json.loads(line)["daemon"] == "chords-gateway" for line in lines)


def test_off_loopback_without_api_keys_it_refuses_to_start():
    result = subprocess.run(
        [*gateway_command(), "--http-bind", "0.0.0.0:0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "CHORDS_BROKER": "tcp://127.0.0.1:1"},
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "--api-keys" in errors[0], result.stderr


# -- the README's examples, run as written (only the address is this test's) -----------------------

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_block(language: str, needle: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)
    (block,) = [b for b in blocks if needle in b]
    return str(block)


def test_the_readme_curl_example_runs(stack, tmp_path):
    block = readme_block("bash", "chords-gateway --broker")
    curl = block[block.index("curl ") :]
    assert "http://127.0.0.1:8000" in curl
    env = {**os.environ, "OPENAI_API_KEY": stack["keys"]["alice"], "PATH": f"{BIN}:/usr/bin:/bin"}
    result = subprocess.run(
        ["bash", "-c", curl.replace("http://127.0.0.1:8000", stack["gateway"].url)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "20"]  # core 1 returned, at round N
    assert Image.open(tmp_path / "seven.png").size == (64, 64)


def test_the_readme_openai_sdk_example_runs(stack):
    code = readme_block("python", "from openai import OpenAI")
    code = code.replace("http://127.0.0.1:8000", stack["gateway"].url)
    env = {**os.environ, "OPENAI_API_KEY": stack["keys"]["alice"]}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "64x64 1"
    promised = [line.removeprefix("# ") for line in code.splitlines() if line.startswith("# ")]
    assert lines[1:] == promised
