"""The gateway's pure parts: a body read into RequestSpecs, refusals naming their parameter, API
key files. No sockets (the daemon is tested end to end in tests/integration/test_gateway.py)."""

from __future__ import annotations

import stat

import pytest

from chords_mq.gateway.apikeys import ApiKeyError, KeyRing, create_key
from chords_mq.gateway.errors import ApiError, param_named
from chords_mq.gateway.images import parse_image_request
from chords_mq.gateway.principals import Principals
from chords_mq.gateway.videos import VideoJob, VideoJobs, parse_video_request


def parse(**body):
    return parse_image_request(body, max_n=8, max_prompt_chars=100)


def test_a_body_becomes_one_spec_per_seed_with_the_extensions():
    request = parse(
        model="sd",
        prompt="a fox",
        n=3,
        size="512x256",
        seed=5,
        steps=20,
        cores=6,
        stop="core-index:1",
        init="0,2,4,8,12,16",
        guidance_scale=4.5,
        negative_prompt="blur",
        quality="hd",
        user="me",  # OpenAI fields that do not apply: ignored
    )
    assert [spec.seed for spec in request.specs] == [5, 6, 7]
    spec = request.specs[0]
    assert (spec.steps, spec.cores, spec.stop, spec.output) == (20, 6, "core-index:1", "media")
    assert spec.init_sequence == (0, 2, 4, 8, 12, 16)
    assert spec.params == {
        "prompt": "a fox",
        "negative_prompt": "blur",
        "guidance_scale": 4.5,
        "width": 512,
        "height": 256,
    }
    assert request.size == (512, 256) and not request.stream


def test_digits_reads_guidance_scale_as_its_guidance():
    assert parse(model="digits", prompt="7", guidance_scale=2.0).specs[0].params == {
        "prompt": "7",
        "guidance": 2.0,
    }


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "7"}, "model"),
        ({"model": "digits"}, "prompt"),
        ({"model": "digits", "prompt": "x" * 101}, "prompt"),
        ({"model": "digits", "prompt": "7", "n": 9}, "n"),
        ({"model": "digits", "prompt": "7", "n": True}, "n"),
        ({"model": "digits", "prompt": "7", "steps": -1}, "steps"),
        ({"model": "digits", "prompt": "7", "steps": 2.5}, "steps"),
        ({"model": "digits", "prompt": "7", "cores": 0}, "cores"),
        ({"model": "digits", "prompt": "7", "seed": -3}, "seed"),
        ({"model": "digits", "prompt": "7", "method": "magic"}, "method"),
        ({"model": "digits", "prompt": "7", "method": "sequential", "cores": 4}, "method"),
        ({"model": "digits", "prompt": "7", "init": [0, 9, 3]}, "init"),
        ({"model": "digits", "prompt": "7", "init": "0,a"}, "init"),
        ({"model": "digits", "prompt": "7", "stop": "soon"}, "stop"),
        ({"model": "digits", "prompt": "7", "size": "10x"}, "size"),
        ({"model": "digits", "prompt": "7", "size": "9000x10"}, "size"),
        ({"model": "digits", "prompt": "7", "response_format": "url"}, "response_format"),
        ({"model": "digits", "prompt": "7", "output_format": "webp"}, "output_format"),
        ({"model": "digits", "prompt": "7", "stream": "yes"}, "stream"),
        ({"model": "digits", "prompt": "7", "stream": True, "n": 2}, "n"),
        ({"model": "digits", "prompt": "7", "partial_images": 99}, "partial_images"),
        ({"model": "digits", "prompt": "7", "guidance_scale": "high"}, "guidance_scale"),
        ({"model": "digits", "prompt": "7", "params": [1]}, "params"),
        ({"model": "digits", "prompt": "7", "params": {"x": float("nan")}}, "params"),
        ({"model": "digits", "prompt": "7", "colour": "red"}, "colour"),
    ],
)
def test_a_bad_field_is_a_400_naming_it(body, param):
    with pytest.raises(ApiError) as caught:
        parse_image_request(body, max_n=8, max_prompt_chars=100)
    assert caught.value.status == 400
    assert caught.value.body()["error"]["param"] == param, caught.value.message


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ("digits model: unknown params ['height', 'width']", "size"),
        ("digits model: no digit 0-9 in prompt 'x'", "prompt"),
        ("flux: a prompt is required", "prompt"),
        ("sd: negative_prompt must be a string", "negative_prompt"),
        ("bad stop rule 'x': expected 'none', 'core-index:M' or 'residual-cores:TAU'", "stop"),
        ("cores=4 but the init sequence has 3", "cores"),
        ("the init sequence must be strictly increasing", "init"),
        ("something else entirely", None),
    ],
)
def test_a_refusal_from_the_broker_or_a_worker_names_its_parameter(message, param):
    assert param_named(message) == param


def test_a_video_body_takes_no_image_fields():
    with pytest.raises(ApiError) as caught:
        parse_video_request({"model": "wan", "prompt": "a cat", "n": 2}, max_prompt_chars=100)
    assert caught.value.param == "n"
    request = parse_video_request(
        {"model": "wan", "prompt": "a cat", "seconds": "4", "params": {"num_frames": 9}},
        max_prompt_chars=100,
    )
    assert request.specs[0].params == {"num_frames": 9, "prompt": "a cat"}


def test_a_video_job_is_its_owners_only():
    jobs = VideoJobs(limit=4, ttl_s=60)
    request = parse_video_request({"model": "wan", "prompt": "a cat"}, max_prompt_chars=100)
    jobs.jobs["video_1"] = VideoJob("video_1", "alice", request)
    assert jobs.get("alice", "video_1").owner == "alice"
    with pytest.raises(ApiError) as caught:
        jobs.get("bob", "video_1")
    assert caught.value.status == 404


def test_api_keys_are_hashed_named_principals(tmp_path):
    keys = tmp_path / "keys"
    alice, bob = create_key(keys, "alice"), create_key(keys, "bob")
    assert alice.startswith("sk-chords-") and alice != bob
    text = keys.read_text()
    assert alice not in text and bob not in text  # only their hashes
    assert stat.S_IMODE(keys.stat().st_mode) == 0o600
    ring = KeyRing.load(keys)
    assert ring.principal(alice) == "alice" and ring.principal(bob) == "bob"
    assert ring.principal(alice + "x") is None and ring.principal("") is None
    with pytest.raises(ApiKeyError):
        create_key(keys, "alice")  # a name is one key
    with pytest.raises(ApiKeyError):
        create_key(keys, "no spaces")
    keys.write_text("alice sha256:nothex\n")
    with pytest.raises(ApiKeyError, match=":1:"):
        KeyRing.load(keys)


def test_each_key_has_its_own_limit_and_a_wrong_key_is_401(tmp_path):
    secret = create_key(tmp_path / "keys", "alice")
    principals = Principals(KeyRing.load(tmp_path / "keys"), max_requests_per_key=2)
    assert principals.authenticate(f"Bearer {secret}") == "alice"
    for header in (None, "Bearer", f"Basic {secret}", "Bearer sk-chords-wrong"):
        with pytest.raises(ApiError) as caught:
            principals.authenticate(header)
        assert caught.value.status == 401
    principals.take("alice")
    principals.take("alice")
    with pytest.raises(ApiError) as caught:
        principals.take("alice")
    assert caught.value.status == 429 and caught.value.headers() == {"Retry-After": "1"}
    principals.take("bob")  # another key: its own count
    principals.give_back("alice")
    principals.take("alice")
