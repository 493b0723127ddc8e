"""The sampling methods, one class each: every rule that depends on a request's method.

A ``RequestSpec`` holds a request's data; its method (``method_for(spec.method)``) says which of
the fields it takes and refuses, the cores (K) and init sequence it runs with, its default stop
rule, the hits it can produce and in which rounds, how many latents the broker holds for it, and
which plan runs it. The methods: ``chords`` (the CHORDS schedule), ``sequential`` (plain
sampling), ``paradigms`` (sliding-window Picard, window = cores), ``srds`` (pipelined SRDS as the
CHORDS paper ran it: CHORDS on the init sequence [0, B, 2B, ...]) and ``srds-parareal`` (the
Parareal iteration itself, list-scheduled on ``cores`` workers). See
chords_mq/algorithms/{chords,paradigms,srds}.py.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import torch

from chords_mq.algorithms import ChordsPlan, SequentialPlan, init_sequence, parse_stop
from chords_mq.algorithms.base import TaskLedger
from chords_mq.algorithms.chords import hit_rounds
from chords_mq.algorithms.paradigms import DEFAULT_TOLERANCE, ParadigmsPlan, step_variance
from chords_mq.algorithms.srds import SrdsPlan, srds_blocks, srds_init_sequence, srds_schedule
from chords_mq.errors import ChordsError
from chords_mq.solvers import Solver

if TYPE_CHECKING:
    from chords_mq.request import RequestSpec

DEFAULT_CORES = 4
MAX_CORES = 256  # workers one request may use at once; keeps every reply under the header limit
# CHORDS' configs/algo/chords.yaml default threshold. The preset compares consecutive cores (the
# SRDS iterates), not the zero-th hit; the Parareal plan's iterate 0 is a real iterate.
SRDS_DEFAULT_STOP = "residual-cores:4e-4"
PARAREAL_DEFAULT_STOP = "residual:4e-4"
# srds-parareal's evaluation graph grows as N^1.5 and is list-scheduled up front (about 0.2 s at
# N = 1000 on the broker's loop); real samplers use far fewer steps.
MAX_PARAREAL_STEPS = 1000


class InvalidRequest(ChordsError, ValueError):
    """A request that cannot run: bad method, steps, cores, init sequence, stop or params.
    (Defined here, where the methods' rules raise it; ``chords_mq.request`` exports it.)"""


class Resolved(NamedTuple):
    """What a request runs with once its method has resolved it."""

    cores: int  # the paper's K: how many workers the request can use at once
    init_sequence: tuple[int, ...] | None  # None for methods without one


def _takers(flag: str) -> str:
    return " or ".join(repr(m.name) for m in REGISTRY.values() if getattr(m, flag))


class Method:
    """One sampling method's rules. The base class is what the parallel methods share."""

    name: ClassVar[str]
    label: ClassVar[str]  # as the bench's table and plot name it
    # The request fields the method takes (a method refuses the others in ``refuse``).
    takes_cores: ClassVar[bool] = True
    takes_init_sequence: ClassVar[bool] = False
    takes_stop: ClassVar[bool] = True
    takes_tolerance: ClassVar[bool] = False
    takes_iterations: ClassVar[bool] = False
    default_stop: ClassVar[str | None] = None  # the rule used when the request names none
    default_tolerance: ClassVar[float | None] = None
    # A broker under load may run the request on fewer cores than it asks for (``granted``).
    grants_fewer_cores: ClassVar[bool] = False
    # The K ``chords run`` writes into the request when given neither cores nor an init
    # sequence (so its output records it); None leaves the request's own default.
    cli_default_cores: ClassVar[int | None] = None
    # The plan only adds and subtracts results, so a driver may feed it results by name and
    # keep the tensors where it likes (``algorithms.base``), unless its stop rule reads hits.
    by_name: ClassVar[bool] = True

    def __repr__(self) -> str:
        return f"<method {self.name!r}>"

    # ------------------------------------------------------------------ validation

    def validate(self, spec: RequestSpec) -> Resolved:
        """Refuse what this method cannot run (``InvalidRequest``); else what it runs with."""
        self.check_options(spec)
        self.refuse(spec)
        try:
            resolved = self.resolve(spec)
            parse_stop(self.resolved_stop(spec))
            self.check_plan(spec, resolved)
        except ChordsError as exc:
            raise InvalidRequest(str(exc)) from None
        return resolved

    def check_options(self, spec: RequestSpec) -> None:
        """The options only some methods take: refused elsewhere, checked where taken."""
        if spec.tolerance is not None:
            if not self.takes_tolerance:
                raise InvalidRequest(
                    f"tolerance applies to method {_takers('takes_tolerance')} only"
                )
            value = spec.tolerance
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidRequest(f"tolerance must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise InvalidRequest(f"tolerance must be a finite number >= 0, got {value}")
        if spec.iterations is not None:
            if not self.takes_iterations:
                raise InvalidRequest(
                    f"iterations applies to method {_takers('takes_iterations')} only"
                )
            value = spec.iterations
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidRequest(f"iterations must be an integer >= 1, got {value!r}")

    def refuse(self, spec: RequestSpec) -> None:
        """Refuse the fields this method does not take, before anything is resolved."""

    def resolve(self, spec: RequestSpec) -> Resolved:
        """The cores and init sequence the request runs with (``ChordsError`` if it cannot)."""
        return Resolved(self.requested_cores(spec), None)

    def check_plan(self, spec: RequestSpec, resolved: Resolved) -> None:
        """Refuse what the plan cannot run once cores and init sequence are resolved."""

    @staticmethod
    def requested_cores(spec: RequestSpec) -> int:
        """K as the request gives it: its init sequence's length, else ``cores``, else the
        default; refused outside 1..MAX_CORES."""
        if spec.init_sequence is not None:
            cores: object = len(spec.init_sequence)
        else:
            cores = DEFAULT_CORES if spec.cores is None else spec.cores
        if isinstance(cores, bool) or not isinstance(cores, int) or not 1 <= cores <= MAX_CORES:
            raise InvalidRequest(f"cores must be an integer in 1..{MAX_CORES}, got {cores!r}")
        return cores

    # ---------------------------------------------------------------- what it runs

    def resolved_stop(self, spec: RequestSpec) -> str | None:
        """The stop rule the plan uses: the request's, else the method's default."""
        return self.default_stop if spec.stop is None else spec.stop

    def expected_hit_rounds(self, spec: RequestSpec) -> list[tuple[int, int]]:
        """``(core, round)`` of every hit the plan can produce, in release order."""
        raise NotImplementedError

    def working_set_latents(self, spec: RequestSpec) -> int:
        """At most how many latents the broker holds for the request when workers keep pace
        (its plan's stores, its tasks' inputs, results arriving). The bounds are checked by
        simulations in any completion order."""
        raise NotImplementedError

    def build_plan(self, spec: RequestSpec, x0: torch.Tensor, solver: Solver) -> TaskLedger:
        """The request's plan from the worker's initial latent."""
        raise NotImplementedError


class Sequential(Method):
    """Plain sampling: one core, N steps, one hit."""

    name = "sequential"
    label = "Sequential"
    takes_cores = False
    takes_stop = False

    def validate(self, spec: RequestSpec) -> Resolved:
        self.check_options(spec)
        self.refuse(spec)
        return Resolved(1, None)

    def refuse(self, spec: RequestSpec) -> None:
        if spec.cores not in (None, 1) or spec.init_sequence is not None or spec.stop:
            raise InvalidRequest("method 'sequential' takes no cores, init sequence or stop")

    def expected_hit_rounds(self, spec: RequestSpec) -> list[tuple[int, int]]:
        return [(1, spec.steps)]

    def working_set_latents(self, spec: RequestSpec) -> int:
        return 3

    def build_plan(self, spec: RequestSpec, x0: torch.Tensor, solver: Solver) -> TaskLedger:
        return SequentialPlan(x0, spec.steps)


class Chords(Method):
    """The CHORDS schedule: K cores started at the init sequence's steps, each rectified by the
    slower one; a broker under load may grant it fewer cores."""

    name = "chords"
    label = "CHORDS"
    takes_init_sequence = True
    grants_fewer_cores = True
    cli_default_cores: ClassVar[int | None] = DEFAULT_CORES

    def resolve(self, spec: RequestSpec) -> Resolved:
        given = spec.init_sequence
        if given is None:
            cores = self.requested_cores(spec)
            return Resolved(cores, tuple(init_sequence(cores, spec.steps)))
        if spec.cores is not None and spec.cores != len(given):
            raise InvalidRequest(f"cores={spec.cores} but the init sequence has {len(given)}")
        sequence = tuple(init_sequence(list(given), spec.steps))
        return Resolved(self.requested_cores(spec), sequence)

    def expected_hit_rounds(self, spec: RequestSpec) -> list[tuple[int, int]]:
        sequence = spec.resolved_init_sequence()
        assert sequence is not None
        rounds = hit_rounds(sequence, spec.steps)
        return sorted(rounds.items(), key=lambda item: (item[1], item[0]))

    def working_set_latents(self, spec: RequestSpec) -> int:
        # per core: its input, G, cur_G, F waiting; plus results arriving
        return 4 * spec.resolved_cores() + 2

    def build_plan(self, spec: RequestSpec, x0: torch.Tensor, solver: Solver) -> TaskLedger:
        sequence = spec.resolved_init_sequence()
        assert sequence is not None
        return ChordsPlan(x0, spec.steps, sequence, stop=parse_stop(self.resolved_stop(spec)))


class Srds(Chords):
    """Pipelined SRDS as the CHORDS paper ran it: CHORDS on the init sequence [0, B, 2B, ...]
    (B = floor(sqrt(N))), stopping when consecutive cores agree."""

    name = "srds"
    label = "SRDS (pipelined)"
    takes_init_sequence = False
    grants_fewer_cores = False  # its cores are part of the method
    cli_default_cores = None
    default_stop = SRDS_DEFAULT_STOP

    def refuse(self, spec: RequestSpec) -> None:
        if spec.init_sequence is not None:
            raise InvalidRequest("method 'srds' makes its own init sequence [0, B, 2B, ...]")

    def resolve(self, spec: RequestSpec) -> Resolved:
        cores = self.requested_cores(spec)
        return Resolved(cores, tuple(srds_init_sequence(cores, spec.steps)))


class Paradigms(Method):
    """ParaDIGMS: sliding-window Picard iteration, window = cores, stopping by its tolerance."""

    name = "paradigms"
    by_name = False  # its acceptance test reads the window's values
    label = "ParaDIGMS"
    takes_stop = False
    takes_tolerance = True
    default_tolerance = DEFAULT_TOLERANCE

    def refuse(self, spec: RequestSpec) -> None:
        if spec.init_sequence is not None:
            raise InvalidRequest(f"method {self.name!r} takes no init sequence")
        if spec.stop:
            raise InvalidRequest("method 'paradigms' stops by its tolerance, not a stop rule")

    def expected_hit_rounds(self, spec: RequestSpec) -> list[tuple[int, int]]:
        return []  # its one hit's round depends on the data

    def working_set_latents(self, spec: RequestSpec) -> int:
        return 4 * spec.resolved_cores() + 3  # buffer, drifts, and the stacked cumsum of one slide

    def build_plan(self, spec: RequestSpec, x0: torch.Tensor, solver: Solver) -> TaskLedger:
        # the solver only gives the tolerance its scale; no plan calls it
        tolerance = DEFAULT_TOLERANCE if spec.tolerance is None else float(spec.tolerance)
        variance = step_variance(solver, spec.steps)
        return ParadigmsPlan(x0, spec.steps, spec.resolved_cores(), tolerance, variance)


class SrdsParareal(Method):
    """SRDS' Parareal iteration itself: B = floor(sqrt(N)) blocks, at most ``iterations``
    iterates (default B, which is exact), its evaluations list-scheduled on ``cores`` workers."""

    name = "srds-parareal"
    label = "SRDS (Parareal DAG)"
    takes_iterations = True
    default_stop = PARAREAL_DEFAULT_STOP

    def refuse(self, spec: RequestSpec) -> None:
        if spec.init_sequence is not None:
            raise InvalidRequest(f"method {self.name!r} takes no init sequence")

    def check_plan(self, spec: RequestSpec, resolved: Resolved) -> None:
        self.iterations(spec)

    def iterations(self, spec: RequestSpec) -> int:
        """The iteration cap P the plan runs (1..B)."""
        if spec.steps > MAX_PARAREAL_STEPS:
            raise InvalidRequest(
                f"method 'srds-parareal' supports at most {MAX_PARAREAL_STEPS} steps, "
                f"got {spec.steps}"
            )
        blocks = len(srds_blocks(spec.steps)) - 1
        count = blocks if spec.iterations is None else spec.iterations
        if count > blocks:
            raise InvalidRequest(f"iterations must be in 1..{blocks} (B = floor(sqrt(N)))")
        return count

    def expected_hit_rounds(self, spec: RequestSpec) -> list[tuple[int, int]]:
        bounds = srds_blocks(spec.steps)
        schedule = srds_schedule(bounds, self.iterations(spec), spec.resolved_cores())[1]
        return sorted(schedule.items())

    def working_set_latents(self, spec: RequestSpec) -> int:
        blocks = len(srds_blocks(spec.steps)) - 1
        return 2 * blocks + 2 * spec.resolved_cores() + 2

    def build_plan(self, spec: RequestSpec, x0: torch.Tensor, solver: Solver) -> TaskLedger:
        return SrdsPlan(
            x0,
            spec.steps,
            iterations=spec.iterations,
            stop=parse_stop(self.resolved_stop(spec)),
            workers=spec.resolved_cores(),
        )


# The registry, in the order the CLI lists the methods and the refusal names them.
REGISTRY: dict[str, Method] = {
    rules.name: rules for rules in (Chords(), Sequential(), Paradigms(), Srds(), SrdsParareal())
}
NAMES: tuple[str, ...] = tuple(REGISTRY)


def method_for(name: object) -> Method:
    """The method called ``name``; any other name is refused."""
    if isinstance(name, str) and name in REGISTRY:
        return REGISTRY[name]
    raise InvalidRequest(f"method must be one of {NAMES}, got {name!r}")
