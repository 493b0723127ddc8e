"""ParaDIGMS: our plan against diffusers' own ``StableDiffusionParadigmsPipeline``.

Both run the tiny offline Stable Diffusion (CFG on, N = 20 DDIM steps) from the same initial
latents. ``ParadigmsPlan`` is driven by ``simulate`` with a velocity that makes one CFG UNet
call (batch [uncond, cond]) per step; the pipeline makes one batched UNet call per round for the
whole window. The rounds, and every window ``[begin, end)``, must be identical: the pipeline's
windows are read off the timesteps passed to its UNet.

The outputs are only close, not equal: the UNet rounds differently in the low bits for a batch
of 2 * W window positions than for a batch of 2, and so do our solver's DDIM step against
``batch_step_no_noise`` and the two cumsums. The tolerances are far from any decision boundary
(the test checks that 0.9x and 1.1x give the same windows), so these differences cannot change
the windows.

The scheduler uses ``set_alpha_to_one=True``: ``DDIMParallelScheduler.batch_step_no_noise``
hard-codes ``alpha_prev = 1`` past the last timestep, while ``step`` (and our solver) use
``final_alpha_cumprod`` (``alphas_cumprod[0]`` with the tiny pipeline's ``False``); with
``False`` the outputs differ by the last step (~0.05 on latents of magnitude ~45), but the
windows still match, which the last test checks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from diffusers import DDIMParallelScheduler, StableDiffusionParadigmsPipeline

from chords_mq.algorithms import SequentialPlan
from chords_mq.algorithms.paradigms import ParadigmsPlan, step_variance
from chords_mq.local import simulate
from chords_mq.solvers import solver_for_scheduler
from tests import tiny_pipelines as tiny

STEPS = 20
GUIDANCE = 5.0
PROMPT = "a photo of a cat"
NEGATIVE = "blurry"
# The windows stay the same for tolerances in [0.045, 0.110) and [0.70, 1.08) with W = 4, and in
# [0.045, 0.121) and [0.55, 1.08) with W = 3 (seed 1 latents).
TOLERANCES = (0.07, 0.85)
ROUNDS = {(4, 0.07): 12, (4, 0.85): 9, (3, 0.07): 13, (3, 0.85): 11}  # what diffusers gives
ATOL = 1e-4  # observed max abs difference ~3e-5, on latents of magnitude ~45
RTOL = 1e-5

Windows = list[tuple[int, int]]


def _paradigms_pipeline(set_alpha_to_one: bool) -> StableDiffusionParadigmsPipeline:
    sd = tiny.build_tiny_sd()
    names = ("vae", "text_encoder", "tokenizer", "unet", "safety_checker", "feature_extractor")
    pipe = StableDiffusionParadigmsPipeline(
        **{name: getattr(sd, name) for name in names},
        scheduler=DDIMParallelScheduler.from_config(
            sd.scheduler.config, set_alpha_to_one=set_alpha_to_one
        ),
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    # rounds with more than 3 positions go through wrapped_unet: the hook must see them too
    assert pipe.wrapped_unet is pipe.unet
    return pipe


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionParadigmsPipeline:
    return _paradigms_pipeline(set_alpha_to_one=True)


@pytest.fixture(scope="module")
def latents(pipe: StableDiffusionParadigmsPipeline) -> torch.Tensor:
    size = pipe.unet.config.sample_size  # default height = width = sample_size * vae factor
    channels = pipe.unet.config.in_channels
    return torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(1))


class CfgVelocity:
    """The CFG noise prediction at step ``step``, as the pipeline combines it; memoized on the
    exact input (the UNet is deterministic), so reruns that retrace the same windows are free."""

    def __init__(self, pipe: StableDiffusionParadigmsPipeline) -> None:
        cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE)
        self.embeddings = torch.cat([uncond, cond])
        self.pipe = pipe
        self.cache: dict[tuple[int, bytes], torch.Tensor] = {}

    def __call__(self, x: torch.Tensor, step: int) -> torch.Tensor:
        key = (step, x.contiguous().numpy().tobytes())
        if key not in self.cache:
            scheduler, unet = self.pipe.scheduler, self.pipe.unet
            t = scheduler.timesteps[step]
            model_input = scheduler.scale_model_input(torch.cat([x, x]), t)
            with torch.no_grad():
                out = unet(model_input, t, encoder_hidden_states=self.embeddings, return_dict=False)
            noise_uncond, noise_cond = out[0].chunk(2)
            self.cache[key] = noise_uncond + GUIDANCE * (noise_cond - noise_uncond)
        return self.cache[key].clone()


@pytest.fixture(scope="module")
def velocity(pipe: StableDiffusionParadigmsPipeline) -> CfgVelocity:
    return CfgVelocity(pipe)


@contextmanager
def _unet_windows(pipe: StableDiffusionParadigmsPipeline) -> Iterator[Windows]:
    """Record ``(begin, end)`` step indices of every UNet call made inside the block."""
    windows: Windows = []

    def hook(_: torch.nn.Module, args: tuple[Any, ...], __: Any) -> None:
        timesteps = [int(t) for t in args[1].reshape(-1)[::2]]  # [uncond, cond] per position
        grid = [int(t) for t in pipe.scheduler.timesteps]
        steps = [grid.index(t) for t in timesteps]
        assert steps == list(range(steps[0], steps[0] + len(steps))), steps
        windows.append((steps[0], steps[-1] + 1))

    handle = pipe.unet.register_forward_hook(hook)
    try:
        yield windows
    finally:
        handle.remove()


def _diffusers(
    pipe: StableDiffusionParadigmsPipeline, latents: torch.Tensor, window: int, tolerance: float
) -> tuple[torch.Tensor, Windows]:
    with _unet_windows(pipe) as windows:
        out = pipe(
            PROMPT,
            negative_prompt=NEGATIVE,
            num_inference_steps=STEPS,
            parallel=window,
            tolerance=tolerance,
            guidance_scale=GUIDANCE,
            latents=latents.clone(),
            output_type="latent",
        ).images
    return out, windows


def _ours(
    velocity: CfgVelocity, latents: torch.Tensor, window: int, tolerance: float
) -> tuple[torch.Tensor, Windows, int]:
    velocity.pipe.scheduler.set_timesteps(STEPS)
    solver = solver_for_scheduler(velocity.pipe.scheduler)
    plan = ParadigmsPlan(latents.clone(), STEPS, window, tolerance, step_variance(solver, STEPS))
    out = simulate(plan, velocity, solver).returned.latent
    return out, [(w.begin, w.end) for w in plan.windows], plan.rounds


@pytest.mark.parametrize("window", [4, 3])
def test_rounds_windows_and_output_match_diffusers(
    pipe: StableDiffusionParadigmsPipeline,
    velocity: CfgVelocity,
    latents: torch.Tensor,
    window: int,
) -> None:
    rounds = []
    for tolerance in TOLERANCES:
        expected, their_windows = _diffusers(pipe, latents, window, tolerance)
        out, our_windows, our_rounds = _ours(velocity, latents, window, tolerance)
        assert our_rounds == len(their_windows) == ROUNDS[window, tolerance]
        assert our_windows == their_windows
        torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
        # far from a decision boundary: a nearby tolerance gives the same windows
        for nearby in (0.9 * tolerance, 1.1 * tolerance):
            assert _ours(velocity, latents, window, nearby)[1] == our_windows, nearby
        rounds.append(our_rounds)
    assert len(set(rounds)) == len(TOLERANCES), rounds  # the tolerance matters
    assert max(rounds) < STEPS and min(rounds) > 1


def test_zero_tolerance_is_sequential(velocity: CfgVelocity, latents: torch.Tensor) -> None:
    out, _, rounds = _ours(velocity, latents, 4, 0.0)
    solver = solver_for_scheduler(velocity.pipe.scheduler)
    sequential = simulate(SequentialPlan(latents.clone(), STEPS), velocity, solver)
    assert rounds == STEPS
    # buf[b] + cumsum(deltas) rounds differently from chaining the steps
    torch.testing.assert_close(out, sequential.returned.latent, atol=ATOL, rtol=RTOL)


def test_windows_match_with_final_alpha_cumprod(latents: torch.Tensor) -> None:
    """The tiny pipeline's own config (``set_alpha_to_one=False``): the last step of
    ``batch_step_no_noise`` differs from ``step``, but only buf[N] depends on it, and the test
    of buf[N] cannot change a slide (the last window ends there), so the windows agree."""
    pipe = _paradigms_pipeline(set_alpha_to_one=False)
    velocity = CfgVelocity(pipe)
    for tolerance in TOLERANCES:
        _, their_windows = _diffusers(pipe, latents, 4, tolerance)
        _, our_windows, _ = _ours(velocity, latents, 4, tolerance)
        assert our_windows == their_windows
