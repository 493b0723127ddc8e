"""The engine across "hosts": a broker, two worker hosts, a client and a rogue, each in its own
network namespace on one bridge, with CURVE on (the layout is in conftest.py). Every output is
compared, bit for bit, with the in-process simulation of the same request."""

from __future__ import annotations

import json
import time
from pathlib import Path

from chords_mq.request import RequestSpec
from tests.multihost.conftest import (
    LATENCY_MS,
    WORKER_HOSTS,
    WORKERS_PER_HOST,
    MultiHost,
    check_bitwise,
    read_hits,
)

ALL = len(WORKER_HOSTS) * WORKERS_PER_HOST
# They run at once, each at the K it asks for (exact_cores: the cores policy would share).
SHORT = [
    RequestSpec(model="synthetic", steps=30, cores=4, seed=seed, exact_cores=True)
    for seed in (1, 2, 3)
]
SHORT.append(
    RequestSpec(
        model="synthetic", steps=30, cores=4, seed=4, params={"dtype": "bfloat16"}, exact_cores=True
    )
)
FULL = {**{host: WORKERS_PER_HOST for host in WORKER_HOSTS}, "other": 0}
# About 7 s on 4 workers at LATENCY_MS: long enough to break things while it runs.
LONG_STEPS = 300


def run_specs(pool: MultiHost, specs: list[RequestSpec], out: Path, timeout: float = 60) -> int:
    """Start ``specs`` on the client host; returns the command id to wait on."""
    return pool.agents["client"].send(
        "run",
        specs=[spec.to_dict() for spec in specs],
        out=str(out),
        keys=pool.keys_of("client", "alice"),
        timeout=timeout,
    )


def finish(pool: MultiHost, ident: int, specs: list[RequestSpec], timeout: float = 90) -> dict:
    result = pool.agents["client"].result(ident, timeout)
    data = read_hits(result["out"])
    assert len(data["requests"]) == len(specs)
    for request, spec in zip(data["requests"], specs):
        check_bitwise(request["hits"], spec)
    return data


def broker_log_count(pool: MultiHost, text: str) -> int:
    return (pool.logs / "broker.log").read_text().count(text)


def full_pool(pool: MultiHost) -> dict:
    status = pool.wait_workers(ALL, timeout=30)["status"]
    assert pool.workers_by_host(status) == FULL
    return status


def test_requests_across_namespaces_equal_the_in_process_run(multihost, tmp_path):
    status = full_pool(multihost)
    for worker in status["workers"]:  # the default --data-bind: where it reaches the broker from
        (host,) = [h for h in WORKER_HOSTS if worker["principal"] == multihost.principal(h, h)]
        assert worker["data"].startswith(f"tcp://{multihost.addr(host)}:"), worker
    started = time.monotonic()
    data = finish(multihost, run_specs(multihost, SHORT, tmp_path / "hits.json"), SHORT)
    print(f"\n[multihost] {len(SHORT)} requests over CURVE in {time.monotonic() - started:.2f}s")
    assert {h["dtype"] for h in data["requests"][-1]["hits"]} == {"bfloat16"}


def test_a_rogue_host_with_an_unlisted_key_gets_nothing(multihost):
    rogue = multihost.agents["rogue"]
    # The network lets it through: the denial is CURVE's, not a missing route.
    probe = rogue.call("probe", 10, host=multihost.addr("broker"), port=5555)
    assert probe["connected"], probe
    for keys in (multihost.keys_of("rogue", "rogue"), {}):  # an unlisted key, and no key
        started = time.monotonic()
        reply = rogue.reply(
            rogue.send(
                "run",
                specs=[SHORT[0].to_dict()],
                out="/dev/null",
                keys=keys,
                timeout=20,
                accept_timeout_s=2.0,
            ),
            timeout=30,
        )
        assert not reply["ok"] and reply["error"] == "BrokerSilent", reply  # a RequestTimeout
        assert time.monotonic() - started < 15  # a clear timeout, not a hang
        status = rogue.reply(rogue.send("status", keys=keys, timeout=1.0), timeout=10)
        assert not status["ok"] and status["error"] == "BrokerSilent", status

    # A worker with the same unlisted key: it runs, retries, and never registers.
    worker = multihost.spawn("rogue", "rogue-worker", multihost.worker_command("rogue", "rogue"))
    try:
        time.sleep(3.0)  # a listed worker registers within about 0.3 s of its start
        assert worker.poll() is None, "the rogue worker should keep trying, not exit"
        status = multihost.agents["client"].call("status", 10, keys=multihost.admin)
        assert multihost.workers_by_host(status) == FULL
        rogue_key = multihost.principal("rogue", "rogue")
        assert rogue_key not in {w["principal"] for w in status["workers"]}
    finally:
        worker.terminate()
        worker.wait(10)
    log = (multihost.logs / "broker.log").read_text()
    assert "denied an unlisted CURVE key " + rogue_key.removeprefix("key:") in log


def test_a_worker_host_partitioned_for_3s_heals_and_the_request_is_unchanged(multihost, tmp_path):
    full_pool(multihost)
    before = broker_log_count(multihost, "lost: registered again")
    spec = RequestSpec(model="synthetic", steps=LONG_STEPS, cores=4, seed=21)
    ident = run_specs(multihost, [spec], tmp_path / "hits.json")
    multihost.wait_workers(ALL, timeout=20, sessions=1)  # the request is running
    time.sleep(0.5)
    multihost.link("w1", up=False)
    down_at = time.monotonic()
    try:
        # The broker notices the silence (liveness: 3 x 250 ms) and drops w1's workers.
        dropped = multihost.wait_workers(ALL - WORKERS_PER_HOST, timeout=2.8)
        detect_s = dropped["seen_at"] - down_at
        time.sleep(max(0.0, down_at + 3.0 - time.monotonic()))
    finally:
        multihost.link("w1", up=True)
    up_at = time.monotonic()
    healed = multihost.wait_workers(ALL, timeout=20)
    heal_s = healed["seen_at"] - up_at
    assert multihost.workers_by_host(healed["status"]) == FULL
    data = finish(multihost, ident, [spec])
    request = data["requests"][0]
    report = {
        "partition_s": up_at - down_at,
        "detect_s": detect_s,  # link down -> the broker lists only w2's workers
        "heal_s": heal_s,  # link up -> w1's workers registered again
        "request_s": data["elapsed_s"],
        "retries": (request["stats"] or {}).get("retries"),
        # HELLOs a worker queued while cut off arrive together after the heal; the broker
        # counts each one after the first as the worker lost and registered again.
        "registered_again": broker_log_count(multihost, "lost: registered again") - before,
        "worker_latency_ms": LATENCY_MS,
        "steps": LONG_STEPS,
    }
    (tmp_path / "partition_heal.json").write_text(json.dumps(report, indent=2))
    print(
        f"\n[multihost] partition {report['partition_s']:.2f}s: broker dropped w1 after "
        f"{detect_s:.2f}s; partition-heal (link up -> w1 registered) {heal_s:.2f}s; "
        f"request {data['elapsed_s']:.2f}s, retries {report['retries']}, "
        f"'registered again' {report['registered_again']} "
        f"({tmp_path / 'partition_heal.json'})"
    )
    assert heal_s < 10
    assert report["retries"], "w1's in-flight tasks must have been re-run elsewhere"


def test_killing_a_whole_worker_host_mid_request_leaves_the_output_unchanged(multihost, tmp_path):
    full_pool(multihost)
    spec = RequestSpec(model="synthetic", steps=LONG_STEPS // 2, cores=4, seed=33)
    ident = run_specs(multihost, [spec], tmp_path / "hits.json")
    multihost.wait_workers(ALL, timeout=20, sessions=1)
    time.sleep(0.5)
    killed = multihost.kill_host("w2")
    assert len(killed) == WORKERS_PER_HOST
    try:
        data = finish(multihost, ident, [spec])
        status = multihost.wait_workers(WORKERS_PER_HOST, timeout=10)["status"]
        assert multihost.workers_by_host(status) == {"w1": WORKERS_PER_HOST, "w2": 0, "other": 0}
        stats = data["requests"][0]["stats"] or {}
        assert stats.get("retries"), "the killed workers' tasks must have been re-run"
        print(f"\n[multihost] w2 killed mid-request: done in {data['elapsed_s']:.2f}s, {stats}")
    finally:
        multihost.start_workers("w2")  # the next test, if any, gets a full pool again
    full_pool(multihost)
