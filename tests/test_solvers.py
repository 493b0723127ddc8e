"""Solvers against diffusers' own scheduler steps: bitwise, in float32 and bfloat16."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    CogVideoXDDIMScheduler,
    DDIMParallelScheduler,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from chords_mq.errors import InvalidPlanConfig
from chords_mq.solvers import (
    DDIM,
    DDIMCogVideoX,
    FlowMatchEuler,
    flow_match_euler,
    grid_euler,
    solve_targets,
    solver_for_scheduler,
    unit_euler,
)

DTYPES = [torch.float32, torch.bfloat16]


def fake_model(x: torch.Tensor, i: int) -> torch.Tensor:
    """A deterministic stand-in for a network, in the latent's dtype."""
    return (torch.sin(3.0 * x.float() + i) - 0.2 * x.float()).to(x.dtype)


def start_latent(dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(dtype)


def assert_matches_scheduler_steps(scheduler, steps: int, dtype: torch.dtype) -> None:
    """Chain the scheduler's own step and our S(x, out, i, i+1) side by side: equal bits."""
    solver = solver_for_scheduler(scheduler)
    x = start_latent(dtype)
    for i, t in enumerate(scheduler.timesteps):
        out = fake_model(x, i)
        expected = scheduler.step(out, t, x, return_dict=False)[0]
        got = solver(x, out, i, i + 1)
        assert got.dtype == expected.dtype == dtype
        assert torch.equal(got, expected), f"step {i}: max diff {(got - expected).abs().max()}"
        x = expected
    assert len(scheduler.timesteps) == steps


def test_unit_euler_is_x_plus_gap_times_out():
    x, out = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0])
    assert torch.equal(unit_euler(x, out, 3, 7), torch.tensor([3.0, -2.0]))


def test_grid_euler_uses_the_grid_difference():
    solver = grid_euler([0.0, 0.1, 0.4, 1.0])
    x, out = torch.tensor([1.0], dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64)
    assert torch.equal(
        solver(x, out, 1, 3), torch.tensor([1.0 + (1.0 - 0.1) * 2.0], dtype=torch.float64)
    )
    with pytest.raises(InvalidPlanConfig):
        grid_euler([0.0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", [{}, {"shift": 3.0}, {"use_dynamic_shifting": True}])
def test_flow_match_euler_bitwise_equals_scheduler_step(dtype, config):
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    steps = 12
    if config.get("use_dynamic_shifting"):
        scheduler.set_timesteps(steps, mu=0.8)
    else:
        scheduler.set_timesteps(steps)
    assert isinstance(solver_for_scheduler(scheduler), FlowMatchEuler)
    assert_matches_scheduler_steps(scheduler, steps, dtype)


def test_flow_match_euler_leaves_its_operands_intact():
    """The sum goes into the product's own buffer: x (a held result) and out (the forward's)
    keep their bits, and the result is a tensor of its own."""
    solver = flow_match_euler(torch.linspace(1.0, 0.0, 11))
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x, out = start_latent(dtype), start_latent(dtype).flip(0)
        x_before, out_before = x.clone(), out.clone()
        got = solver(x, out, 2, 7)
        assert torch.equal(x, x_before) and torch.equal(out, out_before)
        assert got.data_ptr() not in (x.data_ptr(), out.data_ptr()) and got.dtype == dtype


def test_flow_match_euler_into_out_is_the_same_bits_in_outs_memory():
    """``into_out`` (the forward's output, which nobody reads again): the solver's very bits,
    in ``out``'s memory, ``x`` intact; where it may not (another dtype, ``out`` sharing ``x``'s
    memory, not dense) it is the plain call, ``out`` intact. ``solve_targets`` uses it for the
    last target only, and only when told the output is spare."""
    solver = flow_match_euler(torch.linspace(1.0, 0.0, 11))
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        x, out = start_latent(dtype), start_latent(dtype).flip(0).contiguous()
        want, x_before, out_before = solver(x, out, 2, 7), x.clone(), out.clone()
        got = solver.into_out(x, out, 2, 7)
        assert torch.equal(got, want) and torch.equal(x, x_before)
        assert (got.data_ptr() == out.data_ptr()) == (dtype == torch.float32)
        if dtype != torch.float32:
            assert torch.equal(out, out_before)
    x = start_latent(torch.float32)
    apart = torch.randn(1, 4, 8, 8)
    for out in (x, x.view_as(x), x.clone().transpose(2, 3), apart.expand(2, 4, 8, 8)):
        before, out_before = x.clone(), out.clone()  # x itself, a view of it, not dense (two)
        assert torch.equal(solver.into_out(x, out, 2, 7), solver(before, out_before, 2, 7))
        assert torch.equal(x, before) and torch.equal(out, out_before)
    x, out = start_latent(torch.float32), start_latent(torch.float32).flip(0).contiguous()
    plain = solve_targets(solver, x, out.clone(), 2, [3, 5, 7])
    spare = solve_targets(solver, x, out, 2, [3, 5, 7], spare_out=True)
    assert all(torch.equal(plain[j], spare[j]) for j in (3, 5, 7))
    assert spare[7].data_ptr() == out.data_ptr() and spare[3].data_ptr() != out.data_ptr()


def test_flow_match_euler_jump_uses_sigma_difference():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    solver = solver_for_scheduler(scheduler)
    x, out = start_latent(torch.float32), start_latent(torch.float32).flip(0)
    sigmas = scheduler.sigmas
    expected = x + (sigmas[7] - sigmas[2]) * out
    assert torch.equal(solver(x, out, 2, 7), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, DDIMParallelScheduler])
@pytest.mark.parametrize(
    "config",
    [
        {"prediction_type": "epsilon", "clip_sample": False, "steps_offset": 1},
        {"prediction_type": "epsilon"},  # diffusers' default: clip_sample=True
        {
            "prediction_type": "v_prediction",
            "clip_sample": False,
            "timestep_spacing": "trailing",
            "rescale_betas_zero_snr": True,
        },
        {
            "prediction_type": "v_prediction",
            "clip_sample": False,
            "set_alpha_to_one": False,
            "beta_schedule": "scaled_linear",
        },
    ],
)
def test_ddim_bitwise_equals_scheduler_step(dtype, scheduler_class, config):
    scheduler = scheduler_class(**config)
    scheduler.set_timesteps(20)
    assert isinstance(solver_for_scheduler(scheduler), DDIM)
    assert_matches_scheduler_steps(scheduler, 20, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [10, 50])
def test_cogvideox_ddim_bitwise_equals_scheduler_step(dtype, prediction_type, steps):
    scheduler = CogVideoXDDIMScheduler(
        prediction_type=prediction_type,
        timestep_spacing="trailing",
        clip_sample=False,
        set_alpha_to_one=True,
        beta_schedule="scaled_linear",
        # zero terminal SNR (CogVideoX's setting) only makes sense with v-prediction
        rescale_betas_zero_snr=prediction_type == "v_prediction",
    )
    scheduler.set_timesteps(steps)
    assert isinstance(solver_for_scheduler(scheduler), DDIMCogVideoX)
    assert_matches_scheduler_steps(scheduler, steps, dtype)


def test_cogvideox_ddim_jump_follows_the_spec_formula():
    """tau' = tau - (1000 // N)(j - i); a = sqrt((1-a')/(1-a)); b = sqrt(a') - sqrt(a) a."""
    scheduler = CogVideoXDDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing")
    scheduler.set_timesteps(50)
    solver = solver_for_scheduler(scheduler)
    x = start_latent(torch.float64)
    v = fake_model(x, 0)
    alphas = scheduler.alphas_cumprod.double()
    for i, j in [(0, 5), (10, 49), (45, 50)]:
        tau = int(scheduler.timesteps[i])
        tau_next = tau - (1000 // 50) * (j - i)
        a_t = alphas[tau]
        a_next = alphas[tau_next] if tau_next >= 0 else torch.tensor(1.0, dtype=torch.float64)
        x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * v
        a = ((1 - a_next) / (1 - a_t)).sqrt()
        b = a_next.sqrt() - a_t.sqrt() * a
        assert torch.allclose(solver(x, v, i, j), a * x + b * x0, rtol=1e-6, atol=1e-6)


def test_unipc_with_flow_sigmas_uses_euler_on_its_grid():
    scheduler = UniPCMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0
    )
    scheduler.set_timesteps(10)
    solver = solver_for_scheduler(scheduler)
    assert isinstance(solver, FlowMatchEuler)
    assert torch.equal(solver.sigmas, scheduler.sigmas.float())


def test_unsupported_schedulers_are_rejected():
    with pytest.raises(InvalidPlanConfig):
        solver_for_scheduler(UniPCMultistepScheduler())
    with pytest.raises(InvalidPlanConfig, match="set_timesteps"):
        solver_for_scheduler(DDIMScheduler())
    with pytest.raises(InvalidPlanConfig, match="prediction_type"):
        scheduler = DDIMScheduler(prediction_type="sample")
        scheduler.set_timesteps(5)
        solver_for_scheduler(scheduler)


@pytest.mark.parametrize(
    "scheduler",
    [
        FlowMatchEulerDiscreteScheduler(shift=3.0),
        DDIMScheduler(clip_sample=True),
        CogVideoXDDIMScheduler(
            prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True
        ),  # a float64 alpha schedule
        DPMSolverMultistepScheduler(solver_order=1, use_karras_sigmas=True),
        UniPCMultistepScheduler(
            prediction_type="v_prediction", solver_order=1, disable_corrector=list(range(10_000))
        ),
    ],
    ids=lambda s: type(s).__name__,
)
def test_solver_spec_survives_the_wire_bit_for_bit(scheduler):
    from chords_mq.solvers import solver_from_spec, solver_spec
    from chords_mq.wire import PreparedMessage, SolverSpec, decode, encode

    scheduler.set_timesteps(12)
    solver = solver_for_scheduler(scheduler)
    fields, tensors = solver_spec(solver)
    frames = encode(PreparedMessage(solver=SolverSpec(fields, tensors), x0_digest="0" * 32))
    message = decode([bytes(f) for f in frames])
    assert isinstance(message, PreparedMessage)
    assert list(message.tensors) == [f"solver.{k}" for k in tensors]
    rebuilt = solver_from_spec(message.solver.fields, message.solver.tensors)
    x, out = start_latent(torch.float32), fake_model(start_latent(torch.float32), 0)
    for i in range(12):
        assert torch.equal(rebuilt(x, out, i, i + 1), solver(x, out, i, i + 1)), i
    assert torch.equal(rebuilt(x, out, 2, 9), solver(x, out, 2, 9))


@pytest.mark.parametrize(
    "name, config, expected",
    [
        ("EulerAncestralDiscreteScheduler", {}, "use the deterministic EulerDiscreteScheduler"),
        ("DDPMScheduler", {}, "use the deterministic DDIMScheduler"),
        ("CogVideoXDPMScheduler", {}, "its first-order member CogVideoXDDIMScheduler, which"),
        ("KDPM2AncestralDiscreteScheduler", {}, "use the deterministic KDPM2DiscreteScheduler"),
        (
            "DPMSolverMultistepScheduler",
            {"algorithm_type": "sde-dpmsolver++"},
            "is stochastic, which CHORDS cannot sample in parallel; use algorithm_type=dpmsolver++",
        ),
        ("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}, "set it to False"),
        ("PNDMScheduler", {}, "CHORDS runs its first-order member DDIMScheduler, which a"),
        (
            "DPMSolverMultistepScheduler",
            {},
            "first-order member DPMSolverMultistepScheduler with solver_order=1, which a",
        ),
        ("HeunDiscreteScheduler", {}, "DDIMScheduler.from_config(pipe.scheduler.config)"),
        (
            "UniPCMultistepScheduler",
            {},
            "first-order member UniPCMultistepScheduler with solver_order=1 and no corrector",
        ),
        (
            "UniPCMultistepScheduler",
            {"solver_order": 1},  # its corrector still runs: UniPC-1 needs the next output
            "first-order member UniPCMultistepScheduler with solver_order=1 and no corrector",
        ),
    ],
)
def test_a_scheduler_chords_cannot_use_says_what_to_use_instead(name, config, expected):
    import diffusers

    from chords_mq.solvers import scheduler_problem

    scheduler = getattr(diffusers, name)(**config)
    problem = scheduler_problem(scheduler)
    assert problem is not None and expected in problem, problem
    with pytest.raises(InvalidPlanConfig, match=r"stochastic|no CHORDS solver|multistep"):
        solver_for_scheduler(scheduler)


# -- DPM-Solver multistep ("DPM++ 2M") and UniPC: their first-order forms ---------------------

SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
NO_CORRECTOR = {"solver_order": 1, "disable_corrector": list(range(10_000))}


def dpm(**config):
    return DPMSolverMultistepScheduler(**{**SD_BETAS, "solver_order": 1, **config})


def unipc(**config):
    return UniPCMultistepScheduler(**{**SD_BETAS, **NO_CORRECTOR, **config})


FIRST_ORDER_FORMS = [
    pytest.param(dpm, {}, id="dpm++"),
    pytest.param(dpm, {"use_karras_sigmas": True}, id="dpm++-karras"),
    pytest.param(
        dpm,
        {"prediction_type": "v_prediction", "timestep_spacing": "trailing", "steps_offset": 1},
        id="dpm++-v",
    ),
    pytest.param(dpm, {"use_lu_lambdas": True, "final_sigmas_type": "sigma_min"}, id="dpm++-lu"),
    pytest.param(
        dpm,
        {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
        id="dpmsolver",
    ),
    pytest.param(
        dpm,
        {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0},
        id="dpm++-flow",
    ),
    pytest.param(unipc, {}, id="unipc"),
    pytest.param(unipc, {"use_karras_sigmas": True}, id="unipc-karras"),
    pytest.param(
        unipc,
        {"prediction_type": "v_prediction", "timestep_spacing": "trailing"},
        id="unipc-v",
    ),
    pytest.param(
        unipc,
        {"predict_x0": False, "solver_type": "bh1", "final_sigmas_type": "sigma_min"},
        id="unipc-noise-bh1",
    ),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make, config", FIRST_ORDER_FORMS)
def test_first_order_forms_bitwise_equal_scheduler_step(dtype, make, config):
    from chords_mq.solvers import DPMSolverFirstOrder, UniPCFirstOrder

    scheduler = make(**config)
    scheduler.set_timesteps(10)
    assert isinstance(solver_for_scheduler(scheduler), DPMSolverFirstOrder | UniPCFirstOrder)
    assert_matches_scheduler_steps(scheduler, 10, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make, config", FIRST_ORDER_FORMS[:3] + FIRST_ORDER_FORMS[6:8])
def test_a_first_order_jump_is_the_schedulers_step_from_sigma_i_to_sigma_j(dtype, make, config):
    """``S(x, out, i, j)`` is the scheduler's own step at step ``i`` with ``sigmas[j]`` as the
    next sigma: bitwise, up to the last step (final sigma 0)."""
    scheduler = make(**config)
    scheduler.set_timesteps(12)
    solver = solver_for_scheduler(scheduler)
    x = start_latent(dtype)
    sigmas = scheduler.sigmas.clone()
    for i, j in [(0, 3), (2, 9), (5, 12), (11, 12), (0, 12)]:
        out = fake_model(x, i)
        scheduler.sigmas = sigmas.clone()
        scheduler.sigmas[i + 1] = sigmas[j]
        scheduler._step_index = i
        scheduler.lower_order_nums = 0
        scheduler.last_sample = None  # (UniPC: no corrector at a first step)
        expected = scheduler.step(out, scheduler.timesteps[i], x, return_dict=False)[0]
        got = solver(x, out, i, j)
        assert got.dtype == expected.dtype and torch.equal(got, expected), (i, j)
    assert not torch.equal(solver(x, out, 0, 3), solver(x, out, 0, 4))


@pytest.mark.parametrize(
    "stock",
    [dpm(solver_order=2, use_karras_sigmas=True), UniPCMultistepScheduler(**SD_BETAS)],
    ids=lambda s: type(s).__name__,
)
def test_the_first_order_form_is_the_stock_schedulers_first_step(stock):
    """What the worker runs is the multistep scheduler's own first step, bit for bit (the
    steps after it are where DPM++ 2M and UniPC use their earlier outputs)."""
    from chords_mq.solvers import first_order_swap

    swap = first_order_swap(stock)
    assert swap is not None and swap[0] == type(stock).__name__
    stock.set_timesteps(10)
    first = type(stock).from_config(stock.config, **swap[1])
    first.set_timesteps(10)
    solver = solver_for_scheduler(first)
    x = start_latent(torch.float32)
    out = fake_model(x, 0)
    assert torch.equal(solver(x, out, 0, 1), stock.step(out, stock.timesteps[0], x)[0])


def test_the_worker_names_the_first_order_form_and_swaps_only_what_needs_it():
    from chords_mq.solvers import first_order_swap, scheduler_label, scheduler_problem

    assert scheduler_label(dpm()) == "DPMSolverMultistepScheduler with solver_order=1"
    assert scheduler_label(unipc()) == (
        "UniPCMultistepScheduler with solver_order=1 and no corrector"
    )
    assert scheduler_label(dpm(solver_order=2)) == "DPMSolverMultistepScheduler"
    for runs_as_it_is in [dpm(), unipc(), UniPCMultistepScheduler(use_flow_sigmas=True)]:
        assert first_order_swap(runs_as_it_is) is None
        assert scheduler_problem(runs_as_it_is) is None
    # a corrector left on at any step a request can reach is still swapped
    assert first_order_swap(unipc(disable_corrector=list(range(50)))) is not None


@pytest.mark.parametrize(
    "scheduler, expected",
    [
        (dpm(thresholding=True), "thresholding=True (dynamic thresholding, for pixel-space"),
        (dpm(solver_order=2, variance_type="learned_range"), "variance_type=learned_range"),
        (unipc(thresholding=True), "set thresholding=False"),
        (unipc(solver_type="bh1"), "bh1 and final_sigmas_type=zero ends in NaN"),
        (UniPCMultistepScheduler(predict_x0=False), "predict_x0=False and final_sigmas_type"),
    ],
    ids=["dpm-thresholding", "dpm-learned", "unipc-thresholding", "unipc-bh1", "unipc-noise"],
)
def test_what_the_first_order_forms_do_not_reproduce_is_refused_in_one_line(scheduler, expected):
    from chords_mq.solvers import scheduler_problem

    problem = scheduler_problem(scheduler)
    assert problem is not None and expected in problem and "\n" not in problem, problem
    with pytest.raises(InvalidPlanConfig):
        solver_for_scheduler(scheduler)


def test_a_stray_config_key_does_not_make_a_deterministic_scheduler_stochastic():
    from chords_mq.solvers import scheduler_problem

    # from_config carries keys the class does not use: DDIM saved from a DPM-SDE config
    scheduler = DDIMScheduler.from_config({**DDIMScheduler().config, "algorithm_type": "sde-x"})
    assert scheduler_problem(scheduler) is None
    assert scheduler_problem(UniPCMultistepScheduler(use_flow_sigmas=True)) is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "config",
    [
        {},  # SD 2.x style
        {"beta_schedule": "scaled_linear", "steps_offset": 1, "timestep_spacing": "leading"},
        {"prediction_type": "v_prediction", "timestep_spacing": "trailing"},
        {"use_karras_sigmas": True},
    ],
)
def test_euler_discrete_bitwise_equals_scheduler_step(dtype, config):
    from diffusers import EulerDiscreteScheduler

    from chords_mq.solvers import EulerDiscrete, solver_from_spec, solver_spec

    scheduler = EulerDiscreteScheduler(**config)
    scheduler.set_timesteps(10)
    assert_matches_scheduler_steps(scheduler, 10, dtype)
    # the input scaling is the scheduler's, bit for bit, and the spec survives the wire
    solver = solver_for_scheduler(scheduler)
    assert isinstance(solver, EulerDiscrete)
    x = start_latent(dtype)
    fresh = EulerDiscreteScheduler(**config)
    fresh.set_timesteps(10)
    for i, t in enumerate(fresh.timesteps[:3]):
        assert torch.equal(solver.scale_model_input(x, [i]), fresh.scale_model_input(x, t))
        fresh._step_index += 1
    again = solver_from_spec(*solver_spec(solver))
    out = fake_model(x, 0)
    assert torch.equal(again(x, out, 0, 4), solver(x, out, 0, 4))
