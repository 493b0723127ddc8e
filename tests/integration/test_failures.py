"""Fault isolation: killed workers, a restarted broker, garbage on the wire, SIGTERM drain."""

from __future__ import annotations

import asyncio
import os
import signal

import msgpack
import zmq
import zmq.asyncio

from chords_mq.client import AsyncClient
from chords_mq.request import RequestSpec
from chords_mq.transport import decode_frames
from chords_mq.wire import PROTOCOL_VERSION
from tests.integration.conftest import assert_same_hits, local_hits

SPEC = {"model": "synthetic", "cores": 4, "steps": 30, "seed": 7}


async def test_sigkill_a_worker_mid_request_still_gives_the_same_output(fresh_cluster):
    cluster = fresh_cluster(workers=3, latency_ms=30.0)
    async with AsyncClient(cluster.client_address) as client:
        stream = client.generate(timeout=120, **SPEC)
        hits = []
        async for hit in stream:
            hits.append(hit)
            if hit.core == 0:  # round 4 of 30: every worker is busy now
                os.kill(cluster.workers[1].pid, signal.SIGKILL)
        status = await client.status()
    assert_same_hits(hits, local_hits(RequestSpec(**SPEC)))
    assert stream.stats["retries"] >= 1, "the killed worker's task must have been re-queued"
    assert len(status["workers"]) == 2


async def test_broker_restart_workers_reregister_and_the_request_finishes(fresh_cluster):
    cluster = fresh_cluster(workers=2, latency_ms=30.0)
    async with AsyncClient(cluster.client_address, heartbeat_s=0.2) as client:
        stream = client.generate(timeout=120, **SPEC)
        hits = []
        async for hit in stream:
            hits.append(hit)
            if hit.core == 0:
                cluster.broker.kill()
                cluster.broker.wait()
                cluster.start_broker()
        status = await client.status()
    assert stream.resubmissions >= 1
    assert len(status["workers"]) == 2, "both workers must register with the new broker"
    assert_same_hits(hits, local_hits(RequestSpec(**SPEC)))


async def raw_dealer(ctx: zmq.asyncio.Context, address: str) -> zmq.asyncio.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(address)
    return sock


GARBAGE = [
    [b"\xff\x00garbage"],
    [msgpack.packb({"v": PROTOCOL_VERSION, "kind": "SUBMIT"})],
    [
        msgpack.packb(
            {
                "v": PROTOCOL_VERSION,
                "kind": "SUBMIT",
                "epoch": 0,
                "req": "x",
                "task": None,
                "attempt": None,
                "tensors": [],
                "body": {"request": {"model": 3}},
            }
        )
    ],
    [
        msgpack.packb(
            {
                "v": PROTOCOL_VERSION,
                "kind": "RESULT",
                "epoch": 0,
                "req": "x",
                "task": 1,
                "attempt": 0,
                "tensors": [["output", "float32", [1000]]],
                "body": {},
            }
        ),
        b"\x00" * 12,
    ],
]


async def test_garbage_senders_are_rejected_while_others_keep_running(clusters):
    cluster = clusters[2]
    ctx = zmq.asyncio.Context()
    bad_client = await raw_dealer(ctx, cluster.client_address)
    bad_worker = await raw_dealer(ctx, cluster.worker_address)
    try:
        async with AsyncClient(cluster.client_address) as client:
            running = asyncio.ensure_future(_collect(client, **{**SPEC, "steps": 60, "seed": 8}))
            replies, worker_replies = [], []
            for frames in GARBAGE:
                await bad_client.send_multipart(frames)
                reply = decode_frames(await asyncio.wait_for(bad_client.recv_multipart(), 10))
                replies.append((reply.kind, reply.body().get("code")))
                await bad_worker.send_multipart(frames)
                reply = decode_frames(await asyncio.wait_for(bad_worker.recv_multipart(), 10))
                worker_replies.append((reply.kind, reply.body().get("code")))
            hits = await running
            status = await client.status()
        assert replies[0] == ("ERROR", "bad_message")
        assert all(kind == "ERROR" for kind, _ in replies)
        assert replies[2] == ("ERROR", "invalid_request")
        # a well-formed SUBMIT at the worker port is a client at the wrong port; the rest
        # (malformed, or a RESULT from nobody registered) disconnect the sender
        assert worker_replies[2] == ("ERROR", "wrong_port")
        assert [kind for kind, _ in worker_replies[:2] + worker_replies[3:]] == ["DISCONNECT"] * 3
        assert_same_hits(hits, local_hits(RequestSpec(**{**SPEC, "steps": 60, "seed": 8})))
        assert len(status["workers"]) == 2
    finally:
        ctx.destroy(linger=0)  # closes both raw sockets, even when an assertion failed


async def _collect(client: AsyncClient, **kwargs):
    return [hit async for hit in client.generate(timeout=120, **kwargs)]


async def test_sigterm_drains_running_requests(fresh_cluster, tmp_path):
    cluster = fresh_cluster(workers=2, latency_ms=20.0)
    async with AsyncClient(cluster.client_address) as client:
        stream = client.generate(timeout=120, **SPEC)
        hits = []
        async for hit in stream:
            hits.append(hit)
            if hit.core == 0:
                cluster.broker.send_signal(signal.SIGTERM)
    assert_same_hits(hits, local_hits(RequestSpec(**SPEC)))
    assert await asyncio.get_running_loop().run_in_executor(None, cluster.broker.wait, 10) == 0
    log = (tmp_path / "logs" / "broker.log").read_text()
    assert "draining 1 request(s)" in log
    # a clean drain: no callback left to touch a closed socket (it logged ENOTSOCK once)
    assert " ERROR " not in log and "Traceback" not in log, log
