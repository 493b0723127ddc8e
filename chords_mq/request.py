"""One request's whole configuration as a validated, serialisable value.

The same ``RequestSpec`` is built by the CLI and the client, travels in the SUBMIT body, is
checked again by the broker, is handed to the worker's adapter in PREPARE, and is written into
benchmark output. ``build_plan`` turns it into the pure plan once the worker has supplied the
initial latent and the solver. What depends on the method (the fields it takes, its K and init
sequence, its stop rule, hits, working set and plan) is its method class's, in
``chords_mq.methods``; a spec resolves its K and init sequence once, when it is made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from chords_mq.algorithms import parse_stop
from chords_mq.algorithms.base import TaskLedger
from chords_mq.algorithms.stopping import CoreIndex
from chords_mq.methods import NAMES, Method, method_for
from chords_mq.methods import InvalidRequest as InvalidRequest
from chords_mq.solvers import MAX_STEPS, Solver

# The method names (see chords_mq.methods): chords, sequential, paradigms, srds, srds-parareal.
METHODS = NAMES
OUTPUTS = ("latent", "media", "both")
MAX_BATCH = 16  # the wire's tensor-frame limit


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
    # paradigms only: the error tolerance tau (a ratio of the step's noise scale).
    tolerance: float | None = None
    # srds-parareal only: the iteration cap P (1..B; default B, which is exact).
    iterations: int | None = None
    # CHORDS: ``cores`` is the most the request wants; a broker under load may grant fewer
    # (its --cores-policy adaptive) unless this is set. An explicit init sequence insists too.
    exact_cores: bool = False
    # Resolved once, when the spec is made (see ``resolved_cores``): not fields of the request.
    _cores: int = field(init=False, repr=False, compare=False)
    _init_sequence: tuple[int, ...] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model or len(self.model) > 200:
            raise InvalidRequest(f"model must be a non-empty name, got {self.model!r}")
        rules = method_for(self.method)  # refuses an unknown method
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
        if not isinstance(self.exact_cores, bool):
            raise InvalidRequest(f"exact_cores must be true or false, got {self.exact_cores!r}")
        if self.output not in OUTPUTS:
            raise InvalidRequest(f"output must be one of {OUTPUTS}, got {self.output!r}")
        if not isinstance(self.params, dict):
            raise InvalidRequest("params must be a map")
        _check_params(self.params)
        if self.init_sequence is not None:
            object.__setattr__(self, "init_sequence", tuple(self.init_sequence))
        resolved = rules.validate(self)
        object.__setattr__(self, "_cores", resolved.cores)
        object.__setattr__(self, "_init_sequence", resolved.init_sequence)

    @property
    def rules(self) -> Method:
        """This request's method: its rules (``chords_mq.methods``)."""
        return method_for(self.method)

    def resolved_cores(self) -> int:
        """How many workers the request can use at once (the paper's K)."""
        return self._cores

    def resolved_init_sequence(self) -> list[int] | None:
        """The init sequence the plan uses (None for methods other than chords and srds)."""
        return None if self._init_sequence is None else list(self._init_sequence)

    def resolved_stop(self) -> str | None:
        """The stop rule the plan uses: the request's, else its method's default (SRDS: the
        residual rule)."""
        return self.rules.resolved_stop(self)

    def granted(self, cores: int) -> RequestSpec:
        """This request on at most ``cores`` workers: CHORDS with the init sequence of the
        smaller K (core 1 stays the sequential solve). Unchanged where the request insists on
        its K (``exact_cores``, an explicit init sequence), for the baselines (their cores are
        part of the method) and where the stop rule needs more cores than granted."""
        wanted = self.resolved_cores()
        if (
            not self.rules.grants_fewer_cores
            or self.exact_cores
            or self.init_sequence is not None
            or cores >= wanted
        ):
            return self
        rule = parse_stop(self.resolved_stop())
        if isinstance(rule, CoreIndex):  # the m-th fastest core must exist: at least m cores
            cores = max(cores, rule.index)
        if cores >= wanted:
            return self
        try:
            return replace(self, cores=max(1, cores))
        except InvalidRequest:
            return self

    def expected_hit_rounds(self) -> list[tuple[int, int]]:
        """``(core, round)`` of every hit the plan can produce, in release order (ParaDIGMS:
        empty, its one hit's round depends on the data)."""
        return self.rules.expected_hit_rounds(self)

    def build_plan(self, x0: torch.Tensor, solver: Solver) -> TaskLedger:
        """The plan for this request from the worker's initial latent. ``solver`` is the one
        the tasks will be evaluated with; no plan calls it (ParaDIGMS reads its tolerance scale
        from it)."""
        return self.rules.build_plan(self, x0, solver)

    def working_set_latents(self) -> int:
        """At most how many latents the broker holds for this request when workers keep pace
        (its plan's stores, its tasks' inputs, results arriving): what ``--max-request-bytes``
        admits against. The bounds are checked by simulations in any completion order."""
        return self.rules.working_set_latents(self)

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
            "tolerance": self.tolerance,
            "iterations": self.iterations,
            # only when set: a request that does not insist reads as before the cores policy
            **({"exact_cores": True} if self.exact_cores else {}),
        }

    @classmethod
    def from_dict(cls, data: Any) -> RequestSpec:
        if not isinstance(data, dict):
            raise InvalidRequest("a request must be a map")
        unknown = set(data) - {item.name for item in fields(cls) if item.init}
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
