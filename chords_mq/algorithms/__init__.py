"""Sampling methods as pure plans (no I/O): the same object runs in-process, in the broker and
in benchmarks. See :mod:`chords_mq.algorithms.base` for the protocol."""

from chords_mq.algorithms.base import Hit, Plan, StopRule, Task
from chords_mq.algorithms.chords import ChordsPlan, Rectification, hit_rounds
from chords_mq.algorithms.init_sequence import (
    default_speedup,
    init_sequence,
    theorem25_times,
    validate_init_sequence,
)
from chords_mq.algorithms.sequential import SequentialPlan
from chords_mq.algorithms.stopping import CoreIndex, Residual, parse_stop

__all__ = [
    "ChordsPlan",
    "CoreIndex",
    "Hit",
    "Plan",
    "Rectification",
    "Residual",
    "SequentialPlan",
    "StopRule",
    "Task",
    "default_speedup",
    "hit_rounds",
    "init_sequence",
    "parse_stop",
    "theorem25_times",
    "validate_init_sequence",
]
