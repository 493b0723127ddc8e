"""Solvers ``S(x, out, i, j)``: move a latent from step ``i`` to step ``j`` with one model output.

A solver never calls the network, and it runs where the model output is: on the worker's device,
in the model's dtype (``solve_targets``), never in the broker. Each formula is one small class
or function. The diffusers-backed solvers repeat the exact operations (operand types, order,
casts) of the matching scheduler's ``step``, so ``S(x, out, i, i + 1)`` is bitwise equal to
``scheduler.step(out, timesteps[i], x)``; for a jump ``i -> j`` they use the same formula on the
same grid (CHORDS-SPEC section 1.1). Nothing here imports diffusers: schedulers are read duck-typed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from chords_mq.errors import InvalidPlanConfig

PredictionType = Literal["epsilon", "v_prediction"]


class Solver(Protocol):
    """``S(x, out, i, j)``: the latent at step ``j`` from latent ``x`` at step ``i``."""

    def __call__(self, x: torch.Tensor, out: torch.Tensor, i: int, j: int) -> torch.Tensor: ...


def solve_targets(
    solver: Solver,
    x: torch.Tensor,
    out: torch.Tensor,
    step: int,
    targets: Sequence[int],
    spare_out: bool = False,
) -> dict[int, torch.Tensor]:
    """A task's results: ``S(x, out, step, j)`` for every target ``j``, computed where ``x`` and
    ``out`` live. The worker and ``chords_mq.local`` both call this, so their bits agree.
    ``spare_out``: nobody reads ``out`` afterwards (the forward's own output), so the last
    target may be computed in its memory by a solver that can (``into_out``): the same bits,
    one latent less written."""
    results = {j: solver(x, out, step, j) for j in targets[:-1]}
    into_out = getattr(solver, "into_out", None) if spare_out else None
    last = targets[-1]
    results[last] = solver(x, out, step, last) if into_out is None else into_out(x, out, step, last)
    return results


def unit_euler(x: torch.Tensor, out: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """The CHORDS authors' toy default: one unit of time per step index, ``x + (j - i) * out``."""
    return x + (j - i) * out


@dataclass(frozen=True)
class GridEuler:
    """Euler on an explicit time grid: ``x + (grid[j] - grid[i]) * out``."""

    grid: tuple[float, ...]

    def __call__(self, x: torch.Tensor, out: torch.Tensor, i: int, j: int) -> torch.Tensor:
        return x + (self.grid[j] - self.grid[i]) * out


def grid_euler(grid: Sequence[float] | torch.Tensor) -> GridEuler:
    """Euler on the time grid ``grid[0..N]`` (any monotone sequence of N+1 numbers)."""
    values = tuple(float(g) for g in (grid.tolist() if isinstance(grid, torch.Tensor) else grid))
    if len(values) < 2:
        raise InvalidPlanConfig(f"a time grid needs at least 2 points, got {len(values)}")
    return GridEuler(values)


@dataclass(frozen=True, eq=False)
class FlowMatchEuler:
    """Flow-matching Euler, as ``FlowMatchEulerDiscreteScheduler.step`` computes it.

    The latent is upcast to float32, ``dt = sigma[j] - sigma[i]`` is a 0-dim float32 tensor
    (so ``dt * out`` runs in ``out``'s dtype, as in diffusers), the sum is cast back to ``out``'s
    dtype and then to the latent's dtype (what the Flux and SD3 pipelines do after each step).
    Also used on UniPC's flow sigmas for Wan2.1, as the CHORDS authors do. ``sigmas`` stays on
    the device the scheduler keeps it on (its ``set_timesteps(device=...)``), so ``dt`` is the
    same kind of operand as in ``scheduler.step``.
    """

    sigmas: torch.Tensor  # float32, shape (N + 1,), sigmas[N] == 0 for a full solve
    # True: cast back to the latent's dtype, as Flux and SD3 pipelines keep it. False: keep the
    # output's dtype exactly as scheduler.step returns it (Wan, HunyuanVideo keep float32
    # latents only until the first step of a bfloat16 model).
    keep_latent_dtype: bool = True

    def __call__(self, x: torch.Tensor, out: torch.Tensor, i: int, j: int) -> torch.Tensor:
        dt = self.sigmas[j] - self.sigmas[i]
        # (``.to`` of a tensor's own dtype returns it: skipping those calls changes no bits)
        x32 = x if x.dtype == torch.float32 else x.to(torch.float32)
        # x32 + dt * out, the sum into the product's own new buffer where the dtypes allow it:
        # addition commutes bit for bit, and one latent is written instead of two (0.45 ms less
        # per 16 MiB float32 step on a CPU: benchmarks/sequential_overhead.py)
        stepped = dt * out
        if stepped.dtype == x32.dtype:
            stepped.add_(x32)
        else:
            stepped = x32 + stepped
        if stepped.dtype != out.dtype:
            stepped = stepped.to(out.dtype)
        if self.keep_latent_dtype and stepped.dtype != x.dtype:
            return stepped.to(x.dtype)
        return stepped

    def into_out(self, x: torch.Tensor, out: torch.Tensor, i: int, j: int) -> torch.Tensor:
        """``self(x, out, i, j)`` computed in ``out``'s own memory, which the caller reads no
        more (``solve_targets``' ``spare_out``): ``out * dt`` then ``+ x``, the same roundings
        (multiplication and addition commute bit for bit), and no new latent written (0.4 ms
        less per 16 MiB float32 step on a CPU). Float32 only, ``out`` dense and apart from
        ``x``; otherwise ``self(x, out, i, j)``."""
        if not (
            x.dtype == out.dtype == torch.float32
            and x.device == out.device
            and out.is_contiguous()
            and not out.requires_grad
            and out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
        ):
            return self(x, out, i, j)
        return out.mul_(self.sigmas[j] - self.sigmas[i]).add_(x)


@dataclass(frozen=True, eq=False)
class EulerDiscrete:
    """k-diffusion Euler, as ``EulerDiscreteScheduler.step`` computes it (``s_churn`` 0: no
    noise), SDXL's and SD 2.x's shipped scheduler. The latent is upcast to float32; ``sigma`` and
    ``dt`` are 0-dim float32 tensors of the scheduler's own ``sigmas`` (it keeps them on the
    CPU), the prediction is turned into the derivative ``(x - x0) / sigma``, and the result is
    cast to the output's dtype, as in diffusers. For a jump ``i -> j``, ``dt`` is
    ``sigma[j] - sigma[i]``. The network sees its input divided by ``(sigma^2 + 1)^0.5``
    (``scale_model_input``, what the pipeline's ``scheduler.scale_model_input`` does)."""

    sigmas: torch.Tensor  # float32, shape (N + 1,): the scheduler's sigmas, 0 last
    prediction_type: str = "epsilon"  # epsilon, v_prediction, or sample (original_sample)

    def __call__(self, x: torch.Tensor, out: torch.Tensor, i: int, j: int) -> torch.Tensor:
        sample = x.to(torch.float32)
        sigma = self.sigmas[i]
        sigma_hat = sigma * (0.0 + 1)  # gamma = 0, in the scheduler's own expression
        if self.prediction_type == "epsilon":
            original = sample - sigma_hat * out
        elif self.prediction_type == "v_prediction":
            original = out * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
        else:
            original = out
        derivative = (sample - original) / sigma_hat
        dt = self.sigmas[j] - sigma_hat
        stepped = sample + derivative * dt
        return stepped.to(out.dtype)

    def scale_model_input(self, x: torch.Tensor, steps: Sequence[int]) -> torch.Tensor:
        """The network's input for rows at ``steps`` (one step: the pipeline's own 0-dim
        expression; several: each row by its own sigma, the same operations element by
        element)."""
        if len(set(steps)) == 1:
            sigma = self.sigmas[steps[0]]
            return x / ((sigma**2 + 1) ** 0.5)
        rows = x.shape[0] // len(steps)  # CFG doubles the rows: [negative..., positive...]
        sigma = self.sigmas[list(steps)].repeat(rows).reshape(-1, *([1] * (x.dim() - 1)))
        return x / ((sigma.to(x.device) ** 2 + 1) ** 0.5)


def euler_discrete(scheduler: Any) -> EulerDiscrete:
    """The Euler solver on a set-up ``EulerDiscreteScheduler``'s sigmas."""
    prediction = str(scheduler.config.prediction_type)
    if prediction not in ("epsilon", "v_prediction", "sample", "original_sample"):
        raise InvalidPlanConfig(f"EulerDiscreteScheduler: prediction_type {prediction!r}")
    sigmas = scheduler.sigmas
    if not isinstance(sigmas, torch.Tensor) or sigmas.dim() != 1 or sigmas.numel() < 2:
        raise InvalidPlanConfig("EulerDiscreteScheduler: set_timesteps has not run")
    return EulerDiscrete(sigmas.to(torch.float32), prediction)


def flow_match_euler(
    sigmas: Sequence[float] | torch.Tensor, keep_latent_dtype: bool = True
) -> FlowMatchEuler:
    """Flow-matching Euler on ``sigmas`` (a float32 tensor on its own device, as diffusers
    keeps them)."""
    grid = torch.as_tensor(sigmas, dtype=torch.float32).detach().reshape(-1)
    if grid.numel() < 2:
        raise InvalidPlanConfig(f"a sigma grid needs at least 2 points, got {grid.numel()}")
    return FlowMatchEuler(grid, keep_latent_dtype)


@dataclass(frozen=True, eq=False)
class _DDIMGrid:
    """What both DDIM forms share: the alpha schedule and the arithmetic target timestep."""

    alphas_cumprod: torch.Tensor  # shape (num_train_timesteps,), the scheduler's dtype
    final_alpha_cumprod: torch.Tensor  # 0-dim, the scheduler's dtype
    timesteps: tuple[int, ...]  # the N inference timesteps, timesteps[i] is step i's
    stride: int  # num_train_timesteps // N, as diffusers computes prev_timestep
    prediction_type: PredictionType

    def _alphas(self, i: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        # diffusers: prev_timestep = t - T // N; exact for consecutive steps, and the CHORDS
        # authors' arithmetic generalisation for jumps (CHORDS-SPEC section 5, item 16).
        t = self.timesteps[i]
        prev = t - self.stride * (j - i)
        alpha_t = self.alphas_cumprod[t]
        alpha_prev = self.alphas_cumprod[prev] if prev >= 0 else self.final_alpha_cumprod
        return alpha_t, alpha_prev

    def _pred_original(
        self, x: torch.Tensor, out: torch.Tensor, alpha_t: torch.Tensor
    ) -> torch.Tensor:
        beta_t = 1 - alpha_t
        if self.prediction_type == "epsilon":
            return (x - beta_t ** (0.5) * out) / alpha_t ** (0.5)
        return (alpha_t**0.5) * x - (beta_t**0.5) * out


@dataclass(frozen=True, eq=False)
class DDIM(_DDIMGrid):
    """DDIM with eta = 0 in ``DDIMScheduler.step``'s form: ``sqrt(a') x0 + sqrt(1 - a') eps``."""

    clip_sample_range: float | None = None

    def __call__(self, x: torch.Tensor, out: torch.Tensor, i: int, j: int) -> torch.Tensor:
        alpha_t, alpha_prev = self._alphas(i, j)
        x0 = self._pred_original(x, out, alpha_t)
        if self.prediction_type == "epsilon":
            eps = out
        else:
            eps = (alpha_t**0.5) * out + ((1 - alpha_t) ** 0.5) * x
        if self.clip_sample_range is not None:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
        # diffusers subtracts std_dev_t**2, which is exactly 0 for eta = 0.
        direction = (1 - alpha_prev) ** (0.5) * eps
        return (alpha_prev ** (0.5) * x0 + direction).to(x.dtype)


@dataclass(frozen=True, eq=False)
class DDIMCogVideoX(_DDIMGrid):
    """DDIM with eta = 0 in ``CogVideoXDDIMScheduler.step``'s form (CHORDS-SPEC section 1.1).

    ``a = sqrt((1 - a') / (1 - a))``, ``b = sqrt(a') - sqrt(a) * a``, ``S = a x + b x0``.
    """

    def __call__(self, x: torch.Tensor, out: torch.Tensor, i: int, j: int) -> torch.Tensor:
        alpha_t, alpha_prev = self._alphas(i, j)
        x0 = self._pred_original(x, out, alpha_t)
        a = ((1 - alpha_prev) / (1 - alpha_t)) ** 0.5
        b = alpha_prev**0.5 - alpha_t**0.5 * a
        return (a * x + b * x0).to(x.dtype)


def _ddim_fields(scheduler: Any) -> dict[str, Any]:
    config = scheduler.config
    if getattr(config, "thresholding", False):
        raise InvalidPlanConfig("DDIM with thresholding=True is not supported")
    prediction = config.prediction_type
    if prediction not in ("epsilon", "v_prediction"):
        raise InvalidPlanConfig(
            f"DDIM prediction_type {prediction!r} is not supported (epsilon or v_prediction)"
        )
    if scheduler.num_inference_steps is None:
        raise InvalidPlanConfig("call scheduler.set_timesteps(N) before building its solver")
    return {
        "alphas_cumprod": scheduler.alphas_cumprod,
        "final_alpha_cumprod": scheduler.final_alpha_cumprod,
        "timesteps": tuple(int(t) for t in scheduler.timesteps),
        "stride": config.num_train_timesteps // scheduler.num_inference_steps,
        "prediction_type": prediction,
    }


def _vp_alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``_sigma_to_alpha_sigma_t`` of the DPM-Solver and UniPC schedulers on VP sigmas."""
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    sigma_t = sigma * alpha_t
    return alpha_t, sigma_t


@dataclass(frozen=True, eq=False)
class DPMSolverFirstOrder:
    """DPM-Solver(++) of order 1, as ``DPMSolverMultistepScheduler.step`` computes it with
    ``solver_order=1`` (``algorithm_type`` dpmsolver++ or dpmsolver): the first-order member of
    "DPM++ 2M" and the update that scheduler runs at its own first step.

    ``convert_model_output`` runs on the latent as given (the data prediction for dpmsolver++,
    the noise for dpmsolver), the latent is then upcast to float32, the first-order update runs
    on 0-dim float32 scalars of the scheduler's own ``sigmas`` (it keeps them on the CPU), and
    the result is cast to the converted output's dtype, as in diffusers. For a jump
    ``i -> j`` the update uses ``sigmas[i]`` and ``sigmas[j]``; a final sigma 0 gives the data
    prediction itself (``exp(-inf) = 0``), as in diffusers."""

    sigmas: torch.Tensor  # float32, shape (N + 1,): the scheduler's sigmas
    prediction_type: str = "epsilon"  # epsilon, v_prediction, sample (or flow_prediction for ++)
    algorithm_type: str = "dpmsolver++"  # or dpmsolver (noise prediction)
    flow_sigmas: bool = False  # use_flow_sigmas: alpha = 1 - sigma

    def _alpha_sigma(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.flow_sigmas:
            return 1 - sigma, sigma
        return _vp_alpha_sigma(sigma)

    def _converted(self, x: torch.Tensor, out: torch.Tensor, i: int) -> torch.Tensor:
        prediction = self.prediction_type
        if prediction == "sample" and self.algorithm_type == "dpmsolver++":
            return out
        if prediction == "flow_prediction":  # dpmsolver++ only (checked when built)
            return x - self.sigmas[i] * out
        if prediction == "epsilon" and self.algorithm_type == "dpmsolver":
            return out
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[i])
        if self.algorithm_type == "dpmsolver++":
            if prediction == "epsilon":
                return (x - sigma_t * out) / alpha_t
            return alpha_t * x - sigma_t * out  # v_prediction
        if prediction == "sample":
            return (x - alpha_t * out) / sigma_t
        return alpha_t * out + sigma_t * x  # v_prediction

    def __call__(self, x: torch.Tensor, out: torch.Tensor, i: int, j: int) -> torch.Tensor:
        converted = self._converted(x, out, i)
        sample = x.to(torch.float32)
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[j])
        alpha_s, sigma_s = self._alpha_sigma(self.sigmas[i])
        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
        lambda_s = torch.log(alpha_s) - torch.log(sigma_s)
        h = lambda_t - lambda_s
        if self.algorithm_type == "dpmsolver++":
            x_t = (sigma_t / sigma_s) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * converted
        else:
            x_t = (alpha_t / alpha_s) * sample - (sigma_t * (torch.exp(h) - 1.0)) * converted
        return x_t.to(converted.dtype)


@dataclass(frozen=True, eq=False)
class UniPCFirstOrder:
    """UniPC's predictor of order 1 (UniP-1, B(h) form) with no corrector, as
    ``UniPCMultistepScheduler.step`` computes it with ``solver_order=1`` and the corrector
    disabled at every step (VP sigmas; UniPC on flow sigmas runs flow-matching Euler instead).
    It is the update UniPC runs at its own first step.

    ``convert_model_output`` runs on the latent as given; the predictor's scalars are the
    scheduler's own ``sigmas`` moved to the latent's device (as UniPC moves them), ``h`` from
    their log-SNRs, ``expm1`` for ``h phi_1`` and B(h) (bh1: ``hh``, bh2: ``expm1(hh)``), and the
    zero residual of order 1 is subtracted as UniPC subtracts it (``alpha_t * B_h * 0``); no
    float32 upcast, the result is cast to the latent's dtype. A jump ``i -> j`` uses
    ``sigmas[i]`` and ``sigmas[j]``."""

    sigmas: torch.Tensor  # float32, shape (N + 1,): the scheduler's sigmas
    prediction_type: str = "epsilon"  # epsilon, v_prediction, sample (or flow_prediction, x0)
    predict_x0: bool = True  # False: the noise-prediction form
    solver_type: str = "bh2"  # or bh1

    def _converted(self, x: torch.Tensor, out: torch.Tensor, i: int) -> torch.Tensor:
        sigma = self.sigmas[i]
        alpha_t, sigma_t = _vp_alpha_sigma(sigma)
        prediction = self.prediction_type
        if self.predict_x0:
            if prediction == "epsilon":
                return (x - sigma_t * out) / alpha_t
            if prediction == "sample":
                return out
            if prediction == "v_prediction":
                return alpha_t * x - sigma_t * out
            return x - sigma * out  # flow_prediction
        if prediction == "epsilon":
            return out
        if prediction == "sample":
            return (x - alpha_t * out) / sigma_t
        return alpha_t * out + sigma_t * x  # v_prediction

    def __call__(self, x: torch.Tensor, out: torch.Tensor, i: int, j: int) -> torch.Tensor:
        m0 = self._converted(x, out, i)
        device = x.device
        alpha_t, sigma_t = _vp_alpha_sigma(self.sigmas[j].to(device))
        alpha_s0, sigma_s0 = _vp_alpha_sigma(self.sigmas[i].to(device))
        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
        lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
        h = lambda_t - lambda_s0
        hh = -h if self.predict_x0 else h
        h_phi_1 = torch.expm1(hh)
        b_h = hh if self.solver_type == "bh1" else torch.expm1(hh)
        if self.predict_x0:
            x_t_ = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
            x_t = x_t_ - alpha_t * b_h * 0
        else:
            x_t_ = alpha_t / alpha_s0 * x - sigma_t * h_phi_1 * m0
            x_t = x_t_ - sigma_t * b_h * 0
        return x_t.to(x.dtype)


DPM_PREDICTIONS = {
    "dpmsolver++": ("epsilon", "v_prediction", "sample", "flow_prediction"),
    "dpmsolver": ("epsilon", "v_prediction", "sample"),
}


def _set_up_sigmas(scheduler: Any) -> torch.Tensor:
    sigmas = scheduler.sigmas
    if (
        scheduler.num_inference_steps is None
        or not isinstance(sigmas, torch.Tensor)
        or sigmas.dim() != 1
        or sigmas.numel() < 2
    ):
        raise InvalidPlanConfig(f"{type(scheduler).__name__}: set_timesteps has not run")
    return sigmas.to(torch.float32)


def dpm_solver_first_order(scheduler: Any) -> DPMSolverFirstOrder:
    """The DPM-Solver(++) first-order solver on a set-up ``DPMSolverMultistepScheduler``'s
    sigmas (``solver_order=1``; ``scheduler_problem`` has checked the rest)."""
    config = scheduler.config
    algorithm, prediction = str(config.algorithm_type), str(config.prediction_type)
    if prediction not in DPM_PREDICTIONS.get(algorithm, ()):
        raise InvalidPlanConfig(
            f"DPMSolverMultistepScheduler: prediction_type {prediction!r} with algorithm_type "
            f"{algorithm!r}"
        )
    flow = bool(getattr(config, "use_flow_sigmas", False))
    return DPMSolverFirstOrder(_set_up_sigmas(scheduler), prediction, algorithm, flow)


def unipc_first_order(scheduler: Any) -> UniPCFirstOrder:
    """UniP-1 on a set-up ``UniPCMultistepScheduler``'s sigmas (no flow sigmas, ``solver_order=1``,
    corrector off; ``scheduler_problem`` has checked them)."""
    config = scheduler.config
    predict_x0, prediction = bool(config.predict_x0), str(config.prediction_type)
    if prediction not in DPM_PREDICTIONS["dpmsolver++" if predict_x0 else "dpmsolver"]:
        raise InvalidPlanConfig(
            f"UniPCMultistepScheduler: prediction_type {prediction!r} with predict_x0={predict_x0}"
        )
    solver_type = str(config.solver_type)
    if solver_type not in ("bh1", "bh2"):
        raise InvalidPlanConfig(f"UniPCMultistepScheduler: solver_type {solver_type!r}")
    return UniPCFirstOrder(_set_up_sigmas(scheduler), prediction, predict_x0, solver_type)


# Schedulers that add fresh noise at every step: a step is not a function of the latent alone,
# so no core can start from a coarse guess of it. Each with the deterministic scheduler of the
# same family to use instead.
STOCHASTIC_SCHEDULERS = {
    "EulerAncestralDiscreteScheduler": "EulerDiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler": "KDPM2DiscreteScheduler",
    "DPMSolverSDEScheduler": "DPMSolverMultistepScheduler",
    "DDPMScheduler": "DDIMScheduler",
    "DDPMParallelScheduler": "DDIMParallelScheduler",
    "DDPMWuerstchenScheduler": "DDIMScheduler",
    "LCMScheduler": "DDIMScheduler (or the model's own deterministic sampler)",
    "TCDScheduler": "DDIMScheduler",
    "CMStochasticIterativeScheduler": "a deterministic scheduler",
    "ScoreSdeVeScheduler": "a deterministic scheduler",
}
# Multistep schedulers a worker replaces, at load, by the first-order member of their family
# (CHORDS needs one model output per step): name -> (that scheduler, config overrides). PNDM's
# update is DDIM's transfer function applied to a linear multistep combination of outputs; with
# one output it is DDIM itself (never clipping, as PNDM never does). CogVideoX's DPM scheduler
# (what the 5B folders ship) is a second-order SDE solver (DPM-Solver++(2M) with fresh noise at
# every step): the deterministic first-order member of that family is DDIM, in CogVideoX's own
# form, on the same config (v-prediction, zero terminal SNR, trailing timesteps).
# DPMSolverMultistepScheduler ("DPM++ 2M"): the same scheduler with solver_order=1, i.e. the
# update it runs at its own first step, on its own sigmas (karras, exponential, beta or lu
# lambdas, final_sigmas_type and timestep_spacing all come from its set_timesteps).
# UniPCMultistepScheduler without flow sigmas: UniPC itself with solver_order=1 and its corrector
# off at every step a request can reach (disable_corrector lists them all): UniP-1, the update
# UniPC runs at its own first step. The corrector (UniC) needs the model's output at the step's
# result, which CHORDS cannot give. UniP-1 equals DPM-Solver++(1) in exact arithmetic, but
# DPMSolverMultistepScheduler made from UniPC's config is not bitwise UniPC's first step (it
# upcasts to float32 and computes exp(-h) - 1 where UniPC computes expm1), and it cannot be made
# from every UniPC config (predict_x0=False with final_sigmas_type zero); UniPC itself keeps its
# own set_timesteps and arithmetic. UniPC with flow sigmas (Wan) runs flow-matching Euler on
# them instead (solver_for_scheduler), so it is not swapped.
MAX_STEPS = 10_000  # the most steps of a grid, and of a request (chords_mq.request)
FIRST_ORDER: dict[str, tuple[str, dict[str, Any]]] = {
    "PNDMScheduler": ("DDIMScheduler", {"clip_sample": False}),
    "CogVideoXDPMScheduler": ("CogVideoXDDIMScheduler", {}),
    "DPMSolverMultistepScheduler": ("DPMSolverMultistepScheduler", {"solver_order": 1}),
    "UniPCMultistepScheduler": (
        "UniPCMultistepScheduler",
        {"solver_order": 1, "disable_corrector": list(range(MAX_STEPS))},
    ),
}
# How the worker's log and STATUS name a multistep scheduler that runs its first-order form.
FIRST_ORDER_FORMS = {
    "DPMSolverMultistepScheduler": "DPMSolverMultistepScheduler with solver_order=1",
    "UniPCMultistepScheduler": "UniPCMultistepScheduler with solver_order=1 and no corrector",
}


def _is_first_order_form(name: str, config: Any) -> bool:
    """Whether a DPM-Solver multistep or (VP) UniPC scheduler already runs its first-order
    form: solver_order 1 and, for UniPC, the corrector off at every step."""
    if name not in FIRST_ORDER_FORMS or getattr(config, "solver_order", None) != 1:
        return False
    if name == "UniPCMultistepScheduler":
        disabled = getattr(config, "disable_corrector", None) or ()
        return set(range(MAX_STEPS)) <= set(disabled)
    return True


def first_order_swap(scheduler: Any) -> tuple[str, dict[str, Any]] | None:
    """The first-order member a worker swaps in for ``scheduler`` at load (``FIRST_ORDER``: its
    class name and config overrides), or None when it runs as it is."""
    name = type(scheduler).__name__
    config = getattr(scheduler, "config", None)
    swap = FIRST_ORDER.get(name)
    if swap is None or _is_first_order_form(name, config):
        return None
    if name == "UniPCMultistepScheduler" and getattr(config, "use_flow_sigmas", False):
        return None  # Euler on its sigmas
    return swap


def scheduler_label(scheduler: Any) -> str:
    """The scheduler as the worker names what it runs: its class, and ``solver_order=1`` (and
    the corrector) for a multistep class in its first-order form."""
    name = type(scheduler).__name__
    if _is_first_order_form(name, getattr(scheduler, "config", None)):
        return FIRST_ORDER_FORMS[name]
    return name


def _exponential_problem(name: str, config: Any) -> str | None:
    """What CHORDS does not reproduce of a DPM-Solver multistep or (VP) UniPC scheduler."""
    if getattr(config, "thresholding", False):
        return (
            f"{name} with thresholding=True (dynamic thresholding, for pixel-space models) is not "
            "supported; set thresholding=False"
        )
    variance = getattr(config, "variance_type", None)
    if variance is not None:
        return (
            f"{name} with variance_type={variance} (a network that also predicts its variance) "
            "is not supported"
        )
    if getattr(config, "solver_p", None) is not None:
        return f"{name} with solver_p (another scheduler as its predictor) is not supported"
    if name == "UniPCMultistepScheduler" and getattr(config, "final_sigmas_type", "") == "zero":
        if getattr(config, "solver_type", "") == "bh1":
            return (
                f"{name} with solver_type=bh1 and final_sigmas_type=zero ends in NaN (0 * inf at "
                "its last step, in diffusers too); use solver_type=bh2"
            )
        if not getattr(config, "predict_x0", True):
            return (
                f"{name} with predict_x0=False and final_sigmas_type=zero ends in NaN (0 * inf "
                "at its last step, in diffusers too); use predict_x0=True"
            )
    return None


# Schedulers whose network input is scaled per step (the solver's ``scale_model_input``).
SCALED_INPUT = frozenset({"EulerDiscreteScheduler"})
# What CHORDS solves today (``solver_for_scheduler``), for the refusal's "what would work".
SUPPORTED_SCHEDULERS = (
    "DDIMScheduler",
    "EulerDiscreteScheduler",
    "DDIMParallelScheduler",
    "CogVideoXDDIMScheduler",
    "DPMSolverMultistepScheduler (dpmsolver++ or dpmsolver; multistep runs solver_order=1)",
    "UniPCMultistepScheduler (multistep runs solver_order=1 with no corrector; with "
    "use_flow_sigmas, Euler on its sigmas)",
    "PNDMScheduler (runs DDIMScheduler)",
    "FlowMatchEulerDiscreteScheduler",
)


def scheduler_problem(scheduler: Any) -> str | None:
    """Why CHORDS cannot solve with ``scheduler`` (read from its class and config only, before
    any ``set_timesteps``), in words that say what to use instead; None if it can."""
    name = type(scheduler).__name__
    config = getattr(scheduler, "config", None)
    if name in STOCHASTIC_SCHEDULERS:
        return (
            f"{name} is stochastic (it adds new noise at every step), which CHORDS cannot "
            f"sample in parallel; use the deterministic {STOCHASTIC_SCHEDULERS[name]}"
        )
    algorithm = str(getattr(config, "algorithm_type", "")) if "DPMSolver" in name else ""
    if algorithm.startswith("sde-"):
        return (
            f"{name} with algorithm_type={algorithm} is stochastic, which CHORDS cannot sample "
            f"in parallel; use algorithm_type={algorithm.removeprefix('sde-')}"
        )
    if name == "FlowMatchEulerDiscreteScheduler":
        if getattr(config, "stochastic_sampling", False):
            return f"{name} with stochastic_sampling=True is stochastic; set it to False"
        return None
    if name == "UniPCMultistepScheduler" and getattr(config, "use_flow_sigmas", False):
        return None
    if name in ("DDIMScheduler", "DDIMParallelScheduler", "CogVideoXDDIMScheduler"):
        return None
    if name == "EulerDiscreteScheduler":
        return None
    if name in FIRST_ORDER_FORMS:
        unsupported = _exponential_problem(name, config)
        if unsupported is not None:
            return unsupported
    if first_order_swap(scheduler) is not None:
        target = FIRST_ORDER[name][0]
        return (
            f"{name} is a multistep scheduler; CHORDS runs its first-order member "
            f"{FIRST_ORDER_FORMS.get(target, target)}, which a worker swaps in when it loads"
        )
    if name in FIRST_ORDER_FORMS:
        return None
    return (
        f"no CHORDS solver for {name} yet (supported: {', '.join(SUPPORTED_SCHEDULERS)}); save "
        f"the pipeline with one of them, e.g. pipe.scheduler = "
        f"DDIMScheduler.from_config(pipe.scheduler.config), then pipe.save_pretrained(FOLDER)"
    )


def solver_for_scheduler(scheduler: Any) -> Solver:
    """The solver that reproduces ``scheduler.step`` of a diffusers scheduler (after set_timesteps).

    Supported: ``FlowMatchEulerDiscreteScheduler`` (ODE mode), ``UniPCMultistepScheduler`` with
    flow sigmas (Euler on its sigma grid, as CHORDS does for Wan2.1), ``DDIMScheduler`` and
    ``DDIMParallelScheduler`` (eta = 0), ``CogVideoXDDIMScheduler``,
    ``EulerDiscreteScheduler`` (``s_churn`` 0; the network's input scaled by the solver's
    ``scale_model_input``), and the first-order forms of ``DPMSolverMultistepScheduler``
    (``solver_order=1``) and of ``UniPCMultistepScheduler`` without flow sigmas
    (``solver_order=1``, corrector off). Any other raises ``InvalidPlanConfig`` with
    ``scheduler_problem``'s reason.
    """
    problem = scheduler_problem(scheduler)
    if problem is not None:
        raise InvalidPlanConfig(problem)
    name = type(scheduler).__name__
    config = scheduler.config
    if name == "FlowMatchEulerDiscreteScheduler" or (
        name == "UniPCMultistepScheduler" and getattr(config, "use_flow_sigmas", False)
    ):
        return flow_match_euler(scheduler.sigmas)
    if name == "DPMSolverMultistepScheduler":
        return dpm_solver_first_order(scheduler)
    if name == "UniPCMultistepScheduler":
        return unipc_first_order(scheduler)
    if name in ("DDIMScheduler", "DDIMParallelScheduler"):
        clip = float(config.clip_sample_range) if config.clip_sample else None
        return DDIM(**_ddim_fields(scheduler), clip_sample_range=clip)
    if name == "EulerDiscreteScheduler":
        return euler_discrete(scheduler)
    return DDIMCogVideoX(**_ddim_fields(scheduler))


def solver_spec(solver: Solver) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A plain description of ``solver`` (for the wire): fields, plus tensors sent as frames."""
    if solver is unit_euler:
        return {"kind": "unit_euler"}, {}
    if isinstance(solver, GridEuler):
        return {"kind": "grid_euler", "grid": list(solver.grid)}, {}
    if isinstance(solver, FlowMatchEuler):
        flow = {"kind": "flow_match_euler", "keep_latent_dtype": solver.keep_latent_dtype}
        return flow, {"sigmas": solver.sigmas.to("cpu")}
    if isinstance(solver, EulerDiscrete):
        euler = {"kind": "euler_discrete", "prediction_type": solver.prediction_type}
        return euler, {"sigmas": solver.sigmas.to("cpu")}
    if isinstance(solver, DPMSolverFirstOrder):
        dpm = {
            "kind": "dpm_solver_first_order",
            "prediction_type": solver.prediction_type,
            "algorithm_type": solver.algorithm_type,
            "flow_sigmas": solver.flow_sigmas,
        }
        return dpm, {"sigmas": solver.sigmas.to("cpu")}
    if isinstance(solver, UniPCFirstOrder):
        unipc = {
            "kind": "unipc_first_order",
            "prediction_type": solver.prediction_type,
            "predict_x0": solver.predict_x0,
            "solver_type": solver.solver_type,
        }
        return unipc, {"sigmas": solver.sigmas.to("cpu")}
    if isinstance(solver, _DDIMGrid):
        fields: dict[str, Any] = {
            "kind": "ddim_cogvideox" if isinstance(solver, DDIMCogVideoX) else "ddim",
            "timesteps": list(solver.timesteps),
            "stride": solver.stride,
            "prediction_type": solver.prediction_type,
        }
        if isinstance(solver, DDIM):
            fields["clip_sample_range"] = solver.clip_sample_range
        tensors = {
            "alphas_cumprod": solver.alphas_cumprod.to("cpu"),
            "final_alpha_cumprod": solver.final_alpha_cumprod.reshape(1).to("cpu"),
        }
        return fields, tensors
    raise InvalidPlanConfig(f"solver {solver!r} cannot be described for the wire")


def solver_from_spec(fields: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Solver:
    """Rebuild a solver from ``solver_spec`` output; bad specs raise InvalidPlanConfig."""
    kind = fields.get("kind")
    try:
        if kind == "unit_euler":
            return unit_euler
        if kind == "grid_euler":
            return grid_euler([float(g) for g in fields["grid"]])
        if kind == "flow_match_euler":
            keep = fields.get("keep_latent_dtype", True)
            if not isinstance(keep, bool):
                raise InvalidPlanConfig("keep_latent_dtype must be a bool")
            return flow_match_euler(tensors["sigmas"], keep)
        if kind == "euler_discrete":
            prediction = fields["prediction_type"]
            if prediction not in ("epsilon", "v_prediction", "sample", "original_sample"):
                raise InvalidPlanConfig(f"bad prediction_type {prediction!r}")
            sigmas = tensors["sigmas"]
            if sigmas.dtype != torch.float32 or sigmas.dim() != 1 or sigmas.numel() < 2:
                raise InvalidPlanConfig("euler_discrete: sigmas must be float32, 1-d, >= 2")
            return EulerDiscrete(sigmas, prediction)
        if kind == "dpm_solver_first_order":
            algorithm, prediction = fields["algorithm_type"], fields["prediction_type"]
            flow = fields["flow_sigmas"]
            if prediction not in DPM_PREDICTIONS.get(algorithm, ()) or not isinstance(flow, bool):
                raise InvalidPlanConfig(f"bad {algorithm!r}, {prediction!r}, {flow!r}")
            return DPMSolverFirstOrder(_spec_sigmas(kind, tensors), prediction, algorithm, flow)
        if kind == "unipc_first_order":
            predict_x0, prediction = fields["predict_x0"], fields["prediction_type"]
            solver_type = fields["solver_type"]
            if (
                not isinstance(predict_x0, bool)
                or prediction not in DPM_PREDICTIONS["dpmsolver++" if predict_x0 else "dpmsolver"]
                or solver_type not in ("bh1", "bh2")
            ):
                raise InvalidPlanConfig(f"bad {predict_x0!r}, {prediction!r}, {solver_type!r}")
            sigmas = _spec_sigmas(kind, tensors)
            return UniPCFirstOrder(sigmas, prediction, predict_x0, solver_type)
        if kind in ("ddim", "ddim_cogvideox"):
            prediction = fields["prediction_type"]
            if prediction not in ("epsilon", "v_prediction"):
                raise InvalidPlanConfig(f"bad prediction_type {prediction!r}")
            common = {
                # keep the scheduler's own dtype: CogVideoX's zero-SNR schedule is float64
                "alphas_cumprod": tensors["alphas_cumprod"],
                "final_alpha_cumprod": tensors["final_alpha_cumprod"].reshape(()),
                "timesteps": tuple(int(t) for t in fields["timesteps"]),
                "stride": int(fields["stride"]),
                "prediction_type": prediction,
            }
            if kind == "ddim_cogvideox":
                return DDIMCogVideoX(**common)
            clip = fields.get("clip_sample_range")
            return DDIM(**common, clip_sample_range=None if clip is None else float(clip))
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidPlanConfig(f"bad {kind} solver spec: {exc!r}") from None
    raise InvalidPlanConfig(f"unknown solver kind {kind!r}")


def _spec_sigmas(kind: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    sigmas = tensors["sigmas"]
    if sigmas.dtype != torch.float32 or sigmas.dim() != 1 or sigmas.numel() < 2:
        raise InvalidPlanConfig(f"{kind}: sigmas must be float32, 1-d, >= 2")
    return sigmas
