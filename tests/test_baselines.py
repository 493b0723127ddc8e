"""ParaDIGMS and SRDS plans on the toy ODE: BASELINES-SPEC section 5's checks, plus the request
plumbing that selects them."""

from __future__ import annotations

import math

import pytest
import torch

from chords_mq.algorithms import ChordsPlan, Residual, SequentialPlan
from chords_mq.algorithms.paradigms import ParadigmsPlan, step_variance
from chords_mq.algorithms.srds import (
    SrdsPlan,
    srds_blocks,
    srds_init_sequence,
    srds_schedule,
)
from chords_mq.errors import InvalidPlanConfig
from chords_mq.local import ToyODE, simulate
from chords_mq.request import InvalidRequest, RequestSpec
from chords_mq.solvers import flow_match_euler, grid_euler, unit_euler


def euler_grid(steps: int):
    return grid_euler([1 - j / steps for j in range(steps + 1)])


def sequential(toy: ToyODE, steps: int, solver=None) -> torch.Tensor:
    plan = SequentialPlan(toy.x0, steps)
    return simulate(plan, toy.velocity, solver or unit_euler).returned.latent


def paradigms(toy: ToyODE, steps: int, window: int, tolerance: float, solver) -> ParadigmsPlan:
    """ParaDIGMS with the tolerance scale of the solver its tasks are evaluated with."""
    return ParadigmsPlan(toy.x0, steps, window, tolerance, step_variance(solver, steps))


# ---------------------------------------------------------------------------- ParaDIGMS


@pytest.mark.parametrize("window", [1, 4, 7])
def test_paradigms_with_zero_tolerance_is_sequential(window: int) -> None:
    steps = 30
    toy = ToyODE(steps)
    solver = euler_grid(steps)
    plan = paradigms(toy, steps, window, 0.0, solver)
    result = simulate(plan, toy.velocity, solver)
    torch.testing.assert_close(result.returned.latent, sequential(toy, steps, solver))
    if window == 1:
        assert plan.rounds == steps
        assert result.evaluations == steps
    assert result.returned.round == plan.rounds == len(plan.windows)


def test_paradigms_window_rules() -> None:
    steps, window = 50, 4
    toy = ToyODE(steps)
    plan = paradigms(toy, steps, window, 0.1, euler_grid(steps))
    result = simulate(plan, toy.velocity, euler_grid(steps))
    first = plan.windows[0]
    assert (first.begin, first.end, first.slide) == (0, window, 1)  # compared against noise
    assert result.evaluations == sum(w.end - w.begin for w in plan.windows)
    assert all(1 <= w.slide <= window and w.end - w.begin <= window for w in plan.windows)
    for before, after in zip(plan.windows, plan.windows[1:], strict=False):
        assert after.begin == before.begin + before.slide
    assert math.ceil(steps / window) <= plan.rounds < steps
    # every round is one synchronous wave of at most W tasks
    assert [len(r) for r in result.rounds] == [w.end - w.begin for w in plan.windows]
    error = (result.returned.latent - sequential(toy, steps, euler_grid(steps))).abs().max()
    assert 0 < float(error) < 1e-2


def test_paradigms_result_does_not_depend_on_completion_order() -> None:
    steps = 40
    toy = ToyODE(steps)
    runs = [
        simulate(
            paradigms(toy, steps, 5, 0.05, euler_grid(steps)),
            toy.velocity,
            euler_grid(steps),
            seed=s,
        )
        for s in (None, 1, 2)
    ]
    for run in runs[1:]:
        assert torch.equal(run.returned.latent, runs[0].returned.latent)
        assert run.returned.round == runs[0].returned.round


def test_paradigms_looser_tolerance_takes_fewer_rounds() -> None:
    steps = 50
    toy = ToyODE(steps)
    rounds = []
    for tolerance in (0.0, 0.01, 0.5):
        plan = paradigms(toy, steps, 6, tolerance, euler_grid(steps))
        simulate(plan, toy.velocity, euler_grid(steps))
        rounds.append(plan.rounds)
    assert rounds[0] > rounds[1] > rounds[2]


def test_flow_matching_variance_is_the_squared_step() -> None:
    sigmas = [1.0, 0.75, 0.5, 0.2, 0.0]
    assert step_variance(flow_match_euler(sigmas), 4) == pytest.approx([0.0625, 0.0625, 0.09, 0.04])


def test_paradigms_rejects_bad_config() -> None:
    x0 = torch.zeros(4)
    with pytest.raises(InvalidPlanConfig):
        ParadigmsPlan(x0, 10, 0)
    with pytest.raises(InvalidPlanConfig):
        ParadigmsPlan(x0, 10, 3, tolerance=-1)
    with pytest.raises(InvalidPlanConfig):
        ParadigmsPlan(x0, 10, 3, variance=[1.0] * 9)


# ---------------------------------------------------------------------------------- SRDS


def test_blocks_are_floor_sqrt_and_even() -> None:
    assert srds_blocks(49) == [0, 7, 14, 21, 28, 35, 42, 49]
    assert srds_blocks(50) == [0, 7, 14, 21, 28, 35, 42, 50]
    assert srds_blocks(10) == [0, 3, 6, 10]
    assert srds_init_sequence(4, 50) == [0, 7, 14, 21]
    with pytest.raises(InvalidPlanConfig):
        srds_init_sequence(9, 50)  # 8 * 7 = 56 >= 50


def test_srds_with_p_equal_b_is_sequential_exactly() -> None:
    for steps in (49, 50):
        toy = ToyODE(steps)
        plan = SrdsPlan(toy.x0, steps)
        result = simulate(plan, toy.velocity, euler_grid(steps))
        assert result.returned.core == plan.blocks == 7
        assert torch.equal(result.returned.latent, sequential(toy, steps, euler_grid(steps)))


@pytest.mark.parametrize("blocks", [5, 7])
def test_pipelined_round_count_closed_form(blocks: int) -> None:
    steps = blocks * blocks
    toy = ToyODE(steps)
    plan = SrdsPlan(toy.x0, steps)
    result = simulate(plan, toy.velocity, euler_grid(steps))
    for hit in result.hits[1:]:
        p = hit.core
        assert hit.round == (p + 1) * blocks - p
    # the synchronous driver's rounds are the tasks' rounds
    assert len(result.rounds) == steps


def test_srds_iterates_converge_block_by_block() -> None:
    """x_B^p improves with p, and the hits keep the same values whatever the completion order."""
    steps = 49
    toy = ToyODE(steps)
    ref = sequential(toy, steps, euler_grid(steps))
    ordered = simulate(SrdsPlan(toy.x0, steps), toy.velocity, euler_grid(steps))
    shuffled = simulate(SrdsPlan(toy.x0, steps), toy.velocity, euler_grid(steps), seed=5)
    errors = [float((h.latent - ref).abs().max()) for h in ordered.hits]
    assert errors[-1] == 0.0 and errors[0] > errors[2] > errors[4]
    assert [h.core for h in ordered.hits] == list(range(8))
    for a, b in zip(ordered.hits, shuffled.hits, strict=True):
        assert torch.equal(a.latent, b.latent) and a.round == b.round


@pytest.mark.parametrize("seed", [None, 3, 11])
def test_srds_holds_o_of_b_latents(seed: int | None) -> None:
    """Each F and G value is dropped once its last user exists: at most 2B are held at a time
    (the full iteration table would be about B^2 / 2 boundary values plus their F and G), and
    the result is still sequential sampling bit for bit."""
    steps = 100
    toy = ToyODE(steps)
    plan = SrdsPlan(toy.x0, steps)
    peak = simulate(plan, toy.velocity, euler_grid(steps), seed=seed).peak_latents
    # its F and G values, plus the boundary values its ready tasks start from
    assert plan.blocks == 10 and 0 < peak <= 2 * plan.blocks + plan.blocks
    assert plan.retained_latents() == 0
    assert plan.returned is not None
    assert torch.equal(plan.returned.latent, sequential(toy, steps, euler_grid(steps)))


def test_srds_iteration_cap_and_residual_stop() -> None:
    steps = 49
    toy = ToyODE(steps)
    capped = simulate(SrdsPlan(toy.x0, steps, iterations=2), toy.velocity, euler_grid(steps))
    assert capped.returned.core == 2 and capped.returned.round == 3 * 7 - 2
    stopped = simulate(
        SrdsPlan(toy.x0, steps, stop=Residual(1e-4)), toy.velocity, euler_grid(steps)
    )
    hits = stopped.hits
    assert stopped.returned.core in range(1, 7)  # stopped before the exact iterate B = 7
    last = torch.linalg.vector_norm(hits[-1].latent - hits[-2].latent) / hits[-1].latent.numel()
    assert float(last) < 1e-4


def test_chords_preset_equals_srds_iterates() -> None:
    """BASELINES-SPEC 3.3: core k of CHORDS on [0, B, 2B, ...] is the iterate x_B^{B-k+1}."""
    steps, blocks = 49, 7
    toy = ToyODE(steps)
    solver = euler_grid(steps)
    srds = simulate(SrdsPlan(toy.x0, steps), toy.velocity, solver)
    chords = simulate(
        ChordsPlan(toy.x0, steps, srds_init_sequence(blocks, steps)), toy.velocity, solver
    )
    cores = [h for h in chords.hits if h.core > 0]
    assert len(cores) == blocks
    for hit in cores:
        iterate = srds.hits[blocks - hit.core + 1]
        assert hit.round == iterate.round
        torch.testing.assert_close(hit.latent, iterate.latent, rtol=0, atol=1e-12)


def test_worker_limited_schedule() -> None:
    bounds = srds_blocks(50)
    unlimited = srds_schedule(bounds, 7, None)[1]
    assert [unlimited[p] for p in range(1, 8)] == [14, 20, 26, 32, 38, 44, 50]
    assert srds_schedule(bounds, 1, 4)[1][1] == 17  # BASELINES-SPEC 3.2's K=4, P=1
    rounds, hits = srds_schedule(bounds, 3, 4)
    per_round: dict[int, int] = {}
    for r in rounds.values():
        per_round[r] = per_round.get(r, 0) + 1
    assert max(per_round.values()) == 4
    # never faster than the work bound (every evaluation of the graph on 4 workers), nor than
    # unlimited workers
    assert hits[3] >= max(math.ceil(len(rounds) / 4), unlimited[3])
    # the plan runs its tasks in exactly these rounds
    toy = ToyODE(50)
    plan = SrdsPlan(toy.x0, 50, iterations=3, workers=4)
    result = simulate(plan, toy.velocity, euler_grid(50))
    assert [h.round for h in result.hits] == [hits[p] for p in range(4)]
    assert all(len(wave) <= 4 for wave in result.rounds)


# ------------------------------------------------------------------------------- requests


def test_request_selects_the_baselines() -> None:
    x0 = torch.zeros(1, 1, 8, 8)
    solver = euler_grid(50)
    spec = RequestSpec("digits", method="paradigms", cores=6, tolerance=0.2)
    plan = spec.build_plan(x0, solver)
    assert isinstance(plan, ParadigmsPlan) and plan.window == 6 and plan.tolerance == 0.2
    assert spec.resolved_cores() == 6 and spec.expected_hit_rounds() == []
    srds = RequestSpec("digits", method="srds", cores=4)
    assert srds.resolved_init_sequence() == [0, 7, 14, 21]
    assert srds.resolved_stop() == "residual-cores:4e-4"
    assert isinstance(srds.build_plan(x0, solver), ChordsPlan)
    parareal = RequestSpec("digits", method="srds-parareal", cores=8, iterations=3)
    assert isinstance(parareal.build_plan(x0, solver), SrdsPlan)
    assert parareal.expected_hit_rounds() == [(0, 7), (1, 14), (2, 20), (3, 26)]
    again = RequestSpec.from_dict(parareal.to_dict())
    assert again == parareal


@pytest.mark.parametrize(
    "fields",
    [
        {"method": "chords", "tolerance": 0.1},
        {"method": "paradigms", "tolerance": -1.0},
        {"method": "paradigms", "tolerance": float("nan")},
        {"method": "paradigms", "stop": "core-index:1"},
        {"method": "paradigms", "init_sequence": (0, 5)},
        {"method": "srds", "init_sequence": (0, 5)},
        {"method": "srds", "cores": 9},
        {"method": "srds-parareal", "iterations": 8},
        {"method": "srds-parareal", "iterations": 0},
        {"method": "srds", "iterations": 2},
        {"method": "srds-parareal", "steps": 1001},
    ],
)
def test_bad_baseline_requests_are_refused(fields: dict) -> None:
    with pytest.raises(InvalidRequest):
        RequestSpec("digits", **{"steps": 50, **fields})
