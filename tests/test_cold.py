"""A worker's first forward of a latent size is cold: slower than the worker is (its buffers
allocated and faulted in, on a GPU its kernels autotuned). Its RESULT says so
(``ResultMessage.cold``) and the broker learns no speed from it, once per worker and size
(``WorkerInfo.observe``). Judged by a cold first EVAL alone, a worker of the pool's one speed
class looked slower, the cores stayed unbound and 16 MiB latents crossed between the hosts 8 to
23 times a request (docs/benchmarks.md). A real ``Worker`` in process (no sockets), the
registry, and the broker core on a fake clock (``broker.simulate``)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from chords_mq.broker.registry import WorkerInfo
from chords_mq.broker.simulate import SimReport, simulate
from chords_mq.request import RequestSpec
from chords_mq.wire import (
    EvalMessage,
    FailedMessage,
    PrepareMessage,
    ResultMessage,
    TaskEntry,
    decode,
    encode,
)
from chords_mq.wire.named import X0_REF, Holder, NamedInput, NamedRef
from chords_mq.workers.models.synthetic import SyntheticAdapter
from chords_mq.workers.worker import WARM_KINDS, Worker
from tests.test_binding import _sixteen_mib

KEY = (1 << 24, 1)


@pytest.fixture
def worker() -> Iterator[Worker]:
    worker = Worker("tcp://127.0.0.1:9", SyntheticAdapter(), "synthetic", "cpu")
    try:
        yield worker
    finally:
        worker.close()


def _prepare(worker: Worker, request: str, shape: list[int]) -> None:
    spec = RequestSpec("synthetic", steps=4, params={"shape": shape})
    reply = worker._job(PrepareMessage(spec=spec.to_dict(), request=request, epoch=3))
    assert not isinstance(reply, FailedMessage), reply


def _eval(worker: Worker, request: str, task: int, step: int) -> ResultMessage:
    x0 = NamedInput("ref", (NamedRef(X0_REF, (Holder("tcp://127.0.0.2:7000"),)),))
    message = EvalMessage(
        entries=(TaskEntry(task, 0, step, 0, (step + 1,)),),
        inputs=(x0,),
        dtype="float32",
        request=request,
        task=task,
        attempt=0,
        epoch=3,
    )
    reply = worker._job(decode(encode(message)))
    assert isinstance(reply, ResultMessage), reply
    decoded = decode(encode(reply))  # as it travels
    assert isinstance(decoded, ResultMessage)
    return decoded


def test_a_workers_first_forward_of_a_size_is_cold_and_no_other(worker):
    """The first EVAL of a shape says cold, the next ones of that shape (this request or
    another) do not; the first of another shape does."""
    _prepare(worker, "r", [8, 8])
    _prepare(worker, "s", [8, 8])
    _prepare(worker, "t", [4, 4])
    assert _eval(worker, "r", 0, 0).cold is True
    assert _eval(worker, "r", 1, 1).cold is None
    assert _eval(worker, "s", 0, 0).cold is None  # another request, the same size: warm
    assert _eval(worker, "t", 0, 0).cold is True  # another size: cold once
    assert _eval(worker, "t", 1, 1).cold is None
    for request in ("r", "s", "t"):
        worker.store.release(request)


def test_a_worker_remembers_a_bounded_number_of_warm_sizes(worker):
    """Past WARM_KINDS sizes a new one is not called cold (the set stops growing)."""
    worker.warm.update(((i,), None, 1) for i in range(WARM_KINDS))  # type: ignore[misc]
    _prepare(worker, "r", [8, 8])
    assert _eval(worker, "r", 0, 0).cold is None
    assert len(worker.warm) == WARM_KINDS
    worker.store.release("r")


def test_a_cold_eval_teaches_nothing_once_per_size():
    """The first cold EVAL of a size leaves the speed model as it was (a new worker stays at
    the median of the others, ``WorkerRegistry.expected``); a second cold claim for that size
    is learnt like any EVAL, so a worker cannot hide its speed by saying cold every time;
    another size gets its own cold EVAL."""
    info = WorkerInfo(b"w", "w", "m", "cpu", "float32", 1, 0.0)
    info.observe(KEY, 0.3, cold=True)
    assert KEY not in info.speed and KEY not in info.best
    info.observe(KEY, 0.1)
    assert info.speed[KEY] == 0.1 and info.best[KEY] == 0.1
    info.observe(KEY, 0.5, cold=True)  # claimed again: learnt
    assert info.speed[KEY] == pytest.approx(0.1 + 0.3 * 0.4)
    other = (1 << 20, 1)
    info.observe(other, 0.9, cold=True)
    assert other not in info.speed


def _two_hosts(cold: list[float], say_cold: bool) -> SimReport:
    """The cross-host benchmark's pool (tests/test_binding.py's ``_sixteen_mib``, results
    pushed, the broker's default) as it meets a request fresh: no warm-up request, so the speed
    model knows nobody, and some workers' first EVAL is slow (the benchmark's were 151 to 311 ms
    against 101 to 111 ms)."""
    return _sixteen_mib(0.0, 0, push=True, warmup=False, cold=cold, say_cold=say_cold)


@pytest.mark.parametrize(
    "cold",
    [
        [0.0, 0.15, 0.0, 0.0, 0.0, 0.0, 0.2, 0.0],  # two workers, as in the failing runs
        [0.05, 0.2, 0.1, 0.02, 0.3, 0.1, 0.15, 0.1],  # every worker, by different amounts
    ],
)
def test_cold_first_evals_said_so_keep_the_cores_bound(cold):
    """Said cold, the first EVALs leave the pool one class: each core's chain stays on its
    worker (9 or 10 EVALs each) and 3 latents cross, as with no cold EVAL at all; the request
    is later by no more than the cold EVALs' sum. Not said (a worker before the field), the
    same pool judged the cold workers slower and left the cores unbound: chains moved and
    crossed the link 7 and 15 times, 2.54 and 3.68 s against 2.20 and 2.87."""
    warm = _two_hosts([0.0] * 8, say_cold=True)
    said = _two_hosts(cold, say_cold=True)
    unsaid = _two_hosts(cold, say_cold=False)
    assert warm.between_hosts == said.between_hosts == 3
    assert sorted(said.per_worker) == [9] * 7 + [10], said.per_worker
    assert said.done_s <= warm.done_s + sum(cold) + 0.01  # (one worker was late once, too)
    assert unsaid.between_hosts > 3 and unsaid.done_s > said.done_s + 0.2


def test_the_simulator_takes_cold_times_only_one_per_worker_on_the_data_plane():
    spec = RequestSpec(model="sim", steps=8, cores=2)
    with pytest.raises(ValueError, match="one time per worker"):
        simulate([0.1] * 2, spec, cold=[0.1, 0.1])  # no hosts
    with pytest.raises(ValueError, match="one time per worker"):
        simulate([0.1] * 2, spec, hosts=["a", "b"], cold=[0.1])


def test_the_broker_says_at_debug_how_the_cores_lie_and_why_they_came_unbound(caplog):
    """``--log-level debug``: each request's core layout, when and why its cores came unbound
    (once), and each step sent to a worker other than its core's: what tells a user why
    latents crossed between the hosts."""
    with caplog.at_level(logging.DEBUG, logger="chords.broker"):
        _two_hosts([0.0, 0.15, 0.0, 0.0, 0.0, 0.0, 0.2, 0.0], say_cold=False)
    lines = [r.getMessage() for r in caplog.records]
    layouts = [line for line in lines if "cores on 8 prepared workers (a 4, b 4;" in line]
    assert layouts and "1: 'sim/" in layouts[-1], lines[:5]
    unbound = [line for line in lines if "cores unbound" in line]
    assert len(unbound) == 1, unbound  # here a cold worker was first declared late
    assert "ran again" in unbound[0] or "not one speed class" in unbound[0]
    assert any("not its bound worker" in line for line in lines)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="chords.broker"):
        _two_hosts([0.0, 0.15, 0.0, 0.0, 0.0, 0.0, 0.2, 0.0], say_cold=True)
    lines = [r.getMessage() for r in caplog.records]
    assert not any("cores unbound" in line or "not its bound worker" in line for line in lines)


# What a fresh broker process imports on its way through its first request: a module imported
# then is time that request waits for (torch's reference kernels and sympy: 0.37 s here).
FIRST_REQUEST = """
import json, sys
from tests.test_links import two_hosts
from tests.test_push import _Run
before = set(sys.modules)
_Run(two_hosts({"a0": "hosta", "a1": "hosta", "b0": "hostb", "b1": "hostb"}, cores=4)).to_done()
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def test_a_fresh_brokers_first_request_imports_nothing():
    """The data plane starts a plan from a stand-in of x0 on torch's meta device that holds
    no memory (``RequestSession.start``). Made with ``torch.empty_like`` of the declared
    (meta) x0, it went through torch's Python reference kernels, whose first call imported
    sympy: a fresh broker's first request waited 0.34 to 0.38 s between its PREPARED and its
    first EVAL (10 steps of 100 ms: 1.30 to 1.40 s against 1.02 s for the next ones).
    ``torch.empty`` of the shape imports nothing, nor does anything else on the way to the
    request's hits. A fresh interpreter, so that no earlier test has imported them already."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    run = subprocess.run(
        [sys.executable, "-c", FIRST_REQUEST],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    imported = json.loads(run.stdout.strip().splitlines()[-1])
    assert imported == [], f"the first request imported {len(imported)}: {imported[:8]}"
