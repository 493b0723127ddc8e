"""What the simulator and the broker-core tests share: a fake clock, a velocity, and the answers
an honest worker gives (PREPARED and RESULT), computed in-process without a model.

The core is driven with these exactly as the server drives it, only in fake time; nothing here
opens a socket. ``velocity`` is the one the tests' expected hits are computed with.
"""

from __future__ import annotations

import torch

from chords_mq.solvers import solve_targets, solver_spec, unit_euler
from chords_mq.wire import (
    PROTOCOL_VERSION,
    EvalMessage,
    HelloMessage,
    Message,
    PreparedMessage,
    PrepareMessage,
    ResultEntry,
    ResultMessage,
    SolverSpec,
    tensor_digest,
)

X0 = torch.linspace(-1, 1, 4)  # the initial latent an honest fake worker prepares


class FakeClock:
    """A clock the caller moves: ``clock.now += seconds``."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def velocity(x: torch.Tensor, step: int) -> torch.Tensor:
    """The fake model: cheap, nonlinear, different at every step."""
    return torch.tanh(x) * (1 + step) * 0.01 - 0.1 * x


def hello(name: str, model: str, **changes: object) -> HelloMessage:
    """A worker's HELLO (``changes`` override fields)."""
    fields: dict[str, object] = {
        "worker": name,
        "model": model,
        "device": "cpu",
        "dtype": "float32",
        "max_batch": 1,
        "version": "test",
        "protocol": PROTOCOL_VERSION,
    }
    fields.update(changes)
    return HelloMessage(**fields)  # type: ignore[arg-type]


def prepared_for(job: PrepareMessage, x0: torch.Tensor = X0) -> PreparedMessage:
    """An honest PREPARED: the unit Euler solver, and x0 if the PREPARE asked for it."""
    fields, tensors = solver_spec(unit_euler)
    reply = PreparedMessage(
        solver=SolverSpec(fields, tensors),
        x0_digest=tensor_digest(x0),
        x0=x0 if job.initial else None,
    )
    return reply.ids(job)


def result_for(job: EvalMessage) -> ResultMessage:
    """An honest RESULT: each task's solver results under ``velocity``."""
    entries = []
    for entry, latent in zip(job.entries, job.latents):
        out = velocity(latent, entry.step)
        results = solve_targets(unit_euler, latent, out, entry.step, entry.targets)
        entries.append(ResultEntry(entry.task, entry.attempt, results))
    return ResultMessage(entries=tuple(entries), compute_s=0.001).ids(job)


def honest_answer(job: Message) -> Message:
    """What an honest worker answers to a PREPARE or an EVAL."""
    if isinstance(job, PrepareMessage):
        return prepared_for(job)
    assert isinstance(job, EvalMessage), job.kind
    return result_for(job)
