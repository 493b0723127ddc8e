"""Recovery by lineage (``broker/lineage.py``): a lost result the request still needs is
recomputed from its parents, recursively down to results still held or the initial latent,
parents first, none twice, within a bound; with nobody to run it, the request waits and fails
as today. The property test drives real CHORDS plans fed by name over fake workers that are
lost at random points: every recomputed result is bitwise the original, and the hits are
bitwise those of a run without losses."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch

from chords_mq.algorithms.base import Hit, Latent, Parareal, Rectify, Ref, Task, evaluate
from chords_mq.broker.directory import X0, Directory, Initial, Lineage, needed
from chords_mq.broker.failures import RULES, Failure
from chords_mq.broker.lineage import (
    DEFAULT_MAX_REPLAYS,
    RecoveryFailed,
    RecoveryTooLarge,
    recovery_plan,
)
from chords_mq.broker.outbox import Outbox
from chords_mq.broker.testing import velocity
from chords_mq.errors import PlanProtocolError
from chords_mq.local import evaluator, simulate
from chords_mq.request import RequestSpec
from chords_mq.solvers import unit_euler
from tests.test_broker_core import Broker

A, B = b"worker/a", b"worker/b"


def graph(held: dict[Ref, bytes] | None = None) -> Directory:
    """Five tasks, two cores, every result let go but ``held``:

    t0 (x0) -> (0,1) (0,2);  t1 (0,1) -> (1,2);  t2 (0,2) -> (2,3);
    t3 rectify((1,2), (0,2), (2,3)) -> (3,4);  t4 (3,4) -> (4,5)
    """
    directory = Directory()
    records = [
        Lineage(0, 1, 0, (1, 2), X0),
        Lineage(1, 1, 1, (2,), Ref(0, 1)),
        Lineage(2, 2, 2, (3,), Ref(0, 2)),
        Lineage(3, 1, 2, (4,), Rectify(Ref(1, 2), Ref(0, 2), Ref(2, 3), exclusive=True)),
        Lineage(4, 1, 4, (5,), Ref(3, 4)),
    ]
    held = held or {}
    for record in records:
        directory.record(record, A, 64)
    for ref, holder in held.items():
        if holder != A:  # moved to another worker
            directory.copied(ref, holder)
            directory.forget(A, [ref])
    directory.keep_only(set(held))
    return directory


def test_a_lost_result_is_recomputed_parents_first_down_to_x0_each_task_once():
    plan = recovery_plan(graph(), [Ref(4, 5)])
    assert [r.task for r in plan.replays] == [0, 1, 2, 3, 4]
    assert plan.from_x0 and plan.reads == frozenset() and len(plan) == 5
    # t0 is read along two paths, (0,1) and (0,2), and runs once
    made: set[Ref] = set()
    for replay in plan.replays:
        assert set(replay.parents()) <= made  # every parent made by an earlier replay
        made.update(replay.results())
    assert plan.needs() == {Ref(0, 1), Ref(0, 2), Ref(1, 2), Ref(2, 3), Ref(3, 4)}


def test_the_recursion_stops_at_results_still_held():
    directory = graph(held={Ref(1, 2): A, Ref(0, 2): B, Ref(2, 3): B})
    plan = recovery_plan(directory, [Ref(4, 5)])
    assert [r.task for r in plan.replays] == [3, 4] and not plan.from_x0
    assert plan.reads == {Ref(1, 2), Ref(0, 2), Ref(2, 3)}
    # two lost results, one the other's ancestor: still each task once
    plan = recovery_plan(directory, [Ref(4, 5), Ref(3, 4)])
    assert [r.task for r in plan.replays] == [3, 4] and plan.lost == {Ref(4, 5), Ref(3, 4)}
    # a "lost" result held again needs nothing
    assert len(recovery_plan(directory, [Ref(2, 3)])) == 0


def test_a_replay_computes_its_input_out_of_place_and_is_recorded_as_a_replay():
    directory = graph(held={Ref(1, 2): A, Ref(0, 2): A, Ref(2, 3): A})
    plan = recovery_plan(directory, [Ref(4, 5)])
    rectify = plan.replays[0].input
    # the held (1,2) another task may read is not overwritten by the replay
    assert rectify == Rectify(Ref(1, 2), Ref(0, 2), Ref(2, 3), exclusive=False)
    for replay in plan.replays:
        directory.record(replay, B, 64)
    assert directory.replays == 2 and directory.holders(Ref(4, 5)) == {B}


def test_a_recovery_past_the_bound_is_a_typed_failure():
    directory = graph()
    assert len(recovery_plan(directory, [Ref(4, 5)], max_replays=5)) == 5
    with pytest.raises(RecoveryTooLarge, match="more than the 4 replays") as caught:
        recovery_plan(directory, [Ref(4, 5)], max_replays=4)
    assert caught.value.failure is Failure.RECOVERY_TOO_LARGE
    assert isinstance(caught.value, RecoveryFailed)
    # the bound counts every replay of the request: two already run leave three
    directory.record(Lineage(0, 1, 0, (1, 2), X0), B, 64)
    directory.record(Lineage(1, 1, 1, (2,), Ref(0, 1)), B, 64)
    assert directory.replays == 2
    directory.worker_lost(B, ())
    with pytest.raises(RecoveryTooLarge, match="more than the 3 replays"):
        recovery_plan(directory, [Ref(4, 5)], max_replays=5)
    assert DEFAULT_MAX_REPLAYS >= 1000


def test_a_result_no_task_recorded_is_a_protocol_error():
    with pytest.raises(PlanProtocolError, match="no task recorded it"):
        recovery_plan(graph(), [Ref(9, 10)])


def test_the_recovery_row_fails_the_request_at_once_with_its_code():
    broker = Broker()
    worker = broker.worker("a")
    broker.submit("r1")
    broker.prepared(worker)
    session = broker.sessions["r1"]
    try:
        recovery_plan(graph(), [Ref(4, 5)], max_replays=1)
    except RecoveryFailed as exc:
        out = Outbox(broker.core.epoch)
        broker.core.failures.apply(out, exc.failure, session=session, detail=str(exc))
        broker._keep(out.sends)
    assert broker.error("r1") == "recovery_too_large"
    assert "r1" not in broker.sessions
    rule = RULES[Failure.RECOVERY_TOO_LARGE]
    assert rule.at_once and rule.fails == "recovery_too_large" and not rule.counted


# -- the property: random CHORDS plans, random losses, bitwise recovery -----------------------


class Pool:
    """Fake workers for one request: each keeps results by name, as the data plane's stores
    will; the broker keeps only the directory. Losing a worker loses its store; a fresh worker
    takes its place."""

    def __init__(self, rng: random.Random, workers: int, x0: torch.Tensor) -> None:
        self.rng = rng
        self.x0 = x0.clone()  # the broker keeps the initial latent
        self.stores: dict[bytes, dict[Ref, torch.Tensor]] = {}
        self.joined = 0
        for _ in range(workers):
            self.join()
        self.directory = Directory()
        self.evaluate = evaluator(velocity)
        self.originals: dict[Ref, torch.Tensor] = {}
        self.recoveries = self.replays = 0

    def join(self) -> None:
        self.stores[f"worker/{self.joined}".encode()] = {}
        self.joined += 1

    def any_worker(self) -> bytes:
        return self.rng.choice(sorted(self.stores))

    def tensor_of(self, worker: bytes) -> Callable[[Ref], torch.Tensor]:
        """A result as ``worker`` reads it: its own, else a copy pulled from a holder (kept
        or not)."""

        def get(ref: Ref) -> torch.Tensor:
            store = self.stores[worker]
            if ref in store:
                return store[ref]
            holders = sorted(self.directory.holders(ref))
            assert holders, f"{ref} is held nowhere: read before it was made"
            copy = self.stores[self.rng.choice(holders)][ref].clone()
            if self.rng.random() < 0.3:
                store[ref] = copy
                self.directory.copied(ref, worker)
            return copy

        return get

    def compute(self, value: Latent, worker: bytes) -> torch.Tensor:
        """``value`` computed on ``worker`` as the plan would (in place where it says)."""
        tensor = evaluate(value, self.tensor_of(worker))
        if isinstance(value, Rectify | Parareal) and value.exclusive:
            self.stores[worker].pop(value.fine, None)  # overwritten if it was there
        self.directory.evaluated(value, worker)
        return tensor

    def run(self, record: Lineage, latent: Latent) -> dict[int, Ref]:
        worker = self.any_worker()
        initial = isinstance(record.input, Initial)
        x = self.x0.clone() if initial else self.compute(latent, worker)
        results = self.evaluate(x, record.step, record.targets)
        for target, tensor in results.items():
            ref = Ref(record.task, target)
            self.stores[worker][ref] = tensor
            if ref in self.originals:
                assert torch.equal(tensor, self.originals[ref]), f"{ref} recomputed differently"
            else:
                self.originals[ref] = tensor.clone()
        self.directory.record(record, worker, x.untyped_storage().nbytes())
        return {target: Ref(record.task, target) for target in record.targets}

    def let_go(self, wanted: frozenset[Ref]) -> None:
        for holder, refs in self.directory.keep_only(wanted).items():
            for ref in refs:
                del self.stores[holder][ref]

    def lose(self, victims: list[bytes], wanted: frozenset[Ref]) -> None:
        """Lose ``victims`` at once, then recompute what the request still needs."""
        lost: set[Ref] = set()
        for victim in victims:
            del self.stores[victim]
            lost |= self.directory.worker_lost(victim, wanted)
            self.join()
        assert lost == self.directory.missing(wanted)  # every earlier loss was recovered
        plan = recovery_plan(self.directory, lost, max_replays=100_000)
        assert len({r.task for r in plan.replays}) == len(plan)  # nothing twice
        for replay in plan.replays:  # each remakes a result that is read and held nowhere
            made = set(replay.results()) & (lost | plan.needs())
            assert any(ref not in self.directory for ref in made)
        for replay in plan.replays:
            self.run(replay, replay.input)  # raises if a parent is not made yet
        for ref in lost:
            assert ref in self.directory
            for holder in self.directory.holders(ref):  # the replay's, and copies of it
                assert torch.equal(self.stores[holder][ref], self.originals[ref])
        self.recoveries += bool(lost)
        self.replays += len(plan)
        self.let_go(wanted)


def drive(spec: RequestSpec, x0: torch.Tensor, seed: int, losses: float) -> tuple[list, Pool]:
    """Run ``spec``'s plan fed by name over four fake workers, one random ready task or hit
    at a time; with ``losses`` > 0, lose one or two workers with that chance at each point,
    and once (from point N/2 on) every holder of a result the request needs."""
    plan = spec.build_plan(x0.clone(), unit_euler)
    assert spec.rules.by_name and not plan.reads_latents
    rng = random.Random(seed)
    pool = Pool(rng, 4, x0)
    pending: list[Task] = []
    unsent: list[Hit] = []
    hits: list[tuple[int, int, torch.Tensor]] = []
    forced = losses == 0
    for point in range(100_000):
        if plan.done and not unsent:
            break
        for task in plan.ready():
            if plan.rank(task) < 0:  # no hit depends on it (a core-index stop)
                plan.abandon(task.id)
            else:
                pending.append(task)
        wanted = needed(plan.names(), [t.latent for t in pending], [h.latent for h in unsent])
        pool.let_go(wanted)
        if losses and rng.random() < losses:
            pool.lose(rng.sample(sorted(pool.stores), rng.choice((1, 2))), wanted)
        elif not forced and point >= spec.steps // 2:
            held = sorted((ref for ref in wanted if ref in pool.directory), key=str)
            if held:  # lose every holder of one result the request needs
                pool.lose(sorted(pool.directory.holders(rng.choice(held))), wanted)
                forced = True
        if unsent and (plan.done or rng.random() < 0.3):
            hit = unsent.pop(0)
            latent = pool.compute(hit.latent, pool.any_worker()).clone()
            hits.append((hit.core, hit.round, latent))
            continue
        task = pending.pop(rng.randrange(len(pending)))
        named = pool.run(Lineage.of(task), task.latent)
        unsent.extend(plan.complete(task.id, named))
    else:
        raise AssertionError("the plan did not finish")
    assert forced
    return hits, pool


def cases() -> list[tuple[int, int, str | None, int]]:
    rng = random.Random(25)
    picked = [(8, 50, None, 0), (2, 5, None, 1), (4, 20, "core-index:1", 2)]
    for seed in range(3, 9):
        cores = rng.randint(2, 8)
        steps = rng.randint(max(5, cores), 50)
        stop = rng.choice([None, f"core-index:{rng.randint(1, cores)}"])
        picked.append((cores, steps, stop, seed))
    return picked


@pytest.mark.parametrize("cores, steps, stop, seed", cases())
def test_random_losses_recompute_every_result_bitwise_and_the_hits_are_unchanged(
    cores, steps, stop, seed
):
    spec = RequestSpec(model="toy", method="chords", steps=steps, cores=cores, stop=stop)
    x0 = torch.randn(16, generator=torch.Generator().manual_seed(seed))
    reference = simulate(spec.build_plan(x0.clone(), unit_euler), velocity)
    calm, _ = drive(spec, x0, seed, losses=0.0)
    stormy, pool = drive(spec, x0, seed + 100, losses=0.05)
    for run in (calm, stormy):
        assert [(c, r) for c, r, _ in run] == [(h.core, h.round) for h in reference.hits]
        for (_, _, latent), hit in zip(run, reference.hits):
            assert torch.equal(latent, hit.latent)
    assert pool.recoveries >= 1 and pool.replays >= 1  # a loss did need a recomputation
