"""BrokerCore and the workers' data endpoints, with a fake clock and no sockets: a HELLO's data
endpoint is kept and an admin's STATUS shows it; in a CURVE pool every WELCOME carries the
pool's worker keys, and a reloaded allow-list reaches every registered worker in one POOL."""

from __future__ import annotations

import pytest

from chords_mq.broker.core import TooManyPoolKeys
from chords_mq.wire import MAX_POOL_KEYS
from tests.test_broker_core import EPOCH, Broker, as_sent, hello_body, raw

DATA = "tcp://10.0.0.5:40123"
KEYS = [bytes([ord("a") + i]) * 40 for i in range(3)]  # z85 public keys are 40 characters


def register(broker: Broker, name: str, session: str = "", **fields: object) -> bytes:
    identity = f"worker/{name}".encode()
    body = hello_body(name, **({"session": session} if session else {}), **fields)
    broker.from_worker(identity, raw("HELLO", body))
    return identity


def admin_status(broker: Broker) -> dict:
    broker._keep(broker.core.client_message(b"ops", as_sent(raw("STATUS")), "key:ops", "admin"))
    return broker.last(b"ops", "STATUS").body()


def test_a_hello_with_a_data_endpoint_is_kept_and_an_admins_status_shows_it():
    broker = Broker()
    identity = register(broker, "a", data=DATA)
    register(broker, "b")  # a worker that announces none
    assert broker.last(identity, "WELCOME").epoch == EPOCH
    views = broker.core.workers_view()
    assert views[identity].data == DATA and views[b"worker/b"].data is None
    shown = {w["name"]: w for w in admin_status(broker)["workers"]}
    assert shown["a"]["data"] == DATA and shown["b"]["data"] is None
    broker.from_client(raw("STATUS"), b"c1")  # a client sees neither names nor endpoints
    assert all("data" not in w for w in broker.last(b"c1", "STATUS").body()["workers"])


@pytest.mark.parametrize(
    "data",
    [
        pytest.param("ipc:///tmp/data", id="not-tcp"),
        pytest.param("10.0.0.5:40123", id="no-scheme"),
        pytest.param("tcp://" + "h" * 250 + ":1", id="longer-than-255"),
    ],
)
def test_a_hello_whose_data_endpoint_is_not_tcp_host_port_is_refused(data):
    broker = Broker()
    identity = register(broker, "a", data=data)
    (refusal,) = broker.to(identity, "DISCONNECT")
    assert "data" in refusal.reason
    assert not broker.to(identity, "WELCOME") and not broker.core.workers_view()


def test_without_curve_welcome_carries_no_keys():
    broker = Broker()
    identity = register(broker, "a", data=DATA)
    assert broker.core.pool_keys is None
    assert "pool_keys" not in broker.last(identity, "WELCOME").body()


def test_in_a_curve_pool_every_welcome_carries_the_pools_worker_keys():
    broker = Broker()
    assert broker._keep(broker.core.set_pool_keys(reversed(KEYS))) == []  # nobody to tell yet
    expected = tuple(key.decode() for key in KEYS)  # sorted, as text
    identity = register(broker, "a", session="s-1", data=DATA)
    assert broker.last(identity, "WELCOME").pool_keys == expected
    register(broker, "a", session="s-1", data=DATA)  # the same socket's HELLO again
    assert [w.pool_keys for w in broker.to(identity, "WELCOME")] == [expected, expected]


def test_a_reloaded_allow_list_reaches_every_registered_worker_once():
    broker = Broker()
    broker.core.set_pool_keys(KEYS[:2])
    workers = [register(broker, name, data=DATA) for name in ("a", "b")]
    sent = len(broker.sent)
    assert broker._keep(broker.core.set_pool_keys(KEYS[:2])) == []  # unchanged: no POOL
    broker._keep(broker.core.set_pool_keys(KEYS[1:]))
    new = tuple(key.decode() for key in KEYS[1:])
    for identity in workers:
        (pool,) = broker.to(identity, "POOL", since=sent)
        assert pool.pool_keys == new and pool.epoch == EPOCH
    late = register(broker, "c")
    assert broker.last(late, "WELCOME").pool_keys == new and not broker.to(late, "POOL")


def test_more_worker_keys_than_a_welcome_carries_are_refused_and_the_old_set_stays():
    broker = Broker()
    broker.core.set_pool_keys(KEYS)
    too_many = [f"{i:040d}".encode() for i in range(MAX_POOL_KEYS + 1)]
    with pytest.raises(TooManyPoolKeys):
        broker.core.set_pool_keys(too_many)
    identity = register(broker, "a")
    assert broker.last(identity, "WELCOME").pool_keys == tuple(key.decode() for key in KEYS)
    assert len(broker._keep(broker.core.set_pool_keys(too_many[:MAX_POOL_KEYS]))) == 1
