"""The worker's data plane over real TCP sockets on loopback: the FETCH/DATA/REFUSED codec, a
``DataServer`` (its own thread and port) serving a ``LatentStore``, and a ``DataClient``
pulling from it. Refusals are typed, malformed messages are refused while other peers are
served, every bound holds, a silent peer is a bounded ``PeerTimeout``, and in a CURVE pool a
peer outside the pool (an unlisted key, or no key at all; a separate process) gets nothing."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

import msgpack
import pytest
import torch
import zmq

from chords_mq.algorithms.base import Ref
from chords_mq.errors import ChordsError
from chords_mq.wire import WireError
from chords_mq.wire.data import (
    DATA_LIMITS,
    DATA_VERSION,
    DataMessage,
    FetchMessage,
    RefusalReason,
    RefusedMessage,
    decode_data_message,
    encode_data_message,
)
from chords_mq.workers.dataplane import (
    BadData,
    DataBindError,
    DataClient,
    DataServer,
    FetchRefused,
    InsecureBind,
    LatentSpec,
    PeerTimeout,
    ServerLimits,
    advertised_endpoint,
    default_data_bind,
)
from chords_mq.workers.store import LatentStore

SHAPE = (2, 4, 8)
REQ = "req-1"
SILENCE_S = 0.5  # the wait that stands for "never answers"


def latent(seed: int, dtype: torch.dtype = torch.float32, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.fixture
def store():
    store = LatentStore()
    for task in range(3):
        store.put(REQ, Ref(task, 4), latent(task))
    return store


@pytest.fixture
def server(store):
    with DataServer(store) as server:
        yield server


@pytest.fixture
def client():
    with DataClient(timeout_s=5.0) as client:
        yield client


def raw_peer(endpoint: str, ctx: zmq.Context) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def answer(sock: zmq.Socket, timeout_s: float = 5.0):
    assert sock.poll(int(timeout_s * 1000)), "no answer"
    return decode_data_message(sock.recv_multipart(copy=False))


# -- the codec ------------------------------------------------------------------------------------


def test_data_messages_round_trip_with_tensor_frames_sharing_memory():
    fetch = FetchMessage(7, REQ, (Ref(0, 4), Ref(12, 50)))
    assert decode_data_message(encode_data_message(fetch)) == fetch
    refused = RefusedMessage(7, REQ, RefusalReason.NOT_HELD, "gone", (Ref(12, 50),))
    assert decode_data_message(encode_data_message(refused)) == refused
    tensors = ((Ref(0, 4), latent(0)), (Ref(3, 9), latent(1, torch.bfloat16, (64, 64))))
    frames = encode_data_message(DataMessage(7, REQ, tensors))
    for (_, tensor), frame in zip(tensors, frames[1:]):  # zero-copy send
        assert torch.frombuffer(frame, dtype=torch.uint8).data_ptr() == tensor.data_ptr()
    got = decode_data_message([frames[0], *(bytearray(f) for f in frames[1:])])
    assert isinstance(got, DataMessage) and [r for r, _ in got.tensors] == [Ref(0, 4), Ref(3, 9)]
    for (_, sent), (_, back) in zip(tensors, got.tensors):
        assert back.dtype == sent.dtype and torch.equal(back, sent)


def test_a_data_reply_received_over_tcp_is_not_copied():
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        router.bind("tcp://127.0.0.1:*")
        dealer.connect(router.getsockopt(zmq.LAST_ENDPOINT).decode())
        tensor = latent(2, torch.float32, (256, 1024))  # 1 MiB
        dealer.send_multipart(
            encode_data_message(DataMessage(1, REQ, ((Ref(1, 2), tensor),))), copy=False
        )
        frames = router.recv_multipart(copy=False)[1:]
        got = decode_data_message(frames)
        assert isinstance(got, DataMessage)
        received = torch.frombuffer(frames[1].buffer, dtype=torch.uint8).data_ptr()
        assert got.tensors[0][1].data_ptr() == received and torch.equal(got.tensors[0][1], tensor)
    finally:
        router.close(0)
        dealer.close(0)
        ctx.term()


def header(**fields) -> bytes:
    base = {"v": DATA_VERSION, "kind": "FETCH", "id": 1, "req": REQ, "refs": [[0, 4]]}
    return msgpack.packb({**base, **fields})


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [b"\xc1"],  # not msgpack
        [b"\x92\x01"],  # a truncated array
        [b"x" * (DATA_LIMITS.max_header_bytes + 1)],
        [msgpack.packb([1, 2])],
        [header(v=2)],
        [header(kind="EVAL")],
        [header(kind=["FETCH"])],
        [header(extra=1)],
        [header(id=-1)],
        [header(req="bad id with spaces")],
        [header(refs=[])],
        [header(refs=[[0, 4], [0, 4]])],
        [header(refs=[[0, 4, 1]])],
        [header(refs=[[True, 4]])],
        [header(refs=[[i, 1] for i in range(DATA_LIMITS.max_tensors + 1)])],
        [header(), b"an extra frame"],
        [b"\x80"] + [b""] * (DATA_LIMITS.max_tensors + 1),
        [
            msgpack.packb(
                {"v": 1, "kind": "DATA", "id": 1, "req": REQ, "tensors": [["0:4", "float32", [2]]]}
            )
        ],
        [
            msgpack.packb(
                {"v": 1, "kind": "DATA", "id": 1, "req": REQ, "tensors": [["0:4", "float32", [2]]]}
            ),
            b"123",
        ],
        [
            msgpack.packb(
                {"v": 1, "kind": "DATA", "id": 1, "req": REQ, "tensors": [["04", "float32", [1]]]}
            ),
            b"1234",
        ],
        [
            msgpack.packb(
                {"v": 1, "kind": "DATA", "id": 1, "req": REQ, "tensors": [["0:04", "float32", [1]]]}
            ),
            b"1234",
        ],
        [
            msgpack.packb(
                {"v": 1, "kind": "DATA", "id": 1, "req": REQ, "tensors": [["0:4", "int64", [1]]]}
            ),
            b"12345678",
        ],
        [
            msgpack.packb(
                {
                    "v": 1,
                    "kind": "REFUSED",
                    "id": 1,
                    "req": None,
                    "reason": "nope",
                    "detail": "",
                    "refs": [],
                }
            )
        ],
        [
            msgpack.packb(
                {
                    "v": 1,
                    "kind": "REFUSED",
                    "id": 1,
                    "req": None,
                    "reason": "busy",
                    "detail": "x" * 201,
                    "refs": [],
                }
            )
        ],
        [
            msgpack.packb(
                {"v": 1, "kind": "FETCH", "id": 1, "req": REQ, "refs": [[0, 4]]}, use_bin_type=True
            )[:-1]
            + b"\xd4\x01\x00"
        ],
    ],
)
def test_malformed_data_messages_raise_wire_error(frames):
    with pytest.raises(WireError):
        decode_data_message(frames)


def test_a_fetch_past_the_refs_bound_is_refused_before_it_is_sent():
    refs = tuple(Ref(i, 1) for i in range(DATA_LIMITS.max_tensors + 1))
    with pytest.raises(WireError):
        encode_data_message(FetchMessage(1, REQ, refs))


# -- server and client ----------------------------------------------------------------------------


def test_a_peer_fetches_held_results_bitwise_and_the_transfer_is_recorded(store, server, client):
    refs = [Ref(2, 4), Ref(0, 4)]
    got = client.fetch(server.endpoint, REQ, refs, LatentSpec.of(latent(0)))
    assert list(got) == refs
    for ref in refs:
        assert torch.equal(got[ref], store.get(REQ, ref))
    big = latent(5, torch.bfloat16, (512, 1024))  # 1 MiB: the zero-copy path end to end
    store.put(REQ, Ref(9, 10), big)
    assert torch.equal(client.fetch(server.endpoint, REQ, [Ref(9, 10)])[Ref(9, 10)], big)
    stats = client.transfer_stats()[server.endpoint]
    assert (stats.fetches, stats.bytes) == (2, 2 * 256 + (1 << 20))
    assert stats.seconds > 0 and stats.bytes_per_s > 0
    assert server.counters.served == 2 and server.counters.bytes_served == stats.bytes
    deadline = time.monotonic() + 5
    while server.inflight_bytes() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.inflight_bytes() == 0  # every reply's buffers released once sent


def test_transfer_stats_are_kept_per_peer(client):
    stores = [LatentStore(), LatentStore()]
    stores[0].put(REQ, Ref(0, 1), latent(0))
    stores[1].put(REQ, Ref(0, 1), latent(1, shape=(4, 4, 8)))
    with DataServer(stores[0]) as one, DataServer(stores[1]) as two:
        client.fetch(one.endpoint, REQ, [Ref(0, 1)])
        client.fetch(two.endpoint, REQ, [Ref(0, 1)])
        client.fetch(two.endpoint, REQ, [Ref(0, 1)])
        stats = client.transfer_stats()
    assert {peer: (s.fetches, s.bytes) for peer, s in stats.items()} == {
        one.endpoint: (1, 256),
        two.endpoint: (2, 1024),
    }


def test_a_result_of_another_shape_or_dtype_than_asked_is_bad_data(server, client):
    with pytest.raises(BadData):
        client.fetch(server.endpoint, REQ, [Ref(0, 4)], LatentSpec(torch.bfloat16, SHAPE))
    with pytest.raises(BadData):
        client.fetch(server.endpoint, REQ, [Ref(0, 4)], LatentSpec(torch.float32, (2, 4, 9)))


def test_results_not_held_and_unknown_requests_are_typed_refusals(store, server, client):
    with pytest.raises(FetchRefused) as caught:
        client.fetch(server.endpoint, REQ, [Ref(0, 4), Ref(7, 8)])
    assert caught.value.reason is RefusalReason.NOT_HELD and caught.value.refs == (Ref(7, 8),)
    with pytest.raises(FetchRefused) as caught:
        client.fetch(server.endpoint, "req-2", [Ref(0, 4)])
    assert caught.value.reason is RefusalReason.UNKNOWN_REQUEST
    store.release(REQ)  # released: the request is unknown here now
    with pytest.raises(FetchRefused) as caught:
        client.fetch(server.endpoint, REQ, [Ref(0, 4)])
    assert caught.value.reason is RefusalReason.UNKNOWN_REQUEST
    assert isinstance(caught.value, ChordsError)
    assert server.counters.refused == {"not_held": 1, "unknown_request": 2}


def test_the_byte_bounds_refuse_too_large_and_busy(store):
    with DataClient() as client:
        with DataServer(store, limits=ServerLimits(max_reply_bytes=2 * 256)) as server:
            client.fetch(server.endpoint, REQ, [Ref(0, 4), Ref(1, 4)])
            with pytest.raises(FetchRefused) as caught:
                client.fetch(server.endpoint, REQ, [Ref(0, 4), Ref(1, 4), Ref(2, 4)])
            assert caught.value.reason is RefusalReason.TOO_LARGE
        with DataServer(store, limits=ServerLimits(max_inflight_bytes=100)) as server:
            with pytest.raises(FetchRefused) as caught:
                client.fetch(server.endpoint, REQ, [Ref(0, 4)])
            assert caught.value.reason is RefusalReason.BUSY


def test_malformed_messages_are_refused_and_other_peers_still_served(server, client):
    ctx = zmq.Context()
    rogue = raw_peer(server.endpoint, ctx)
    try:
        bad = [
            [b"\xc1"],
            [b"x" * (DATA_LIMITS.max_header_bytes + 10)],
            [header(refs=[[i, 1] for i in range(DATA_LIMITS.max_tensors + 1)])],
            [header(), b"an extra frame"],
            [b"\x80"] * (DATA_LIMITS.max_tensors + 5),
            [msgpack.packb({"v": 1, "kind": "DATA", "id": 3, "req": REQ, "tensors": []})],
        ]
        for frames in bad:
            rogue.send_multipart(frames)
            refused = answer(rogue)
            assert isinstance(refused, RefusedMessage)
            assert refused.reason is RefusalReason.BAD_REQUEST and refused.detail
            assert client.fetch(server.endpoint, REQ, [Ref(1, 4)])  # the server goes on
        rogue.send_multipart([header(id=5)])  # and the same peer, well-formed now, is served
        served = answer(rogue)
        assert isinstance(served, DataMessage) and served.fetch_id == 5
    finally:
        rogue.close(0)
        ctx.term()
    assert server.counters.refused == {"bad_request": len(bad)}


def test_a_peer_that_does_not_read_its_replies_gets_a_bounded_queue(store, server, client):
    """64 fetches of 1 MiB each from a peer that never reads: the server queues at most
    ``replies_per_peer`` replies for it (plus what the kernel's buffers take), drops the rest
    unanswered, and serves everyone else meanwhile."""
    store.put(REQ, Ref(9, 10), latent(5, torch.float32, (256, 1024)))
    ctx = zmq.Context()
    greedy = raw_peer(server.endpoint, ctx)
    greedy.setsockopt(zmq.RCVHWM, 1)
    try:
        for fetch_id in range(1, 65):
            greedy.send_multipart([header(id=fetch_id, refs=[[9, 10]])])
        deadline, others = time.monotonic() + 10, 0
        while server.counters.served - others + server.counters.unsendable < 64:
            assert time.monotonic() < deadline, server.counters
            assert client.fetch(server.endpoint, REQ, [Ref(0, 4)])  # others are served
            others += 1
        greedy_served = server.counters.served - others
        assert greedy_served + server.counters.unsendable == 64
        assert server.counters.unsendable > 0
        assert server.inflight_bytes() <= greedy_served * (1 << 20)
    finally:
        greedy.close(0)
        ctx.term()


def test_a_peer_that_never_answers_is_a_bounded_peer_timeout(store, client):
    ctx = zmq.Context()
    silent = ctx.socket(zmq.ROUTER)
    silent.setsockopt(zmq.LINGER, 0)
    silent.bind("tcp://127.0.0.1:*")
    endpoint = silent.getsockopt(zmq.LAST_ENDPOINT).decode()
    try:
        with pytest.raises(PeerTimeout):
            client.fetch(endpoint, REQ, [Ref(0, 4)], timeout_s=SILENCE_S)
        assert silent.poll(1000)  # the fetch reached it; it just never answers
    finally:
        silent.close(0)
        ctx.term()
    with pytest.raises(PeerTimeout) as caught:  # nothing listening at all
        client.fetch(endpoint, REQ, [Ref(0, 4)], timeout_s=SILENCE_S)
    assert isinstance(caught.value, TimeoutError)
    with DataServer(store) as server:  # the client still works with others
        assert client.fetch(server.endpoint, REQ, [Ref(0, 4)])
    assert endpoint not in client.transfer_stats()


def test_off_loopback_without_curve_needs_insecure(store):
    with pytest.raises(InsecureBind) as caught:
        DataServer(store, "tcp://0.0.0.0:0")
    assert "\n" not in str(caught.value) and "insecure" in str(caught.value)
    with pytest.raises(InsecureBind):
        DataServer(store, "tcp://*:0")
    with DataServer(store, "tcp://0.0.0.0:0", insecure=True) as server:
        port = server.endpoint.rsplit(":", 1)[1]
        with DataClient() as client:
            assert client.fetch(f"tcp://127.0.0.1:{port}", REQ, [Ref(0, 4)])


def test_a_port_in_use_is_a_typed_bind_error(store, server):
    with pytest.raises(DataBindError):
        DataServer(store, server.endpoint).start()


def test_the_default_bind_is_the_address_that_reaches_the_broker_and_advertise_overrides():
    assert default_data_bind("tcp://127.0.0.1:5556") == "tcp://127.0.0.1:0"
    assert default_data_bind("tcp://localhost:5556") == "tcp://127.0.0.1:0"
    assert default_data_bind("ipc:///tmp/broker") == "tcp://127.0.0.1:0"
    assert advertised_endpoint("tcp://10.0.0.5:4321", None) == "tcp://10.0.0.5:4321"
    assert advertised_endpoint("tcp://10.0.0.5:4321", "gw.example:7000") == "tcp://gw.example:7000"
    for bad in ("gw.example", "gw:0", ":7000", "gw:port"):
        with pytest.raises(ChordsError):
            advertised_endpoint("tcp://10.0.0.5:4321", bad)


# -- CURVE ----------------------------------------------------------------------------------------

ROGUE = r"""
import json, sys, msgpack, zmq
endpoint, server_key, listed_pub, listed_sec = sys.argv[1:5]
ctx = zmq.Context()
fetch = msgpack.packb({"v": 1, "kind": "FETCH", "id": 1, "req": "req-1", "refs": [[0, 4]]})
peers = {}
monitors = {}
def peer(name, public=None, secret=None):
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if public is not None:
        sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
        sock.setsockopt(zmq.CURVE_SERVERKEY, server_key.encode())
    else:  # watched from before its connection: its refusal may come at once
        monitors[name] = sock.get_monitor_socket()
    sock.connect(endpoint)
    sock.send(fetch)
    peers[name] = sock
unlisted = zmq.curve_keypair()
peer("unlisted", *unlisted)
peer("unlisted_again", *unlisted)
peer("no_key")
peer("listed", listed_pub.encode(), listed_sec.encode())
# The peer without a key must have met the server's refusal before this process exits: on a
# loaded machine its handshake can trail the listed peer's answer.
from zmq.utils.monitor import recv_monitor_message
monitor = monitors["no_key"]
refused = (
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_DISCONNECTED
)
poller = zmq.Poller()
for sock in [*peers.values(), monitor]:
    poller.register(sock, zmq.POLLIN)
got = {name: 0 for name in peers}
no_key_refused = False
import time
limit = time.monotonic() + 30  # the listed answer and the keyless refusal, then a further wait
deadline = limit
while time.monotonic() < deadline:
    for sock, _ in poller.poll(50):
        if sock is monitor:
            if recv_monitor_message(monitor)["event"] & refused:
                no_key_refused = True
            continue
        name = next(n for n, s in peers.items() if s is sock)
        got[name] += len(b"".join(sock.recv_multipart()))
        if name == "listed":
            deadline = min(limit, time.monotonic() + float(sys.argv[5]))
    if deadline < limit and not no_key_refused:
        deadline = min(limit, time.monotonic() + float(sys.argv[5]))
print(json.dumps({"got": got, "unlisted": unlisted[0].decode(), "no_key_refused": no_key_refused}))
"""


@pytest.fixture
def pool_keys():
    return {name: zmq.curve_keypair() for name in ("server", "peer", "other")}


def test_in_a_curve_pool_a_process_outside_it_gets_nothing(store, pool_keys, caplog):
    """Another process connects four ways: an unlisted key twice, no key, and a listed key.
    Only the listed key gets an answer; the unlisted key's denial is logged once."""
    caplog.set_level(logging.WARNING, logger="chords.keys")
    caplog.set_level(logging.WARNING, logger="chords.dataplane")
    server_key, peer = pool_keys["server"], pool_keys["peer"]
    argv = [peer[0].decode(), peer[1].decode(), "1.0"]
    with DataServer(store, key_pair=server_key, pool_keys=[peer[0]]) as server:
        run = subprocess.run(
            [sys.executable, "-c", ROGUE, server.endpoint, server_key[0].decode(), *argv],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
        report = json.loads(run.stdout)
        # The server's thread sees the failed handshakes through its socket monitor, which may
        # trail the rogue's exit on a loaded machine: wait for them (bounded) before closing.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and server.counters.handshakes_failed < 3:
            time.sleep(0.02)
        counters = server.counters
    got = report["got"]
    assert report["no_key_refused"]  # the keyless peer met the refusal while it was there
    assert got["listed"] > 256  # the control: this process can be answered at all
    assert got["unlisted"] == got["unlisted_again"] == got["no_key"] == 0
    assert counters.served == 1 and counters.refused == {}
    assert counters.handshakes_failed >= 3  # the unlisted key twice and the peer with no key
    denials = [r for r in caplog.records if report["unlisted"] in r.getMessage()]
    assert len(denials) == 1 and "denied" in denials[0].getMessage()
    # Which side sees a keyless peer's mechanism mismatch first is a race: the server logs it
    # (once) when it does, and counts it either way.
    no_curve = [r for r in caplog.records if "without CURVE" in r.getMessage()]
    assert len(no_curve) <= 1


def test_set_pool_keys_admits_and_removes_workers(store, pool_keys):
    server_key, peer = pool_keys["server"], pool_keys["peer"]
    with DataServer(store, key_pair=server_key) as server:
        with DataClient(key_pair=peer, timeout_s=SILENCE_S) as client:
            with pytest.raises(PeerTimeout):  # not in the pool (yet): nothing
                client.fetch(server.endpoint, REQ, [Ref(0, 4)], server_key=server_key[0])
            server.set_pool_keys([peer[0], pool_keys["other"][0]])
            got = client.fetch(
                server.endpoint, REQ, [Ref(0, 4)], server_key=server_key[0], timeout_s=10
            )
            assert torch.equal(got[Ref(0, 4)], store.get(REQ, Ref(0, 4)))
            server.set_pool_keys([pool_keys["other"][0]])  # removed: its open connection too
            with pytest.raises(PeerTimeout):
                client.fetch(server.endpoint, REQ, [Ref(0, 4)], server_key=server_key[0])
            with pytest.raises(PeerTimeout):  # and a new one
                client.fetch(server.endpoint, REQ, [Ref(0, 4)], server_key=server_key[0])
        assert server.counters.served == 1 and server.counters.unlisted == 1
    with pytest.raises(ChordsError):
        server.set_pool_keys([b"short"])
