"""One request's whole configuration as a validated, serialisable value.

The same ``RequestSpec`` is built by the CLI and the client, travels in the SUBMIT body, is
checked again by the broker, is handed to the worker's adapter in PREPARE, and is written into
benchmark output. ``build_plan`` turns it into the pure plan once the worker has supplied the
initial latent and the solver.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from chords_mq.algorithms import ChordsPlan, SequentialPlan, init_sequence, parse_stop
from chords_mq.algorithms.base import TaskLedger
from chords_mq.algorithms.chords import hit_rounds
from chords_mq.errors import ChordsError
from chords_mq.solvers import Solver

METHODS = ("chords", "sequential")
OUTPUTS = ("latent", "media", "both")
DEFAULT_CORES = 4
MAX_STEPS = 10_000
MAX_BATCH = 16  # the wire's tensor-frame limit


class InvalidRequest(ChordsError, ValueError):
    """A request that cannot run: bad method, steps, cores, init sequence, stop or params."""


def _check_params(value: Any, path: str = "params", depth: int = 0) -> None:
    if depth > 4:
        raise InvalidRequest(f"{path}: nested too deeply")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidRequest(f"{path}: keys must be strings")
            _check_params(item, f"{path}.{key}", depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_params(item, f"{path}[{index}]", depth + 1)
    elif isinstance(value, float) and not math.isfinite(value):
        raise InvalidRequest(f"{path}: numbers must be finite")
    elif not isinstance(value, (str, int, float, bool, type(None))):
        raise InvalidRequest(f"{path}: {type(value).__name__} is not a plain value")


@dataclass(frozen=True)
class RequestSpec:
    """What to sample and how. ``params`` are the model's own (prompt, size, guidance ...)."""

    model: str
    method: str = "chords"
    steps: int = 50
    cores: int | None = None
    init_sequence: tuple[int, ...] | None = None
    stop: str | None = None
    seed: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    # Tasks per forward. 1 (the default) runs each task in the sequential pipeline's own
    # batch shape, so outputs are bitwise reproducible; more trades that for throughput.
    batch: int = 1
    # What each HIT carries: the latent, the decoded media (a worker decodes it), or both.
    output: str = "latent"

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model or len(self.model) > 200:
            raise InvalidRequest(f"model must be a non-empty name, got {self.model!r}")
        if self.method not in METHODS:
            raise InvalidRequest(f"method must be one of {METHODS}, got {self.method!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int):
            raise InvalidRequest(f"steps must be an integer, got {self.steps!r}")
        if not 1 <= self.steps <= MAX_STEPS:
            raise InvalidRequest(f"steps must be in 1..{MAX_STEPS}, got {self.steps}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise InvalidRequest(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.seed >= 1 << 63:
            raise InvalidRequest("seed must be < 2**63")
        if isinstance(self.batch, bool) or not isinstance(self.batch, int):
            raise InvalidRequest(f"batch must be an integer, got {self.batch!r}")
        if not 1 <= self.batch <= MAX_BATCH:
            raise InvalidRequest(f"batch must be in 1..{MAX_BATCH}, got {self.batch}")
        if self.output not in OUTPUTS:
            raise InvalidRequest(f"output must be one of {OUTPUTS}, got {self.output!r}")
        if not isinstance(self.params, dict):
            raise InvalidRequest("params must be a map")
        _check_params(self.params)
        if self.init_sequence is not None:
            object.__setattr__(self, "init_sequence", tuple(self.init_sequence))
        if self.method == "sequential":
            if self.cores not in (None, 1) or self.init_sequence is not None or self.stop:
                raise InvalidRequest("method 'sequential' takes no cores, init sequence or stop")
            return
        try:
            self.resolved_init_sequence()
            parse_stop(self.stop)
        except ChordsError as exc:
            raise InvalidRequest(str(exc)) from None

    def resolved_init_sequence(self) -> list[int] | None:
        """The init sequence the plan uses (None for sequential)."""
        if self.method == "sequential":
            return None
        if self.init_sequence is not None:
            if self.cores is not None and self.cores != len(self.init_sequence):
                raise InvalidRequest(
                    f"cores={self.cores} but the init sequence has {len(self.init_sequence)}"
                )
            return init_sequence(list(self.init_sequence), self.steps)
        cores = DEFAULT_CORES if self.cores is None else self.cores
        if isinstance(cores, bool) or not isinstance(cores, int):
            raise InvalidRequest(f"cores must be an integer, got {cores!r}")
        return init_sequence(cores, self.steps)

    def expected_hit_rounds(self) -> list[tuple[int, int]]:
        """``(core, round)`` of every hit the plan can produce, in release order."""
        sequence = self.resolved_init_sequence()
        if sequence is None:
            return [(1, self.steps)]
        rounds = hit_rounds(sequence, self.steps)
        return sorted(rounds.items(), key=lambda item: (item[1], item[0]))

    def build_plan(self, x0: torch.Tensor, solver: Solver) -> TaskLedger:
        if self.method == "sequential":
            return SequentialPlan(x0, self.steps, solver)
        sequence = self.resolved_init_sequence()
        assert sequence is not None
        return ChordsPlan(x0, self.steps, sequence, solver=solver, stop=parse_stop(self.stop))

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "method": self.method,
            "steps": self.steps,
            "cores": self.cores,
            "init_sequence": None if self.init_sequence is None else list(self.init_sequence),
            "stop": self.stop,
            "seed": self.seed,
            "params": self.params,
            "batch": self.batch,
            "output": self.output,
        }

    @classmethod
    def from_dict(cls, data: Any) -> RequestSpec:
        if not isinstance(data, dict):
            raise InvalidRequest("a request must be a map")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise InvalidRequest(f"unknown request fields {sorted(map(str, unknown))}")
        if "model" not in data:
            raise InvalidRequest("a request needs a model")
        init = data.get("init_sequence")
        if init is not None and not isinstance(init, (list, tuple)):
            raise InvalidRequest("init_sequence must be a list of steps")
        stop = data.get("stop")
        if stop is not None and not isinstance(stop, str):
            raise InvalidRequest("stop must be a string such as 'core-index:1'")
        cores = data.get("cores")
        if cores is not None and (isinstance(cores, bool) or not isinstance(cores, int)):
            raise InvalidRequest(f"cores must be an integer, got {cores!r}")
        return cls(**data)
