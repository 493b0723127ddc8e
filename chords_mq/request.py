"""One request's whole configuration as a validated, serialisable value.

The same ``RequestSpec`` is built by the CLI and the client, travels in the SUBMIT body, is
checked again by the broker, is handed to the worker's adapter in PREPARE, and is written into
benchmark output. ``build_plan`` turns it into the pure plan once the worker has supplied the
initial latent and the solver.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from chords_mq.algorithms import ChordsPlan, SequentialPlan, init_sequence, parse_stop
from chords_mq.algorithms.base import TaskLedger
from chords_mq.algorithms.chords import hit_rounds
from chords_mq.algorithms.paradigms import DEFAULT_TOLERANCE, ParadigmsPlan, step_variance
from chords_mq.algorithms.srds import SrdsPlan, srds_blocks, srds_init_sequence, srds_schedule
from chords_mq.algorithms.stopping import CoreIndex
from chords_mq.errors import ChordsError
from chords_mq.solvers import Solver

# chords: the CHORDS schedule. sequential: plain sampling. paradigms: sliding-window Picard
# (window = cores). srds: pipelined SRDS as the CHORDS paper ran it, CHORDS with the init
# sequence [0, B, 2B, ...]. srds-parareal: the Parareal iteration itself, list-scheduled on
# `cores` workers. See chords_mq/algorithms/{paradigms,srds}.py.
METHODS = ("chords", "sequential", "paradigms", "srds", "srds-parareal")
# CHORDS' configs/algo/chords.yaml default threshold. The preset compares consecutive cores (the
# SRDS iterates), not the zero-th hit; the Parareal plan's iterate 0 is a real iterate.
SRDS_DEFAULT_STOP = "residual-cores:4e-4"
PARAREAL_DEFAULT_STOP = "residual:4e-4"
# srds-parareal's evaluation graph grows as N^1.5 and is list-scheduled up front (about 0.2 s at
# N = 1000 on the broker's loop); real samplers use far fewer steps.
MAX_PARAREAL_STEPS = 1000
OUTPUTS = ("latent", "media", "both")
DEFAULT_CORES = 4
MAX_STEPS = 10_000
MAX_CORES = 256  # workers one request may use at once; keeps every reply under the header limit
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
    # paradigms only: the error tolerance tau (a ratio of the step's noise scale).
    tolerance: float | None = None
    # srds-parareal only: the iteration cap P (1..B; default B, which is exact).
    iterations: int | None = None
    # CHORDS: ``cores`` is the most the request wants; a broker under load may grant fewer
    # (its --cores-policy adaptive) unless this is set. An explicit init sequence insists too.
    exact_cores: bool = False

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
        if not isinstance(self.exact_cores, bool):
            raise InvalidRequest(f"exact_cores must be true or false, got {self.exact_cores!r}")
        if self.output not in OUTPUTS:
            raise InvalidRequest(f"output must be one of {OUTPUTS}, got {self.output!r}")
        if not isinstance(self.params, dict):
            raise InvalidRequest("params must be a map")
        _check_params(self.params)
        if self.init_sequence is not None:
            object.__setattr__(self, "init_sequence", tuple(self.init_sequence))
        self._check_method_fields()
        if self.method == "sequential":
            if self.cores not in (None, 1) or self.init_sequence is not None or self.stop:
                raise InvalidRequest("method 'sequential' takes no cores, init sequence or stop")
            return
        if self.method in ("paradigms", "srds-parareal") and self.init_sequence is not None:
            raise InvalidRequest(f"method {self.method!r} takes no init sequence")
        if self.method == "paradigms" and self.stop:
            raise InvalidRequest("method 'paradigms' stops by its tolerance, not a stop rule")
        try:
            self.resolved_init_sequence()
            self.resolved_cores()
            parse_stop(self.resolved_stop())
            if self.method == "srds-parareal":
                self._parareal_iterations()
        except ChordsError as exc:
            raise InvalidRequest(str(exc)) from None

    def _check_method_fields(self) -> None:
        if self.tolerance is not None:
            if self.method != "paradigms":
                raise InvalidRequest("tolerance applies to method 'paradigms' only")
            value = self.tolerance
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidRequest(f"tolerance must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise InvalidRequest(f"tolerance must be a finite number >= 0, got {value}")
        if self.iterations is not None:
            if self.method != "srds-parareal":
                raise InvalidRequest("iterations applies to method 'srds-parareal' only")
            value = self.iterations
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidRequest(f"iterations must be an integer >= 1, got {value!r}")

    def resolved_cores(self) -> int:
        """How many workers the request can use at once (the paper's K)."""
        if self.method == "sequential":
            return 1
        if self.init_sequence is not None:
            cores = len(self.init_sequence)
        else:
            cores = DEFAULT_CORES if self.cores is None else self.cores
        if isinstance(cores, bool) or not isinstance(cores, int) or not 1 <= cores <= MAX_CORES:
            raise InvalidRequest(f"cores must be an integer in 1..{MAX_CORES}, got {cores!r}")
        return cores

    def granted(self, cores: int) -> RequestSpec:
        """This request on at most ``cores`` workers: CHORDS with the init sequence of the
        smaller K (core 1 stays the sequential solve). Unchanged where the request insists on
        its K (``exact_cores``, an explicit init sequence), for the baselines (their cores are
        part of the method) and where the stop rule needs more cores than granted."""
        wanted = self.resolved_cores()
        if (
            self.method != "chords"
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

    def resolved_stop(self) -> str | None:
        """The stop rule the plan uses: SRDS defaults to the residual rule."""
        if self.stop is None and self.method == "srds":
            return SRDS_DEFAULT_STOP
        if self.stop is None and self.method == "srds-parareal":
            return PARAREAL_DEFAULT_STOP
        return self.stop

    def _parareal_iterations(self) -> int:
        if self.steps > MAX_PARAREAL_STEPS:
            raise InvalidRequest(
                f"method 'srds-parareal' supports at most {MAX_PARAREAL_STEPS} steps, "
                f"got {self.steps}"
            )
        blocks = len(srds_blocks(self.steps)) - 1
        count = blocks if self.iterations is None else self.iterations
        if count > blocks:
            raise InvalidRequest(f"iterations must be in 1..{blocks} (B = floor(sqrt(N)))")
        return count

    def _parareal_schedule(self) -> dict[int, int]:
        bounds = srds_blocks(self.steps)
        return srds_schedule(bounds, self._parareal_iterations(), self.resolved_cores())[1]

    def resolved_init_sequence(self) -> list[int] | None:
        """The init sequence the plan uses (None for methods other than chords and srds)."""
        if self.method in ("sequential", "paradigms", "srds-parareal"):
            return None
        if self.method == "srds":
            if self.init_sequence is not None:
                raise InvalidRequest("method 'srds' makes its own init sequence [0, B, 2B, ...]")
            return srds_init_sequence(self.resolved_cores(), self.steps)
        if self.init_sequence is not None:
            if self.cores is not None and self.cores != len(self.init_sequence):
                raise InvalidRequest(
                    f"cores={self.cores} but the init sequence has {len(self.init_sequence)}"
                )
            return init_sequence(list(self.init_sequence), self.steps)
        return init_sequence(self.resolved_cores(), self.steps)

    def expected_hit_rounds(self) -> list[tuple[int, int]]:
        """``(core, round)`` of every hit the plan can produce, in release order (ParaDIGMS:
        empty, its one hit's round depends on the data)."""
        if self.method == "paradigms":
            return []
        if self.method == "srds-parareal":
            return sorted(self._parareal_schedule().items())
        sequence = self.resolved_init_sequence()
        if sequence is None:
            return [(1, self.steps)]
        rounds = hit_rounds(sequence, self.steps)
        return sorted(rounds.items(), key=lambda item: (item[1], item[0]))

    def build_plan(self, x0: torch.Tensor, solver: Solver) -> TaskLedger:
        """The plan for this request from the worker's initial latent. ``solver`` is the one
        the tasks will be evaluated with; no plan calls it (ParaDIGMS reads its tolerance scale
        from it)."""
        if self.method == "sequential":
            return SequentialPlan(x0, self.steps)
        stop = parse_stop(self.resolved_stop())
        if self.method == "paradigms":
            tolerance = DEFAULT_TOLERANCE if self.tolerance is None else float(self.tolerance)
            variance = step_variance(solver, self.steps)
            return ParadigmsPlan(x0, self.steps, self.resolved_cores(), tolerance, variance)
        if self.method == "srds-parareal":
            return SrdsPlan(
                x0,
                self.steps,
                iterations=self.iterations,
                stop=stop,
                workers=self.resolved_cores(),
            )
        sequence = self.resolved_init_sequence()
        assert sequence is not None
        return ChordsPlan(x0, self.steps, sequence, stop=stop)

    def working_set_latents(self) -> int:
        """At most how many latents the broker holds for this request when workers keep pace
        (its plan's stores, its tasks' inputs, results arriving): what ``--max-request-bytes``
        admits against. The bounds are checked by simulations in any completion order."""
        cores = self.resolved_cores()
        if self.method == "sequential":
            return 3
        if self.method == "paradigms":
            return 4 * cores + 3  # buffer, drifts, and the stacked cumsum of one slide
        if self.method == "srds-parareal":
            blocks = len(srds_blocks(self.steps)) - 1
            return 2 * blocks + 2 * cores + 2
        return 4 * cores + 2  # per core: its input, G, cur_G, F waiting; plus results arriving

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
