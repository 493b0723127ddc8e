"""ChordsPlan against CHORDS-SPEC section 9: rounds, speedups, allocation, rectification,
latents, stop rules and edge cases. Expected numbers are the spec's, written out by hand."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chords_mq.algorithms import ChordsPlan, CoreIndex, Residual, SequentialPlan
from chords_mq.errors import InvalidInitSequence, InvalidPlanConfig, PlanProtocolError
from chords_mq.local import simulate
from chords_mq.solvers import grid_euler, solve_targets, unit_euler
from tests.reference_chords import run_reference

K4 = [0, 8, 16, 32]
K6 = [0, 3, 6, 12, 24, 36]
K8 = [0, 2, 4, 8, 16, 24, 32, 40]
UNIFORM8 = [0, 6, 12, 18, 24, 30, 36, 42]


def toy(steps: int, dim: int = 64, seed: int = 0):
    """The spec's smooth nonlinear toy, float64, on a uniform grid t = i / N."""
    x0 = torch.randn(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def f(x: torch.Tensor, i: int) -> torch.Tensor:
        return torch.tanh(2 * x) * (1 - i / steps) - 0.3 * x

    return x0, f, grid_euler([i / steps for i in range(steps + 1)])


def other_toy(steps: int, seed: int = 1):
    """A second problem: a rotation with a state-dependent rate, unit-index Euler scaled down."""
    x0 = torch.randn(2, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def f(x: torch.Tensor, i: int) -> torch.Tensor:
        rate = 1.0 + 0.5 * torch.sin(x.sum(0, keepdim=True) + i / steps)
        return torch.cat([-x[1:2], x[0:1]]) * rate / steps

    return x0, f, unit_euler


def run_plan(init, steps=50, stop=None, problem=toy, seed=None):
    x0, f, solver = problem(steps)
    plan = ChordsPlan(x0=x0, steps=steps, init_sequence=init, stop=stop)
    return plan, simulate(plan, f, solver, seed=seed)


def evaluated(task, f, solver):
    """What a worker returns for ``task``: the solver at each of its targets."""
    out = f(task.latent, task.step)
    return solve_targets(solver, task.latent, out, task.step, task.targets)


# -- 9.2 hit rounds and order ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("init", "expected"),
    [
        (K4, [(0, 4), (4, 21), (3, 36), (2, 43), (1, 50)]),
        (K6, [(0, 6), (6, 19), (5, 30), (4, 41), (3, 46), (2, 48), (1, 50)]),
        (K8, [(0, 8), (8, 17), (7, 24), (6, 31), (5, 38), (4, 45), (3, 48), (2, 49), (1, 50)]),
        (
            UNIFORM8,
            [(0, 8), (8, 15), (7, 20), (6, 25), (5, 30), (4, 35), (3, 40), (2, 45), (1, 50)],
        ),
    ],
)
def test_hit_rounds_and_order_for_paper_sequences_at_n50(init, expected):
    _, result = run_plan(init)
    assert [(h.core, h.round) for h in result.hits] == expected


def test_hit_round_closed_form_for_random_sequences():
    rng = random.Random(7)
    for _ in range(40):
        steps = rng.randint(2, 70)
        cores = rng.randint(1, min(9, steps))
        init = [0, *sorted(rng.sample(range(1, steps), cores - 1))]
        _, result = run_plan(init, steps=steps)
        rounds = {h.core: h.round for h in result.hits}
        assert rounds[0] == cores
        for k, start in enumerate(init, start=1):
            assert rounds[k] == steps - start + k - 1
        keys = [(h.round, h.core) for h in result.hits]
        assert keys == sorted(keys), "hits must be ordered by round, ties by ascending core"


# -- 9.3 speedups ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("init", "steps", "speedup", "round_"),
    [
        (K4, 50, 2.381, 21),
        (K6, 50, 2.632, 19),
        (K8, 50, 2.941, 17),
        ([0, 3, 6, 12, 24, 36, 48, 60], 75, 3.409, 22),
        ([0, 4, 8, 16, 32, 48, 64, 80], 100, 3.704, 27),
        (K8, 75, 1.786, 42),
        (K8, 100, 1.493, 67),
    ],
)
def test_fastest_core_round_speedup(init, steps, speedup, round_):
    _, result = run_plan(init, steps=steps, stop=CoreIndex(1))
    assert result.returned.core == len(init)
    assert result.returned.round == round_
    assert round(steps / result.returned.round, 3) == speedup


# -- 9.4 allocation ----------------------------------------------------------------------------


@pytest.mark.parametrize("init", [K4, K6, K8, UNIFORM8])
def test_allocation_matches_closed_form(init):
    steps, cores = 50, len(init)
    _, result = run_plan(init)
    for r, pairs in enumerate(result.rounds, start=1):
        expected = sorted(
            (init[k - 1] + r - k, k)
            for k in range(1, cores + 1)
            if k <= r <= steps - init[k - 1] + k - 1
        )
        assert sorted(pairs) == expected, f"round {r}"
    counts = [len(pairs) for pairs in result.rounds]
    assert counts[:cores] == list(range(1, cores + 1))


@pytest.mark.parametrize(("init", "total"), [(K4, 144), (K6, 219), (K8, 274)])
def test_total_evaluations(init, total):
    _, result = run_plan(init)
    assert result.evaluations == total == sum(50 - i for i in init)


def test_round_17_of_k8():
    _, result = run_plan(K8)
    assert result.rounds[16] == [
        (16, 1),
        (17, 2),
        (18, 3),
        (21, 4),
        (28, 5),
        (35, 6),
        (42, 7),
        (49, 8),
    ]


# -- 9.5 rectification schedule ------------------------------------------------------------------


def test_rectification_schedule_k8_paper():
    plan, _ = run_plan(K8)
    rounds: dict[int, list[int]] = {}
    for rect in plan.rectifications:
        rounds.setdefault(rect.core, []).append(rect.round)
    assert rounds[2] == list(range(3, 50, 2)) and len(rounds[2]) == 24
    assert rounds[3] == list(range(4, 49, 2)) and len(rounds[3]) == 23
    assert rounds[4] == list(range(7, 44, 4)) and len(rounds[4]) == 10
    assert rounds[5] == [12, 20, 28, 36]
    assert rounds[6] == [13, 21, 29]
    assert rounds[7] == [14, 22]
    assert rounds[8] == [15]
    (last,) = [r for r in plan.rectifications if r.core == 8]
    assert (last.anchor, last.target) == (40, 48)
    assert rounds.get(1) is None, "core 1 is never rectified"


@pytest.mark.parametrize(("init", "round_", "anchor"), [(K4, 19, 32), (K6, 17, 36), (K8, 15, 40)])
def test_fastest_core_rectified_once_to_step_48(init, round_, anchor):
    plan, _ = run_plan(init)
    fastest = [r for r in plan.rectifications if r.core == len(init)]
    assert [(r.round, r.anchor, r.target) for r in fastest] == [(round_, anchor, 48)]


def test_rectification_closed_form_for_random_sequences():
    rng = random.Random(11)
    for _ in range(30):
        steps = rng.randint(3, 60)
        cores = rng.randint(2, min(8, steps))
        init = [0, *sorted(rng.sample(range(1, steps), cores - 1))]
        plan, _ = run_plan(init, steps=steps)
        got = sorted((r.core, r.round, r.anchor, r.target) for r in plan.rectifications)
        expected = []
        for k in range(2, cores + 1):
            start, gap = init[k - 1], init[k - 1] - init[k - 2]
            for j in range(1, (steps - start) // gap + 1):
                expected.append((k, k - 1 + j * gap, start + (j - 1) * gap, start + j * gap))
        assert got == sorted(expected), init


# -- 9.1 / 9.6 latents -------------------------------------------------------------------------


@pytest.mark.parametrize("problem", [toy, other_toy])
@pytest.mark.parametrize("init", [K4, K6, K8, UNIFORM8, [0, 5, 6, 7], [0, 1, 2, 3], [0, 49]])
def test_latents_match_independent_reference(problem, init):
    steps = 50
    x0, f, solver = problem(steps)
    plan, result = run_plan(init, steps=steps, problem=problem)
    ref = run_reference(x0, steps, init, solver, f)
    assert [(h.core, h.round) for h in result.hits] == [(c, r) for c, r, _ in ref.hits]
    for hit, (_, _, latent) in zip(result.hits, ref.hits):
        assert torch.allclose(hit.latent, latent, rtol=0, atol=1e-12), hit.core
    core1 = next(h for h in result.hits if h.core == 1)
    assert torch.equal(core1.latent, ref.hits[-1][2])
    assert result.rounds == [sorted(pairs, key=lambda p: p[1]) for pairs in ref.calls]
    assert sorted((r.core, r.round, r.anchor, r.target) for r in plan.rectifications) == sorted(
        ref.rectifications
    )


def sequential_solve(x0, f, solver, steps):
    x = x0
    for i in range(steps):
        x = solver(x, f(x, i), i, i + 1)
    return x


@st.composite
def init_sequences(draw):
    steps = draw(st.integers(min_value=1, max_value=60))
    cores = draw(st.integers(min_value=1, max_value=min(10, steps)))
    rest = (
        draw(
            st.lists(st.integers(1, steps - 1), min_size=cores - 1, max_size=cores - 1, unique=True)
        )
        if steps > 1
        else []
    )
    return steps, [0, *sorted(rest)]


@settings(max_examples=60, deadline=None)
@given(init_sequences(), st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
def test_core1_equals_sequential_solve_bitwise(case, dtype):
    steps, init = case
    x0, f, solver = toy(steps)
    x0 = x0.to(dtype)
    plan = ChordsPlan(x0=x0, steps=steps, init_sequence=init)
    result = simulate(plan, f, solver)
    core1 = next(h for h in result.hits if h.core == 1)
    assert torch.equal(core1.latent, sequential_solve(x0, f, solver, steps))
    seq = simulate(SequentialPlan(x0, steps), f, solver)
    assert torch.equal(core1.latent, seq.returned.latent)


@settings(max_examples=25, deadline=None)
@given(init_sequences(), st.integers(0, 2**32 - 1))
def test_hits_identical_under_shuffled_completion(case, seed):
    steps, init = case
    _, in_rounds = run_plan(init, steps=steps)
    _, shuffled = run_plan(init, steps=steps, seed=seed)
    assert [(h.core, h.round) for h in shuffled.hits] == [(h.core, h.round) for h in in_rounds.hits]
    for a, b in zip(shuffled.hits, in_rounds.hits):
        assert torch.equal(a.latent, b.latent)


def test_hits_identical_when_completing_in_reverse_and_batches():
    """Drive the plan by hand as a broker would: hand out everything, finish newest first."""
    x0, f, solver = toy(50)
    reference = simulate(ChordsPlan(x0=x0, steps=50, init_sequence=K8), f, solver)
    plan = ChordsPlan(x0=x0, steps=50, init_sequence=K8)
    outstanding, hits = [], []
    while not plan.done:
        outstanding.extend(plan.ready())
        task = outstanding.pop()  # LIFO: the most recently readied task first
        hits.extend(plan.complete(task.id, evaluated(task, f, solver)))
    assert [(h.core, h.round) for h in hits] == [(h.core, h.round) for h in reference.hits]
    assert list(plan.published) == [(h.core, h.round) for h in reference.hits]
    assert all(torch.equal(a.latent, b.latent) for a, b in zip(hits, reference.hits))


def test_plan_drops_latents_it_no_longer_needs():
    x0, f, solver = toy(50)
    plan = ChordsPlan(x0=x0, steps=50, init_sequence=K8)
    result = simulate(plan, f, solver)
    # 274 evaluations, but at any time only the current point per core, its G, and cur_G
    assert result.peak_latents <= 3 * len(K8)
    assert plan.retained_latents() == 0


# -- 9.7 stop rules ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("index", "round_", "core"), [(-3, 17, 8), (0, 17, 8), (1, 17, 8), (2, 24, 7), (3, 31, 6)]
)
def test_core_index_stop(index, round_, core):
    _, result = run_plan(K8, stop=CoreIndex(index))
    assert (result.returned.core, result.returned.round) == (core, round_)
    assert result.hits[-1] is result.returned


@pytest.mark.parametrize("index", [8, 9, 100])
def test_core_index_at_least_k_never_stops_early(index):
    _, result = run_plan(K8, stop=CoreIndex(index))
    assert (result.returned.core, result.returned.round) == (1, 50)


def test_core_index_counts_evaluations_up_to_the_stop_round():
    _, result = run_plan(K8, stop=CoreIndex(1))
    # rounds 1..8 run 1..8 calls, rounds 9..17 run 8 each: the reference's count at round 17
    assert result.evaluations == sum(range(1, 9)) + 9 * 8


def residual_of(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.sqrt(((a - b) ** 2).sum())) / a.numel()


def test_residual_stop_follows_the_l2_over_numel_formula():
    _, full = run_plan(K8)  # K8 hits: one per round, so every hit closes its round
    diffs = [
        residual_of(full.hits[i].latent, full.hits[i - 1].latent) for i in range(1, len(full.hits))
    ]
    thresholds = [d * factor for d in diffs if d > 0 for factor in (0.99, 1.01)]
    for threshold in thresholds:
        # hits[p] is returned for the first p >= 1 with residual(hits[p], hits[p-1]) < threshold
        position = next((p for p in range(1, len(full.hits)) if diffs[p - 1] < threshold), None)
        expected = full.hits[position] if position is not None else full.hits[-1]
        _, result = run_plan(K8, stop=Residual(threshold))
        assert result.returned is result.hits[-1]
        assert (result.returned.core, result.returned.round) == (expected.core, expected.round)
        assert torch.equal(result.returned.latent, expected.latent)


def test_residual_matches_reference_stop_round():
    x0, f, solver = toy(50)
    for threshold in (1e-2, 1e-3, 1e-4, 1e-6):

        def ref_stop(hits, threshold=threshold):
            return len(hits) >= 2 and residual_of(hits[-1][2], hits[-2][2]) < threshold

        ref = run_reference(x0, 50, K8, solver, f, stop=ref_stop)
        _, result = run_plan(K8, stop=Residual(threshold))
        assert result.returned.round == (ref.stopped_round or 50)
        assert torch.equal(result.returned.latent, ref.hits[-1][2])


def test_stop_rule_sees_all_hits_of_a_tied_round():
    """[0,1,2,3]: all four cores hit at round N; the round's hits are appended before the check,
    so CoreIndex(1) returns the last of them (core 4), not core 1."""
    _, result = run_plan([0, 1, 2, 3], stop=CoreIndex(1))
    assert [h.core for h in result.hits] == [0, 1, 2, 3, 4]
    assert result.returned.core == 4


# -- 9.9 edge cases ----------------------------------------------------------------------------


def test_single_core():
    x0, f, solver = toy(50)
    _, result = run_plan([0])
    assert [(h.core, h.round) for h in result.hits] == [(0, 1), (1, 50)]
    assert torch.equal(result.hits[0].latent, solver(x0, f(x0, 0), 0, 50))
    assert torch.equal(result.hits[1].latent, sequential_solve(x0, f, solver, 50))


def test_last_core_at_n_minus_1():
    _, result = run_plan([0, 49])
    assert [(h.core, h.round) for h in result.hits] == [(0, 2), (2, 2), (1, 50)]
    assert torch.equal(result.hits[0].latent, result.hits[1].latent)


def test_gap_one_cores_do_not_crash_and_agree():
    _, result = run_plan([0, 1, 2, 3])
    assert [(h.core, h.round) for h in result.hits] == [(0, 4), (1, 50), (2, 50), (3, 50), (4, 50)]
    latents = [h.latent for h in result.hits[1:]]
    for latent in latents[1:]:
        assert torch.allclose(latent, latents[0], rtol=0, atol=1e-12)
    assert torch.equal(latents[1], latents[0])  # core 2 copies core 1 exactly


@pytest.mark.parametrize(
    "init", [[1, 2, 3], [0, 16, 8], [0, 8, 8], [0, 50], [0, 60], [], [0, 2.5], [0, True]]
)
def test_invalid_init_sequences_are_rejected(init):
    x0, _, _ = toy(50)
    with pytest.raises(InvalidInitSequence):
        ChordsPlan(x0=x0, steps=50, init_sequence=init)


@pytest.mark.parametrize("steps", [0, -1, 2.0])
def test_invalid_steps_are_rejected(steps):
    with pytest.raises(InvalidPlanConfig):
        ChordsPlan(x0=torch.zeros(3), steps=steps, init_sequence=[0])


def test_integer_latent_is_rejected():
    with pytest.raises(InvalidPlanConfig):
        ChordsPlan(x0=torch.zeros(3, dtype=torch.int64), steps=5, init_sequence=[0])


# -- driving the plan --------------------------------------------------------------------------


def test_ready_hands_out_each_task_once():
    x0, f, solver = toy(10)
    plan = ChordsPlan(x0=x0, steps=10, init_sequence=[0, 4])
    (first,) = plan.ready()
    assert (first.core, first.step, first.round) == (1, 0, 1)
    assert first.targets == (1, 4)  # the fine step and core 2's coarse init
    assert plan.ready() == []
    plan.complete(first.id, evaluated(first, f, solver))
    assert sorted((t.core, t.step) for t in plan.ready()) == [(1, 1), (2, 4)]


def test_protocol_errors_are_typed():
    x0, f, solver = toy(10)
    plan = ChordsPlan(x0=x0, steps=10, init_sequence=[0, 4])
    (task,) = plan.ready()
    good = evaluated(task, f, solver)
    with pytest.raises(PlanProtocolError):
        plan.complete(task.id + 100, good)
    with pytest.raises(PlanProtocolError, match="shape"):
        plan.complete(task.id, {1: torch.zeros(3, dtype=torch.float64), 4: good[4]})
    with pytest.raises(PlanProtocolError, match="expected"):
        plan.complete(task.id, {1: good[1]})  # a target missing
    with pytest.raises(PlanProtocolError, match="dtype"):
        plan.complete(task.id, {1: good[1].long(), 4: good[4]})
    plan.complete(task.id, good)
    with pytest.raises(PlanProtocolError):
        plan.complete(task.id, good)


def test_late_completions_after_a_stop_are_dropped():
    x0, f, solver = toy(50)
    plan = ChordsPlan(x0=x0, steps=50, init_sequence=K8, stop=CoreIndex(1))
    late = []
    while not plan.done:
        wave = sorted(plan.ready(), key=lambda t: -t.core)  # core 8 first: stop mid-wave
        for task in wave:
            if plan.done:
                late.append(task)
            else:
                plan.complete(task.id, evaluated(task, f, solver))
    assert plan.returned is not None and plan.returned.core == 8
    assert [core for core, _ in plan.published] == [0, 8]
    assert len(late) == 7 and plan.in_flight == 7
    assert plan.ready() == []
    for task in late:  # still in flight on workers when the stop fired: accepted and dropped
        assert plan.complete(task.id, evaluated(task, f, solver)) == []
    assert plan.in_flight == 0
    assert [core for core, _ in plan.published] == [0, 8]
    assert plan.retained_latents() == 0  # the returned hit is the caller's now


# -- rank: what the returned hit depends on (placement only) --------------------------------


def released_hits(init: list[int], steps: int, stop: CoreIndex, perturb=None) -> list:
    """Drive the plan round by round; ``perturb`` = (core, step) adds 1 to that task's results.
    Every hit the request releases, up to the returned one, as (core, latent)."""
    x0, f, solver = toy(steps, dim=8)
    plan = ChordsPlan(x0=x0, steps=steps, init_sequence=init, stop=stop)
    hits = []
    while not plan.done:
        for task in plan.ready():
            results = solve_targets(
                solver, task.latent, f(task.latent, task.step), task.step, task.targets
            )
            if (task.core, task.step) == perturb:
                results = {j: r + 1.0 for j, r in results.items()}
            hits += [(hit.core, hit.latent.clone()) for hit in plan.complete(task.id, results)]
    assert plan.returned is not None
    return hits


@pytest.mark.parametrize(
    ("init", "steps", "index"),
    [(K4, 50, 1), (K8, 50, 1), (K8, 50, 3), (K6, 50, 2), ([0, 3, 7], 12, 1)],
)
def test_rank_marks_exactly_the_tasks_the_requests_hits_depend_on(init, steps, index):
    """The ranked tasks are those whose perturbation changes one of the hits the request
    releases, the returned one and those before it (found here by perturbing each task in
    turn); the longest rank is the returned hit's round; the rest rank -1 (and the broker
    abandons them)."""
    stop = CoreIndex(index)
    base = released_hits(init, steps, stop)
    x0, f, solver = toy(steps, dim=8)
    plan = ChordsPlan(x0=x0, steps=steps, init_sequence=init, stop=CoreIndex(index))
    tasks, ranks = [], {}
    while not plan.done:
        for task in plan.ready():
            tasks.append((task.core, task.step))
            ranks[(task.core, task.step)] = (plan.rank(task), task.round)
            out = f(task.latent, task.step)
            plan.complete(task.id, solve_targets(solver, task.latent, out, task.step, task.targets))

    def changes(node) -> bool:
        hits = released_hits(init, steps, stop, node)
        return any(not torch.equal(a, b) for (_, a), (_, b) in zip(hits, base, strict=True))

    needed = {node for node in tasks if changes(node)}
    assert {node for node, (rank, _) in ranks.items() if rank > 0} == needed
    assert all(rank == -1 for node, (rank, _) in ranks.items() if node not in needed)
    assert plan.returned is not None
    # depth + the chain after it: at most the hit's round, which the critical tasks meet
    assert max(rnd + rank - 1 for rank, rnd in ranks.values() if rank > 0) == plan.returned.round


def test_without_a_core_index_stop_every_task_ranks_alike():
    x0, _, _ = toy(20, dim=4)
    plan = ChordsPlan(x0=x0, steps=20, init_sequence=[0, 4, 8])
    assert {plan.rank(task) for task in plan.ready()} == {0}
    assert plan.goal_graph(None) is None


def test_the_goal_graph_is_what_the_tasks_read():
    """``goal_graph``: every task the returned hit needs (the ranked ones, which the test above
    checks by perturbation), each with the tasks whose results its latent is made from: no
    task is ready before all of its parents have completed."""
    x0, f, solver = toy(50, dim=4)
    plan = ChordsPlan(x0=x0, steps=50, init_sequence=K8, stop=CoreIndex(1))
    graph = plan.goal_graph(CoreIndex(1))
    assert graph is not None
    completed: set[tuple[int, int]] = set()
    ranked = set()
    while not plan.done:
        for task in plan.ready():
            node = (task.core, task.step)
            if plan.rank(task) > 0:
                ranked.add(node)
            if node in graph:
                assert set(graph[node]) <= completed, node
            completed.add(node)
            out = f(task.latent, task.step)
            plan.complete(task.id, solve_targets(solver, task.latent, out, task.step, task.targets))
    assert set(graph) == ranked
    assert all(set(parents) <= set(graph) for parents in graph.values())
