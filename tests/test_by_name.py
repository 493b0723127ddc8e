"""Plans fed their results by name (``algorithms.base``: ``Ref``, ``Rectify``, ``Parareal``)
give the hits they give on tensors, bit for bit, in any completion order, while the driver's
store (``broker.results.ResultStore``) lets each result go once no later task or hit reads it."""

from __future__ import annotations

import random

import pytest
import torch

from chords_mq.algorithms import ChordsPlan, SequentialPlan
from chords_mq.algorithms.base import (
    FINITE_CHUNK,
    Parareal,
    Rectify,
    Ref,
    Task,
    all_finite,
    as_tensor,
    check_results,
    evaluate,
    parareal,
    rectified,
)
from chords_mq.algorithms.srds import SrdsPlan
from chords_mq.algorithms.stopping import CoreIndex
from chords_mq.broker.results import ResultStore
from chords_mq.errors import PlanProtocolError
from chords_mq.local import ToyODE, evaluator, simulate


def run_by_name(plan, evaluate_task, seed):
    """Drive ``plan`` as the broker does when it feeds names: each task's input computed when it
    is handed out, results kept by name, one random task completed at a time. Returns the hits
    as (core, round, tensor), the most results held at once, and the plan's most tensors."""
    store = ResultStore()
    rng = random.Random(seed)
    pending: list[tuple[Task, torch.Tensor]] = []
    hits = []
    most_held = most_plan_tensors = 0
    while not plan.done:
        for task in plan.ready():
            pending.append((task, store.evaluate(task.latent)))
        store.keep_only(plan.names())
        most_held = max(most_held, len(store))
        most_plan_tensors = max(most_plan_tensors, len(plan.held_tensors()))
        task, x = pending.pop(rng.randrange(len(pending)))
        named = store.put(task.id, evaluate_task(x, task.step, task.targets))
        for hit in plan.complete(task.id, named):
            hits.append((hit.core, hit.round, store.evaluate(hit.latent)))
    return hits, most_held, most_plan_tensors


def same_hits(by_name, on_tensors):
    assert [(c, r) for c, r, _ in by_name] == [(h.core, h.round) for h in on_tensors.hits]
    for (_, _, latent), hit in zip(by_name, on_tensors.hits):
        assert torch.equal(latent, hit.latent)


@pytest.mark.parametrize(
    "init, steps",
    [
        ([0, 2, 4, 8], 12),  # the paper's shape
        ([0, 1, 2, 3], 8),  # d_k = 1: G is F, and the next core's cur_G too
        ([0, 4, 8, 9], 10),  # the fastest core starts one step before the end
        ([0, 3, 6, 12, 24, 36], 50),
    ],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chords_by_name_is_chords_on_tensors(init, steps, seed):
    ode = ToyODE(steps=steps, seed=seed, dtype=torch.float32)
    reference = simulate(ChordsPlan(ode.x0.clone(), steps, init), ode.velocity)
    plan = ChordsPlan(ode.x0.clone(), steps, init)
    hits, most_held, plan_tensors = run_by_name(plan, evaluator(ode.velocity), seed)
    same_hits(hits, reference)
    # the plan held no tensor but the initial latent, and the store only what was still read:
    # per core its G and a cur_G or F waiting for the other (3 latents), at most
    assert plan_tensors <= 1
    assert most_held <= 3 * len(init)
    assert plan.held_tensors() == [] and plan.names() == set()


def test_chords_by_name_under_a_core_index_stop():
    ode = ToyODE(steps=20, seed=3)
    reference = simulate(ChordsPlan(ode.x0.clone(), 20, [0, 2, 4, 8], CoreIndex(1)), ode.velocity)
    plan = ChordsPlan(ode.x0.clone(), 20, [0, 2, 4, 8], CoreIndex(1))
    hits, _, _ = run_by_name(plan, evaluator(ode.velocity), seed=5)
    same_hits(hits, reference)


@pytest.mark.parametrize("seed", [0, 1])
def test_sequential_and_srds_by_name_are_themselves_on_tensors(seed):
    ode = ToyODE(steps=16, seed=seed)
    reference = simulate(SequentialPlan(ode.x0.clone(), 16), ode.velocity)
    hits, most_held, _ = run_by_name(
        SequentialPlan(ode.x0.clone(), 16), evaluator(ode.velocity), seed
    )
    same_hits(hits, reference)
    assert most_held <= 1
    reference = simulate(SrdsPlan(ode.x0.clone(), 16), ode.velocity)
    hits, _, _ = run_by_name(SrdsPlan(ode.x0.clone(), 16), evaluator(ode.velocity), seed)
    same_hits(hits, reference)


def test_the_operations_compute_what_the_plan_computes_on_tensors():
    a, b, c = (torch.randn(5, generator=torch.Generator().manual_seed(i)) for i in range(3))
    tensors = {Ref(1, 2): a.clone(), Ref(2, 3): b, Ref(3, 3): c}
    op = rectified(Ref(1, 2), Ref(2, 3), Ref(3, 3), exclusive=True)
    assert op == Rectify(Ref(1, 2), Ref(2, 3), Ref(3, 3), True)
    assert torch.equal(evaluate(op, tensors.__getitem__), (a - b) + c)
    tensors[Ref(1, 2)] = a.clone()
    op2 = parareal(Ref(1, 2), Ref(2, 3), Ref(3, 3), exclusive=False)
    assert op2 == Parareal(Ref(1, 2), Ref(2, 3), Ref(3, 3), False)
    assert torch.equal(evaluate(op2, tensors.__getitem__), (a + b) - c)
    assert torch.equal(tensors[Ref(1, 2)], a)  # not exclusive: not overwritten
    with pytest.raises(PlanProtocolError, match="with tensors"):
        rectified(Ref(1, 2), b, c, exclusive=False)  # names and tensors do not mix
    with pytest.raises(PlanProtocolError, match="evaluate it first"):
        parareal(a, Ref(2, 3), c, exclusive=False)
    with pytest.raises(PlanProtocolError, match="evaluate it first"):
        as_tensor(Ref(1, 2))


def test_a_dropped_result_is_a_protocol_error_not_a_wrong_latent():
    store = ResultStore()
    named = store.put(7, {8: torch.ones(2), 9: torch.zeros(2)})
    assert named == {8: Ref(7, 8), 9: Ref(7, 9)}
    assert store.keep_only({Ref(7, 9)}) == 1
    assert Ref(7, 8) not in store and len(store) == 1
    with pytest.raises(PlanProtocolError, match="not held"):
        store.evaluate(Ref(7, 8))


def test_results_by_name_must_name_their_own_task_and_target():
    task = Task(id=4, core=1, step=2, round=3, latent=Ref(3, 2), targets=(3,))
    check_results(task, {3: Ref(4, 3)})
    for wrong in ({3: Ref(5, 3)}, {3: Ref(4, 4)}):
        with pytest.raises(PlanProtocolError, match="result for step 3 is"):
            check_results(task, wrong)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_all_finite_looks_at_every_chunk(dtype):
    """``all_finite`` sums a latent a chunk at a time (a float64 copy of the whole would be
    twice a float32 latent): a NaN or an Inf in the last chunk is found, and finite values
    near the dtype's maximum are finite."""
    big = torch.full((2 * FINITE_CHUNK + 3,), torch.finfo(dtype).max / 2, dtype=dtype)
    assert all_finite(big) and all_finite(big[:0])
    for bad in (float("nan"), float("inf"), -float("inf")):
        last = big.clone()
        last[-1] = bad
        assert not all_finite(last) and not all_finite(last.view(1, -1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_all_finite_takes_a_finite_sum_only_as_proof(dtype):
    """The fast path: small values sum to a finite number (no exact check needed); an Inf and
    a -Inf sum to NaN, not to a finite number, and are found."""
    small = torch.linspace(-1, 1, 2 * FINITE_CHUNK + 5).to(dtype)
    assert all_finite(small)
    both = small.clone()
    both[1], both[-2] = float("inf"), -float("inf")
    assert not all_finite(both)
    one = small.clone()
    one[FINITE_CHUNK] = float("nan")
    assert not all_finite(one)
