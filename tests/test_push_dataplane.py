"""A push over the worker's data plane (issue 25), over real TCP sockets on loopback with the
real ``DataServer`` and ``DataClient``: a PUT of a result for a request the receiver prepared
is KEPT and lands in its ``PushedCopies`` inbox with exactly the bytes sent; anything else is a
typed refusal (never a hang), after which the server serves FETCH as before; in a CURVE pool a
PUT from a key outside the pool is never kept, and a kept copy carries its sender's key (what
the reader checks against the result's holders). The ``Pusher`` thread delivers its jobs,
counts a push to an unreachable peer as failed within its bounded wait, and drops (counted)
what passes its queue's bound."""

from __future__ import annotations

import dataclasses
import threading

import msgpack
import pytest
import torch
import zmq

from chords_mq.algorithms.base import Ref
from chords_mq.wire import WireError, WireLimits, decode, encode
from chords_mq.wire.data import (
    DATA_LIMITS,
    DATA_VERSION,
    DataMessage,
    KeptMessage,
    PutMessage,
    RefusalReason,
    RefusedMessage,
    decode_data_message,
    encode_data_message,
)
from chords_mq.wire.messages import EvalMessage, TaskEntry
from chords_mq.wire.named import (
    MAX_PUSH_TO,
    MAX_PUSHES,
    X0_REF,
    Holder,
    NamedInput,
    NamedRef,
    Push,
)
from chords_mq.workers.dataplane import (
    BadData,
    DataClient,
    DataPlaneError,
    DataServer,
    FetchRefused,
    PeerTimeout,
    Pusher,
    PushJob,
    ServerLimits,
)
from chords_mq.workers.store import LatentStore, PushedCopies
from tests.test_dataplane import raw_peer

SHAPE = (2, 4, 8)  # 64 float32 elements: 256 bytes
BYTES = 256
REQ = "req-1"
SILENCE_S = 0.5  # the wait that stands for "never answers"
LONG_S = 5.0  # a wait that must not run out


def latent(seed: int, dtype: torch.dtype = torch.float32, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and bytes(a.view(torch.uint8).flatten()) == (bytes(b.view(torch.uint8).flatten()))
    )


@pytest.fixture
def store():
    store = LatentStore()
    store.put(REQ, Ref(0, 4), latent(100))
    return store


@pytest.fixture
def inbox():
    inbox = PushedCopies(budget_bytes=8 * BYTES, max_copies=8)
    inbox.expect(REQ, torch.float32, SHAPE)
    return inbox


@pytest.fixture
def server(store, inbox):
    with DataServer(store, inbox=inbox) as server:
        yield server


@pytest.fixture
def client():
    with DataClient(timeout_s=LONG_S) as client:
        yield client


def answer(sock: zmq.Socket, timeout_s: float = LONG_S):
    assert sock.poll(int(timeout_s * 1000)), "no answer"
    return decode_data_message(sock.recv_multipart(copy=False))


def put_header(**fields) -> bytes:
    header = {"v": DATA_VERSION, "kind": "PUT", "id": 9, "req": REQ}
    header["tensors"] = [["3:4", "float32", list(SHAPE)]]
    header.update(fields)
    return msgpack.packb(header, use_bin_type=True)


def served(client: DataClient, server: DataServer, store: LatentStore) -> bool:
    got = client.fetch(server.endpoint, REQ, [Ref(0, 4)])
    return same_bits(got[Ref(0, 4)], store.get(REQ, Ref(0, 4)))


def served_small(client: DataClient, server: DataServer, store: LatentStore) -> bool:
    """A FETCH of a 32-byte result (within the smallest frame bound used here) is answered."""
    small = latent(101, shape=(2, 4))
    store.put(REQ, Ref(0, 5), small)
    got = client.fetch(server.endpoint, REQ, [Ref(0, 5)])
    return same_bits(got[Ref(0, 5)], small)


# -- PUT / KEPT ----------------------------------------------------------------------------------


def test_put_kept_message_round_trip():
    put = PutMessage(3, REQ, ((Ref(2, 5), latent(1)),))
    got = decode_data_message(encode_data_message(put))
    assert isinstance(got, PutMessage) and got.fetch_id == 3 and got.request == REQ
    assert got.tensors[0][0] == Ref(2, 5) and same_bits(got.tensors[0][1], latent(1))
    kept = KeptMessage(3, REQ, (Ref(2, 5),))
    assert decode_data_message(encode_data_message(kept)) == kept


def test_a_put_for_a_prepared_request_is_kept_with_exactly_the_bytes_sent(server, inbox, client):
    tensor = latent(7)
    tensor[0, 0, 0] = float("nan")  # odd bits travel as they are
    tensor[0, 0, 1] = -0.0
    seconds = client.push(server.endpoint, REQ, [(Ref(3, 4), tensor)])
    assert seconds >= 0
    assert server.counters.pushes_kept == 1 and inbox.kept == 1 and inbox.held_bytes == BYTES
    got = inbox.take(REQ, Ref(3, 4))
    assert got is not None
    copy, sender = got
    assert same_bits(copy, tensor) and sender is None  # (no CURVE: no key to name)
    assert copy.data_ptr() != tensor.data_ptr()  # it crossed a socket
    assert inbox.held_bytes == 0


def test_a_put_of_several_copies_is_kept_whole(server, inbox, client):
    sent = [(Ref(task, 4), latent(task)) for task in range(3)]
    client.push(server.endpoint, REQ, sent)
    assert server.counters.pushes_kept == 3 and inbox.held_bytes == 3 * BYTES
    for ref, tensor in sent:
        got = inbox.take(REQ, ref)
        assert got is not None and same_bits(got[0], tensor)


def push_refused(
    client: DataClient, server: DataServer, request: str, tensors, *, read: bool = True
) -> FetchRefused:
    """The refusal of a PUT of ``tensors``: it names them all (``read``: the server could
    read the PUT; one it cannot read is refused under fetch id 0, naming nothing)."""
    with pytest.raises(FetchRefused) as caught:
        client.push(server.endpoint, request, tensors)
    assert isinstance(caught.value, DataPlaneError)
    assert caught.value.refs == (tuple(ref for ref, _ in tensors) if read else ())
    return caught.value


def test_puts_the_inbox_refuses_are_typed_refusals_and_fetch_is_served_after_each(
    server, inbox, store, client
):
    assert push_refused(client, server, "other", [(Ref(1, 1), latent(1))]).reason is (
        RefusalReason.UNKNOWN_REQUEST
    )
    assert served(client, server, store)
    assert push_refused(client, server, REQ, [(Ref(1, 2), latent(1, torch.float64))]).reason is (
        RefusalReason.MISMATCH
    )
    assert served(client, server, store)
    client.push(server.endpoint, REQ, [(Ref(1, 4), latent(1))])
    assert inbox.take(REQ, Ref(1, 4)) is not None  # read: a copy again is not wanted
    assert push_refused(client, server, REQ, [(Ref(1, 4), latent(1))]).reason is (
        RefusalReason.UNWANTED
    )
    assert served(client, server, store)
    assert server.counters.refused == {
        "unknown_request": 1,
        "mismatch": 1,
        "unwanted": 1,
    }
    assert server.counters.served == 3 and server.counters.pushes_kept == 1
    assert inbox.held_bytes == 0


def test_a_put_past_the_inbox_budget_is_refused_as_no_room(store, client):
    inbox = PushedCopies(budget_bytes=BYTES - 1)
    inbox.expect(REQ, torch.float32, SHAPE)
    with DataServer(store, inbox=inbox) as server:
        refusal = push_refused(client, server, REQ, [(Ref(1, 3), latent(1))])
        assert refusal.reason is RefusalReason.NO_ROOM
        assert served(client, server, store)
        assert server.counters.refused == {"no_room": 1}
    assert inbox.held_bytes == 0 and inbox.kept == 0


def test_a_refused_put_of_several_copies_keeps_none_of_them(server, inbox, client):
    """REFUSED names every ref of the PUT, and its sender takes them all as not kept: none
    may stay behind in the inbox holding its budget."""
    tensors = [(Ref(1, 1), latent(1)), (Ref(2, 1), latent(2, torch.bfloat16))]
    assert push_refused(client, server, REQ, tensors).reason is RefusalReason.MISMATCH
    assert inbox.held_bytes == 0 and not inbox.holds(REQ, Ref(1, 1))
    assert server.counters.pushes_kept == 0
    client.push(server.endpoint, REQ, [tensors[0]])  # the good copy alone is still welcome
    assert inbox.holds(REQ, Ref(1, 1))


def test_a_server_without_an_inbox_refuses_a_put(store, client):
    with DataServer(store) as server:
        refusal = push_refused(client, server, REQ, [(Ref(1, 1), latent(1))])
        assert refusal.reason is RefusalReason.BAD_REQUEST
        assert served(client, server, store)


def test_a_reader_waiting_for_a_copy_gets_the_one_pushed_over_tcp(server, inbox, client):
    got: list[object] = []
    reader = threading.Thread(target=lambda: got.append(inbox.take(REQ, Ref(6, 6), LONG_S)))
    reader.start()
    tensor = latent(6)
    client.push(server.endpoint, REQ, [(Ref(6, 6), tensor)])
    reader.join(LONG_S)
    assert not reader.is_alive()
    assert isinstance(got[0], tuple) and same_bits(got[0][0], tensor)


def test_an_answer_to_a_put_that_is_not_its_kept_is_bad_data():
    """A peer that answers a PUT with KEPT for another request or other refs, or with DATA,
    has not kept what was sent: ``BadData``, never taken for a push delivered."""
    ctx = zmq.Context()
    fake = ctx.socket(zmq.ROUTER)
    fake.setsockopt(zmq.LINGER, 0)
    endpoint = f"tcp://127.0.0.1:{fake.bind_to_random_port('tcp://127.0.0.1')}"
    answers = [
        lambda fid: KeptMessage(fid, "another-req", (Ref(1, 1),)),
        lambda fid: KeptMessage(fid, REQ, (Ref(1, 2),)),
        lambda fid: DataMessage(fid, REQ, ((Ref(1, 1), latent(1)),)),
    ]
    done = threading.Event()

    def serve() -> None:
        for make in answers:
            if not fake.poll(int(LONG_S * 1000)):
                return
            identity, *frames = fake.recv_multipart()
            put = decode_data_message(frames)
            fake.send_multipart([identity, *encode_data_message(make(put.fetch_id))])
        done.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with DataClient(timeout_s=LONG_S) as client:
            for _ in answers:
                with pytest.raises(BadData):
                    client.push(endpoint, REQ, [(Ref(1, 1), latent(1))])
        thread.join(LONG_S)
        assert done.is_set()
    finally:
        fake.close(0)
        ctx.term()


# -- malformed and oversized PUTs ----------------------------------------------------------------


def test_malformed_puts_are_typed_refusals_and_the_server_goes_on(server, inbox, store, client):
    ctx = zmq.Context()
    rogue = raw_peer(server.endpoint, ctx)
    payload = latent(3).view(torch.uint8).numpy().tobytes()
    try:
        bad = [
            [put_header(tensors=[])],  # a PUT of nothing
            [put_header(), payload[:-4]],  # a frame shorter than its spec
            [put_header(), payload + b"xxxx"],  # and longer
            [put_header()],  # a spec without its frame
            [put_header(tensors=[["3:4", "float32", list(SHAPE)]] * 2), payload, payload],
            [put_header(tensors=[["3:x", "float32", list(SHAPE)]]), payload],  # a bad name
            [put_header(tensors=[["3:4", "complex64", list(SHAPE)]]), payload],
            [put_header(extra=1), payload],
        ]
        for frames in bad:
            rogue.send_multipart(frames)
            refused = answer(rogue)
            assert isinstance(refused, RefusedMessage), frames[0]
            assert refused.reason is RefusalReason.BAD_REQUEST and refused.detail
            assert served(client, server, store)
        rogue.send_multipart([put_header(), payload])  # well-formed now: kept
        kept = answer(rogue)
        assert isinstance(kept, KeptMessage) and kept.refs == (Ref(3, 4),)
    finally:
        rogue.close(0)
        ctx.term()
    assert server.counters.refused == {"bad_request": len(bad)}
    assert inbox.kept == 1 and server.counters.pushes_kept == 1


def test_a_put_past_the_wire_bounds_is_refused_or_cut_off_and_the_server_goes_on(store, inbox):
    """Past the server's frame bound (``max_frame_bytes``) a PUT is refused as bad_request,
    and far past it libzmq cuts the peer off (``MAXMSGSIZE``): the sender's wait ends as a
    bounded ``PeerTimeout``, nothing is kept, and the server serves everyone else."""
    wire = WireLimits(max_header_bytes=DATA_LIMITS.max_header_bytes, max_tensors=32)
    small = WireLimits(max_header_bytes=wire.max_header_bytes, max_tensors=32, max_frame_bytes=128)
    with (
        DataServer(store, inbox=inbox, limits=ServerLimits(wire=small)) as server,
        DataClient(timeout_s=LONG_S, limits=wire) as client,
    ):
        refusal = push_refused(client, server, REQ, [(Ref(1, 1), latent(1))], read=False)
        assert refusal.reason is RefusalReason.BAD_REQUEST
        assert served_small(client, server, store)
        huge = latent(1, shape=(64, 64, 8))  # 128 KiB: past MAXMSGSIZE (128 + 1024)
        with pytest.raises(PeerTimeout):
            client.push(server.endpoint, REQ, [(Ref(2, 1), huge)], timeout_s=SILENCE_S)
        assert served_small(client, server, store)
        # a held result past the frame bound is a typed refusal too, not a silent wait
        with pytest.raises(FetchRefused) as caught:
            client.fetch(server.endpoint, REQ, [Ref(0, 4)])
        assert caught.value.reason is RefusalReason.TOO_LARGE
    assert inbox.kept == 0 and inbox.held_bytes == 0
    with DataClient() as client:  # and a sender never encodes past its own bounds
        too_many = [(Ref(task, 1), latent(task)) for task in range(DATA_LIMITS.max_tensors + 1)]
        with pytest.raises(WireError):
            client.push("tcp://127.0.0.1:9", REQ, too_many)


def test_an_evals_pushes_past_the_wire_bounds_are_refused_when_decoded():
    """``EvalMessage.push`` / ``pushed`` within ``MAX_PUSHES`` (and ``MAX_PUSH_TO`` readers
    per result) round-trip; one more, a result pushed twice or to nobody, a ref named pushed
    twice, or a push of a result the EVAL does not make is a ``WireError``."""
    x0 = NamedInput("x0", (NamedRef(X0_REF, (Holder("tcp://127.0.0.1:9"),)),))
    eval_ = EvalMessage(
        entries=tuple(TaskEntry(7 + i, 0, 3, 2, (4, 5)) for i in range(MAX_PUSHES // 2 + 1)),
        inputs=(x0,) * (MAX_PUSHES // 2 + 1),
        dtype="float32",
        epoch=5,
        request=REQ,
        task=7,
        attempt=0,
    )
    key = zmq.curve_keypair()[0].decode()
    to = tuple(Holder(f"tcp://127.0.0.{i + 2}:5", key) for i in range(MAX_PUSH_TO + 1))

    def push(count: int, readers: int = 1) -> tuple[Push, ...]:
        return tuple(Push(7 + i // 2, 4 + i % 2, to[:readers]) for i in range(count))

    def decoded(**fields) -> EvalMessage:
        message = decode(encode(dataclasses.replace(eval_, **fields)))
        assert isinstance(message, EvalMessage)
        return message

    widest = decoded(
        push=push(MAX_PUSHES, MAX_PUSH_TO), pushed=tuple(Ref(1, i) for i in range(MAX_PUSHES))
    )
    assert widest.push == push(MAX_PUSHES, MAX_PUSH_TO) and len(widest.pushed or ()) == MAX_PUSHES
    for fields in [
        {"push": push(MAX_PUSHES + 1)},
        {"push": push(1, MAX_PUSH_TO + 1)},
        {"push": push(1, 0)},
        {"push": push(1) * 2},
        {"push": (Push(99, 4, to[:1]),)},  # task 99 is not the EVAL's
        {"push": (Push(7, 6, to[:1]),)},  # nor target 6 of task 7
        {"pushed": tuple(Ref(1, i) for i in range(MAX_PUSHES + 1))},
        {"pushed": (Ref(1, 1), Ref(1, 1))},
    ]:
        with pytest.raises(WireError):
            decoded(**fields)


# -- CURVE: only the pool's workers push ---------------------------------------------------------


@pytest.fixture
def pool_keys():
    return {name: zmq.curve_keypair() for name in ("server", "peer", "other")}


def test_in_a_curve_pool_a_put_is_kept_only_from_a_pool_key_and_names_its_sender(
    store, inbox, pool_keys
):
    server_key, peer, other = pool_keys["server"], pool_keys["peer"], pool_keys["other"]
    with DataServer(store, key_pair=server_key, pool_keys=[peer[0]], inbox=inbox) as server:
        with (
            DataClient(key_pair=other, timeout_s=SILENCE_S) as outsider,
            pytest.raises(PeerTimeout),  # not in the pool: its handshake fails
        ):
            outsider.push(server.endpoint, REQ, [(Ref(1, 1), latent(1))], server_key=server_key[0])
        assert inbox.kept == 0
        with DataClient(key_pair=peer, timeout_s=LONG_S) as member:
            tensor = latent(2)
            member.push(server.endpoint, REQ, [(Ref(2, 1), tensor)], server_key=server_key[0])
            got = inbox.take(REQ, Ref(2, 1))
            assert got is not None and same_bits(got[0], tensor)
            assert got[1] == peer[0].decode()  # the sender's key: the reader checks it
            server.set_pool_keys([other[0]])  # the member leaves the pool: on its open link too
            with pytest.raises(PeerTimeout):
                member.push(
                    server.endpoint,
                    REQ,
                    [(Ref(3, 1), latent(3))],
                    server_key=server_key[0],
                    timeout_s=SILENCE_S,
                )
        assert server.counters.unlisted == 1 and server.counters.pushes_kept == 1
        assert inbox.kept == 1 and not inbox.holds(REQ, Ref(3, 1))


# -- the Pusher thread ---------------------------------------------------------------------------


def closed_endpoint() -> str:
    """A loopback endpoint nobody listens on (bound, then closed)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    sock.close(0)
    ctx.term()
    return f"tcp://127.0.0.1:{port}"


@pytest.fixture
def pusher():
    pusher = Pusher(timeout_s=SILENCE_S, floor_bytes_s=1e9, max_queued=2)
    yield pusher
    pusher.close()


def test_the_pusher_delivers_each_job_to_its_readers_inbox(server, inbox, pusher):
    tensors = {Ref(task, 2): latent(task) for task in range(2)}
    for ref, tensor in tensors.items():
        assert pusher.submit(PushJob(server.endpoint, None, REQ, ref, tensor))
    assert pusher.idle(LONG_S)
    assert pusher.counters.pushed == 2 and pusher.counters.failed == 0
    assert pusher.counters.bytes == 2 * BYTES
    for ref, tensor in tensors.items():
        got = inbox.take(REQ, ref)
        assert got is not None and same_bits(got[0], tensor)


def test_the_pusher_counts_a_refused_push_and_one_to_an_unreachable_peer_as_failed(
    server, inbox, pusher
):
    assert pusher.submit(PushJob(server.endpoint, None, "other", Ref(1, 1), latent(1)))
    assert pusher.submit(PushJob(closed_endpoint(), None, REQ, Ref(1, 1), latent(1)))
    assert pusher.idle(LONG_S)  # the unreachable peer's wait is bounded (SILENCE_S)
    assert pusher.counters.failed == 2 and pusher.counters.pushed == 0
    assert pusher.submit(PushJob(server.endpoint, None, REQ, Ref(2, 2), latent(2)))  # goes on
    assert pusher.idle(LONG_S) and pusher.counters.pushed == 1 and inbox.holds(REQ, Ref(2, 2))


def test_the_pusher_drops_a_job_past_its_queue_bound_and_counts_it_failed(server, inbox):
    """While one push waits on a peer that never answers, ``max_queued`` more wait in the
    queue and the next is dropped at once (the reader pulls it); the queued ones still go."""
    ctx = zmq.Context()
    silent = ctx.socket(zmq.ROUTER)  # accepts the connection, never answers
    silent.setsockopt(zmq.LINGER, 0)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    pusher = Pusher(timeout_s=1.0, floor_bytes_s=1e9, max_queued=2)
    try:
        assert pusher.submit(PushJob(f"tcp://127.0.0.1:{port}", None, REQ, Ref(9, 9), latent(9)))
        assert silent.poll(int(LONG_S * 1000))  # the push is on its way: the thread is busy
        jobs = [PushJob(server.endpoint, None, REQ, Ref(task, 3), latent(task)) for task in (1, 2)]
        assert all(pusher.submit(job) for job in jobs)
        assert not pusher.submit(PushJob(server.endpoint, None, REQ, Ref(3, 3), latent(3)))
        assert pusher.counters.failed == 1
        assert pusher.idle(LONG_S)
        assert pusher.counters.pushed == 2 and pusher.counters.failed == 2  # (+ the silent peer)
        assert inbox.holds(REQ, Ref(1, 3)) and inbox.holds(REQ, Ref(2, 3))
        assert not inbox.holds(REQ, Ref(3, 3))
    finally:
        pusher.close()
        silent.close(0)
        ctx.term()
    assert not pusher.submit(PushJob(server.endpoint, None, REQ, Ref(4, 3), latent(4)))  # closed


def test_by_default_the_pusher_queues_an_evals_widest_pushes_behind_a_busy_push():
    """One EVAL may push ``MAX_PUSHES`` results to ``MAX_PUSH_TO`` readers each: all of them
    queue while the push thread waits on a slow peer, none dropped (a dropped push costs its
    reader its whole bounded wait before it pulls)."""
    ctx = zmq.Context()
    silent = ctx.socket(zmq.ROUTER)
    silent.setsockopt(zmq.LINGER, 0)
    endpoint = f"tcp://127.0.0.1:{silent.bind_to_random_port('tcp://127.0.0.1')}"
    pusher = Pusher(timeout_s=SILENCE_S)
    try:
        assert pusher.submit(PushJob(endpoint, None, REQ, Ref(0, 1), latent(0)))
        assert silent.poll(int(LONG_S * 1000))  # the thread is busy: what follows queues
        tensor = latent(1)
        jobs = [
            PushJob(f"tcp://127.0.0.{2 + reader}:9", None, REQ, Ref(1 + index, 2), tensor)
            for index in range(MAX_PUSHES)
            for reader in range(MAX_PUSH_TO)
        ]
        assert all(pusher.submit(job) for job in jobs)
        assert pusher.counters.failed == 0
    finally:
        pusher.close()
        silent.close(0)
        ctx.term()


def test_after_a_peer_times_out_the_pushes_queued_for_it_are_dropped_not_waited_for(server, inbox):
    """A reader's worker that never answers costs one bounded wait, not one per push queued
    for it: the others to it are dropped (counted failed, their readers pull), the pushes to
    the other readers go on, and a push submitted later tries the silent peer again."""
    ctx = zmq.Context()
    silent = ctx.socket(zmq.ROUTER)  # accepts the connection, never answers
    silent.setsockopt(zmq.LINGER, 0)
    endpoint = f"tcp://127.0.0.1:{silent.bind_to_random_port('tcp://127.0.0.1')}"
    pusher = Pusher(timeout_s=SILENCE_S, floor_bytes_s=1e9, max_queued=8)
    try:
        assert pusher.submit(PushJob(endpoint, None, REQ, Ref(9, 1), latent(9)))
        assert silent.poll(int(LONG_S * 1000))  # the first push is on its way: the rest queue
        for task in (2, 3, 4):
            assert pusher.submit(PushJob(endpoint, None, REQ, Ref(9, task), latent(task)))
        assert pusher.submit(PushJob(server.endpoint, None, REQ, Ref(5, 5), latent(5)))
        assert pusher.idle(LONG_S)
        assert pusher.counters.failed == 4 and pusher.counters.pushed == 1
        assert inbox.holds(REQ, Ref(5, 5))
        received = 0
        while silent.poll(0):
            silent.recv_multipart()
            received += 1
        assert received == 1  # the dropped pushes never went out
        assert pusher.submit(PushJob(endpoint, None, REQ, Ref(9, 6), latent(6)))
        assert silent.poll(int(LONG_S * 1000))  # tried again
        assert pusher.idle(LONG_S) and pusher.counters.failed == 5
    finally:
        pusher.close()
        silent.close(0)
        ctx.term()
