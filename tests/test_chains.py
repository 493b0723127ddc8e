"""Chains (issue 25, item 6): a plan fed names hands out a core's next step before the step
it reads has a result (``Plan.follow``), so a worker runs both in a row without a round trip
through the broker; a chain cut short takes its unstarted followers back (``Plan.unfollow``).
Whatever is chained, in whatever order, and wherever chains are cut, the hits are the plan's
own, bit for bit, and every step runs exactly once per completion."""

from __future__ import annotations

import random

import pytest
import torch

from chords_mq.algorithms import ChordsPlan, SequentialPlan
from chords_mq.algorithms.base import Rectify, Ref, Task
from chords_mq.algorithms.stopping import CoreIndex
from chords_mq.broker.results import ResultStore
from chords_mq.local import ToyODE, evaluator, simulate
from tests.test_by_name import same_hits


def run_chained(plan, evaluate_task, seed, length, cut=False):
    """Drive ``plan`` by name, as the broker does with chains: a random ready task goes out
    with up to ``length - 1`` followers; with ``cut``, a random entry of a chain fails (it is
    queued again, its followers taken back). Returns the hits as (core, round, tensor), the
    (core, step) of every completion, and how many tasks were followed."""
    store = ResultStore()
    rng = random.Random(seed)
    ready: list[Task] = []
    hits, done, followed = [], [], 0
    for _ in range(10_000):  # bounded: a few hundred completions at most
        if plan.done:
            break
        ready += plan.ready()
        task = ready.pop(rng.randrange(len(ready)))
        chain = [task]
        while len(chain) < length and (nxt := plan.follow(chain[-1].id)) is not None:
            assert nxt.latent == Ref(chain[-1].id, nxt.step)  # it reads the step before alone
            chain.append(nxt)
        followed += len(chain) - 1
        fails = rng.randrange(len(chain) + 1) if cut else len(chain)  # the entry that fails
        for entry in chain[:fails]:
            x = store.evaluate(entry.latent)
            named = store.put(entry.id, evaluate_task(x, entry.step, entry.targets))
            done.append((entry.core, entry.step))
            for hit in plan.complete(entry.id, named):
                hits.append((hit.core, hit.round, store.evaluate(hit.latent)))
        if fails < len(chain):
            # its input exists (what it follows completed): an ordinary task, queued again
            assert not plan.unfollow(chain[fails].id) or fails == 0
            ready.append(chain[fails])
            for later in chain[fails + 1 :]:  # their inputs never will: taken back
                assert plan.unfollow(later.id)
    assert plan.done
    return hits, done, followed


@pytest.mark.parametrize(
    "init, steps",
    [
        ([0, 2, 4, 8], 12),  # the paper's shape
        ([0, 1, 2, 3], 8),  # d_k = 1: every step of cores 2.. is rectified; nothing to chain
        ([0, 3, 6, 12, 24, 36], 50),
    ],
)
@pytest.mark.parametrize("cut", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_chained_chords_gives_the_plans_hits_bit_for_bit(init, steps, cut, seed):
    ode = ToyODE(steps=steps, seed=seed, dtype=torch.float32)
    reference = simulate(ChordsPlan(ode.x0.clone(), steps, init), ode.velocity)
    plan = ChordsPlan(ode.x0.clone(), steps, init)
    hits, done, followed = run_chained(plan, evaluator(ode.velocity), seed, length=4, cut=cut)
    same_hits(hits, reference)
    assert len(done) == len(set(done))  # no step ran twice
    assert followed > 0 or init == [0, 1, 2, 3]
    # every step of core 1 that a task of core 1 reads comes from its own chain
    assert {s for c, s in done if c == 1} == set(range(steps))


def test_no_follower_past_a_rectification_or_at_a_hit():
    """Core 2 of [0, 2] (N=6) is rectified at steps 4 and 6 (anchors 2 and 4): its task at 2
    has no follower (step 3 is plain: it has one), at 3 none (4 reads core 1's jump); core
    1's task at step 5 none (6 is its hit)."""
    x0 = torch.zeros(2)
    plan = ChordsPlan(x0, 6, [0, 2])
    store = ResultStore()
    by_node: dict[tuple[int, int], Task] = {}
    pending = plan.ready()
    for _ in range(100):  # bounded
        if not pending:
            break
        task = pending.pop(0)
        by_node[(task.core, task.step)] = task
        follower = plan.follow(task.id)
        core, step = task.core, task.step
        if (core, step) in ((2, 3), (1, 5)):
            assert follower is None
        elif (core, step) in ((1, 0), (1, 1), (2, 2)):
            assert follower is not None and (follower.core, follower.step) == (core, step + 1)
            assert plan.unfollow(follower.id)  # taken back: readied again on completion
        named = store.put(task.id, {t: torch.full((2,), float(t)) for t in task.targets})
        plan.complete(task.id, named)
        pending += plan.ready()
    assert isinstance(by_node[(2, 4)].latent, Rectify)  # the rectification readied normally


def test_a_rank_minus_one_step_is_not_followed():
    """Under ``core-index:1`` only the tasks the fastest core's hit depends on are followed:
    core 1's steps past what core 2 reads are never handed out by ``follow``."""
    init, steps = [0, 2, 4, 8], 12
    plan = ChordsPlan(torch.zeros(2), steps, init, stop=CoreIndex(1))
    goal = plan.goal()
    assert goal is not None
    ode = ToyODE(steps=steps, seed=0, dtype=torch.float32)
    followed: list[tuple[int, int]] = []
    original = plan.follow

    def follow(task_id):
        task = original(task_id)
        if task is not None:
            followed.append((task.core, task.step))
        return task

    plan.follow = follow
    run_chained(plan, evaluator(ode.velocity), seed=0, length=8)
    assert followed and all(node in goal for node in followed)


def test_sequential_chains_end_at_the_hit_and_unfollow_is_only_for_followers():
    ode = ToyODE(steps=10, seed=3, dtype=torch.float32)
    reference = simulate(SequentialPlan(ode.x0.clone(), 10), ode.velocity)
    plan = SequentialPlan(ode.x0.clone(), 10)
    head = plan.ready()[0]
    assert not plan.unfollow(head.id)  # an ordinary task: nothing to take back
    first = plan.follow(head.id)
    assert first is not None and plan.follow(head.id) is None  # one follower per task
    assert plan.unfollow(first.id) and not plan.unfollow(first.id)
    plan2 = SequentialPlan(ode.x0.clone(), 10)
    hits, done, followed = run_chained(plan2, evaluator(ode.velocity), seed=1, length=100)
    same_hits(hits, reference)
    assert done == [(1, s) for s in range(10)] and followed == 9
