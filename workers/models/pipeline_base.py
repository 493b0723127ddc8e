"""``DiffusersAdapter``: the base of the adapters over diffusers pipelines (one per family).

It holds what every family does the same way: load the pipeline (``pipeline``, a diffusers
class name) on a device in a dtype, report the denoiser's dtype, check a request's params,
call ``prepare_latents`` and the scheduler set-up on a private scheduler copy, bring a task's
latents to the device in the request's latent shape, and decode one latent to uint8 media. A
family keeps only what is its own, as a diffusers pipeline does: ``prepare`` (its
``encode_prompt`` call, its latent arguments, its context), ``_schedule`` (its timestep set-up:
the sigmas and ``mu`` its ``__call__`` passes), ``_noise_pred`` (the loop's model call and its
classifier-free guidance, see ``pipeline_common.guided*``) and ``_pixels`` (its latent layout,
unscaling and VAE post-processing).

When it loads, the adapter runs its family's ``_schedule`` once, for a default request (the
family's default size, ``RequestSpec``'s default steps), and builds the solver for it: a
scheduler the family's set-up cannot use (Flux's custom sigmas given to a DDIM, DPM-Solver or
UniPC without flow sigmas, its ``mu`` given to a DPM-Solver on flow sigmas) is refused there in
one line, not by every request.
"""

from __future__ import annotations

import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any, NamedTuple

import torch

from chords_mq.errors import ModelPathError, SchedulerError
from chords_mq.request import RequestSpec
from chords_mq.solvers import (
    SCALED_INPUT,
    Solver,
    scheduler_label,
    scheduler_problem,
    solver_for_scheduler,
)
from chords_mq.workers.models.base import Prepared, pixels_to_uint8
from chords_mq.workers.models.pipeline_common import (
    Params,
    first_order_scheduler,
    load_pipeline,
    private_scheduler,
    seeded,
)


def chosen_scheduler(path: str | Path, shipped: Any, name: str) -> Any:
    """The diffusers scheduler class ``name``, made from the folder's scheduler config."""
    import diffusers

    cls = getattr(diffusers, name, None) if name.endswith("Scheduler") else None
    if cls is None or not hasattr(cls, "from_config"):
        raise SchedulerError(
            f"{path}: --scheduler {name}: not a diffusers scheduler class (for example "
            "DDIMScheduler, EulerDiscreteScheduler)"
        )
    try:
        return cls.from_config(shipped.config)
    except Exception as exc:  # a config it cannot take
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise SchedulerError(
            f"{path}: --scheduler {name} cannot be made from the folder's scheduler config "
            f"({reason})"
        ) from None


# The steps of a default request (what the load-time probe sets up).
DEFAULT_STEPS: int = RequestSpec.steps


class Schedule(NamedTuple):
    """A request's scheduler set-up: its private scheduler (set up for the request's steps),
    the timesteps the loop feeds the network, and the CHORDS solver for that scheduler."""

    scheduler: Any
    timesteps: torch.Tensor
    solver: Solver


def one_line_reason(exc: BaseException) -> str:
    """``exc`` as one line, ``Type: message``; an exception without a message (a bare
    ``assert`` in diffusers) is named by the statement that raised it and where."""
    text = str(exc)
    if not text.strip():
        frames = traceback.extract_tb(exc.__traceback__)
        if frames:
            frame = frames[-1]
            where = f"in {frame.name}() of {Path(frame.filename).name}"
            text = f"{frame.line} failed {where}" if frame.line else f"raised {where}"
        else:
            text = "no message"
    return " ".join(f"{type(exc).__name__}: {text}".split())


class DiffusersAdapter(ABC):
    """A ``ModelAdapter`` over a local diffusers pipeline folder.

    Subclasses set ``name`` (the family, as requests' errors name it), ``pipeline`` (the class
    ``from_pretrained`` loads), ``allowed`` (request params besides ``prompt``),
    ``max_batch`` and what its published folders ship (``published_scheduler``,
    ``switch_scheduler``), and implement ``_default_size``, ``_schedule``, ``prepare``,
    ``_noise_pred`` and ``_pixels``.
    """

    name: str
    pipeline: str
    allowed: AbstractSet[str]
    max_batch: int
    pixel_space = False
    # Whether the family scales the network's input as its solver says (Euler discrete's
    # scale_model_input); one that does not refuses such a scheduler at load.
    scales_model_input = False
    # What the family's published folders ship, and the switch a refusal at load suggests.
    published_scheduler = "FlowMatchEulerDiscreteScheduler"
    switch_scheduler = "FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)"

    def __init__(
        self,
        path: str | Path,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        scheduler: str | None = None,
    ) -> None:
        """``scheduler``: a diffusers scheduler class to use instead of the folder's (made from
        the folder's scheduler config), as ``--scheduler`` names it."""
        try:
            self.pipe = load_pipeline(self.pipeline, path, device, dtype)
        except (OSError, ValueError) as exc:  # a broken config file, missing weights ...
            reason = " ".join(str(exc).split())  # one line
            raise ModelPathError(
                f"{path}: the {self.pipeline} does not load: {reason} (fix that file, or save "
                "the pipeline again with pipe.save_pretrained(FOLDER))"
            ) from None
        self.device: torch.device = self.pipe._execution_device
        self.dtype = str(self.denoiser.dtype).removeprefix("torch.")
        self.solver_note = self._settle_scheduler(path, scheduler)
        self._check_loaded(path)
        self._check_schedule(path)

    def _settle_scheduler(self, path: str | Path, scheduler: str | None) -> str:
        """Put in the pipeline the scheduler the worker runs (the folder's, the one named by
        ``--scheduler``, or its first-order member) or refuse it in one line; returns what
        the worker runs, as its log says it once."""
        shipped = type(self.pipe.scheduler).__name__
        if scheduler is not None:
            self.pipe.scheduler = chosen_scheduler(path, self.pipe.scheduler, scheduler)
        before = self.pipe.scheduler
        chosen = type(before).__name__
        self.scheduler_name = chosen  # as a refusal names it
        self.pipe.scheduler = first_order_scheduler(before)
        name = type(self.pipe.scheduler).__name__
        problem = scheduler_problem(self.pipe.scheduler)  # refused at load, not per request
        if problem is None and name in SCALED_INPUT and not self.scales_model_input:
            problem = f"{self.name} does not scale its network's input as {name} needs"
        if problem is not None:
            raise SchedulerError(f"{path}: {problem}")
        if name == "UniPCMultistepScheduler" and self.pipe.scheduler.config.use_flow_sigmas:
            note = f"FlowMatchEulerDiscreteScheduler on its sigmas (first order of {name})"
        else:
            label = scheduler_label(self.pipe.scheduler)  # e.g. "... with solver_order=1"
            note = label if self.pipe.scheduler is before else f"{label} (first order of {chosen})"
        return note if chosen == shipped else f"{note}, by --scheduler (the folder ships {shipped})"

    def _check_loaded(self, path: str | Path) -> None:  # noqa: B027 - a hook, optional
        """A family's own load-time checks of the pipeline it loaded (none by default)."""

    def _check_schedule(self, path: str | Path) -> None:
        """The family's own timestep set-up (``_schedule``, as ``prepare`` calls it) for a
        default request, and the solver for it, run once: a scheduler the family cannot set up
        (custom sigmas or ``mu`` it does not take, a broken configuration) is refused here in
        one line naming the folder, the scheduler, why and what to do."""
        height, width = self._default_size()
        try:
            self._schedule(DEFAULT_STEPS, height, width)
        except Exception as exc:
            raise SchedulerError(
                f"{path}: its {self.scheduler_name} cannot run the {self.name} pipeline's "
                f"timestep set-up ({one_line_reason(exc)}); the published {self.name} folders "
                f"ship {self.published_scheduler}: fix scheduler/scheduler_config.json, or "
                f"switch with pipe.scheduler = {self.switch_scheduler}, then "
                "pipe.save_pretrained(FOLDER)"
            ) from None

    @property
    def denoiser(self) -> Any:
        """The network the pipeline's loop calls each step (its dtype is the model's)."""
        return self.pipe.transformer

    def _params(self, request: RequestSpec) -> Params:
        return Params(self.name, request.params, self.allowed)

    @abstractmethod
    def _default_size(self) -> tuple[int, int]:
        """The pipeline's default height and width (pixels), as its ``__call__`` takes them."""

    @abstractmethod
    def _schedule(self, steps: int, height: int, width: int) -> Schedule:
        """The request's scheduler set-up, as the pipeline's ``__call__`` does it for ``steps``
        at ``height`` x ``width`` (its sigmas, its ``mu``), on a private scheduler, with the
        solver for it; ``prepare`` and the load-time probe both call it."""

    def _solver(self, scheduler: Any) -> Solver:
        """The CHORDS solver for a set-up scheduler (its own step, ``solver_for_scheduler``)."""
        return solver_for_scheduler(scheduler)

    def _timesteps(self, retrieve: Callable[..., Any], steps: int, **kwargs: Any) -> Schedule:
        """A private scheduler set up by the pipeline's own ``retrieve_timesteps``
        (``kwargs``: its ``sigmas``, ``mu``), its timesteps and its solver."""
        scheduler = private_scheduler(self.pipe)
        timesteps, _ = retrieve(scheduler, steps, self.pipe._execution_device, **kwargs)
        return Schedule(scheduler, timesteps, self._solver(scheduler))

    def _initial_latents(
        self, seed: int, *sizes: int, dtype: torch.dtype, scheduler: Any = None
    ) -> Any:
        """The pipeline's own ``prepare_latents`` for one sample on its device, drawn by a CPU
        generator seeded with ``seed``; ``sizes`` are the family's arguments between the batch
        size and the dtype (channels and its spatial or temporal sizes, in its own order).
        ``scheduler``: the request's own, set up for its steps, in the pipeline's place while
        it runs (``init_noise_sigma`` is read from it, as in ``pipe()``)."""
        device = self.pipe._execution_device
        if scheduler is None:
            return self.pipe.prepare_latents(1, *sizes, dtype, device, seeded(seed), None)
        shared = self.pipe.scheduler
        self.pipe.scheduler = scheduler  # the compute thread prepares one request at a time
        try:
            return self.pipe.prepare_latents(1, *sizes, dtype, device, seeded(seed), None)
        finally:
            self.pipe.scheduler = shared

    @abstractmethod
    def prepare(self, request: RequestSpec) -> Prepared: ...

    # The dtype of the family's guided model output, as ``_noise_pred`` returns it: the
    # denoiser's, unless the family upcasts it (CogVideoX combines its guidance in float32).
    def _output_dtype(self) -> torch.dtype:
        dtype: torch.dtype = self.denoiser.dtype
        return dtype

    def _prepared(self, x0: torch.Tensor, solver: Solver, context: Any) -> Prepared:
        """What ``prepare`` returns, with the dtype every task's results have, declared before
        any runs (PREPARED carries it, and the broker holds every result to it): the solver's
        result for a latent of ``x0``'s dtype and an output of ``_output_dtype``, found on one
        element on the device. A task from a result (Hunyuan's float32 x0 turns bfloat16 after
        a step) gives the same dtype: each solver keeps either the latent's or the output's."""
        x = torch.zeros(1, dtype=x0.dtype, device=self.device)
        out = torch.zeros(1, dtype=self._output_dtype(), device=self.device)
        result_dtype = solver(x, out, 0, 1).dtype
        return Prepared(x0=x0, solver=solver, context=context, result_dtype=result_dtype)

    @torch.no_grad()
    def denoise(self, context: Any, latents: torch.Tensor, steps: Sequence[int]) -> torch.Tensor:
        x = latents.reshape(-1, *context.latent_shape[1:]).to(self.pipe._execution_device)
        out = self._noise_pred(context, x, steps)
        return out.reshape(latents.shape)  # on the device: the worker solves there

    @abstractmethod
    def _noise_pred(self, context: Any, x: torch.Tensor, steps: Sequence[int]) -> torch.Tensor:
        """The loop's guided model output for the rows of ``x`` (in the request's latent shape,
        on the device), row b at step ``steps[b]``."""

    @torch.no_grad()
    def decode(self, context: Any, latent: torch.Tensor) -> torch.Tensor:
        """Decoded media (uint8): (H, W, C) for an image, (F, H, W, C) for a video."""
        x = latent.reshape(context.latent_shape).to(self.pipe._execution_device)
        return pixels_to_uint8(self._pixels(context, x))

    @abstractmethod
    def _pixels(self, context: Any, x: torch.Tensor) -> Any:
        """The pipeline's own decode of one latent ``x`` (on the device), up to its
        post-processing's ``output_type="np"`` pixels of that one sample."""
