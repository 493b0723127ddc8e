"""Init sequences: Theorem 2.5 recursion and the library rule of CHORDS-SPEC section 7."""

from __future__ import annotations

import warnings
from fractions import Fraction as Fr
from itertools import pairwise

import pytest

from chords_mq.algorithms import init_sequence, theorem25_times
from chords_mq.errors import DuplicateCoreWarning, InvalidInitSequence, InvalidPlanConfig


def test_figure2_k4_s10_3():
    assert theorem25_times(4, Fr(10, 3)) == [0, Fr(1, 5), Fr(2, 5), Fr(7, 10)]
    assert theorem25_times(4, 10 / 3) == pytest.approx([0, 0.2, 0.4, 0.7], abs=1e-12)


@pytest.mark.parametrize(
    ("cores", "speedup", "times"),
    [
        (4, 3, [0, Fr(1, 6), Fr(1, 3), Fr(2, 3)]),
        (6, 4, [0, Fr(1, 16), Fr(1, 8), Fr(1, 4), Fr(1, 2), Fr(3, 4)]),
        (8, 6, [0, Fr(1, 24), Fr(1, 12), Fr(1, 6), Fr(1, 3), Fr(1, 2), Fr(2, 3), Fr(5, 6)]),
    ],
)
def test_exact_rationals_times_48_are_the_paper_sequences(cores, speedup, times):
    got = theorem25_times(cores, speedup)
    assert got == times
    assert [48 * t for t in got] == {
        4: [0, 8, 16, 32],
        6: [0, 3, 6, 12, 24, 36],
        8: [0, 2, 4, 8, 16, 24, 32, 40],
    }[cores]


@pytest.mark.parametrize(
    ("cores", "steps", "expected"),
    [
        (4, 50, [0, 8, 16, 32]),
        (6, 50, [0, 3, 6, 12, 24, 36]),
        (8, 50, [0, 2, 4, 8, 16, 24, 32, 40]),
        (4, 75, [0, 12, 24, 48]),
        (6, 75, [0, 5, 9, 18, 36, 54]),
        (8, 75, [0, 3, 6, 12, 24, 36, 48, 60]),
        (4, 100, [0, 16, 32, 64]),
        (6, 100, [0, 6, 12, 24, 48, 72]),
        (8, 100, [0, 4, 8, 16, 32, 48, 64, 80]),
        (4, 25, [0, 4, 8, 16]),
        (6, 25, [0, 2, 3, 6, 12, 18]),
        (8, 25, [0, 1, 2, 4, 8, 12, 16, 20]),
    ],
)
def test_library_rule(cores, steps, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DuplicateCoreWarning)
        assert init_sequence(cores, steps) == expected


@pytest.mark.parametrize("cores", [2, 3, 4, 6, 8, 12])
def test_speedup_equal_to_k_gives_the_uniform_grid_on_horizon_48(cores):
    times = theorem25_times(cores, cores)
    assert [48 * t for t in times] == [Fr(48 * (k - 1), cores) for k in range(1, cores + 1)]


def test_uniform_k8_ablation_sequence():
    assert init_sequence(8, 50, speedup=8) == [0, 6, 12, 18, 24, 30, 36, 42]


def test_single_core_is_zero():
    assert init_sequence(1, 50) == [0]


def test_warns_on_gaps_of_one():
    with pytest.warns(DuplicateCoreWarning, match=r"\[2, 3\]"):
        init_sequence(8, 25)
    with pytest.warns(DuplicateCoreWarning):
        init_sequence([0, 5, 6, 7], 50)


def test_no_warning_for_the_paper_sequences():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DuplicateCoreWarning)
        for cores in (4, 6, 8):
            init_sequence(cores, 50)


def test_explicit_sequence_is_validated_and_returned():
    assert init_sequence([0, 2, 4, 8], 50) == [0, 2, 4, 8]
    assert init_sequence((0, 49), 50) == [0, 49]


@pytest.mark.parametrize(
    ("sequence", "message"),
    [
        ([], "empty"),
        ([1, 2], "start at step 0"),
        ([0, 16, 8], "strictly increasing"),
        ([0, 8, 8], "strictly increasing"),
        ([0, 50], "N - 1 = 49"),
        ([0, 2.0], "integers"),
    ],
)
def test_explicit_sequence_errors(sequence, message):
    with pytest.raises(InvalidInitSequence, match=message):
        init_sequence(sequence, 50)


def test_always_strictly_increasing_within_range():
    for steps in range(1, 120):
        for cores in range(1, min(12, steps) + 1):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DuplicateCoreWarning)
                seq = init_sequence(cores, steps)
            assert len(seq) == cores and seq[0] == 0 and seq[-1] <= steps - 1
            assert all(b > a for a, b in pairwise(seq))


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((9, 8), InvalidPlanConfig),
        ((0, 50), InvalidPlanConfig),
        ((4, 0), InvalidPlanConfig),
        ((4, 50, 1.0), InvalidPlanConfig),
        ((4, 50, 0.5), InvalidPlanConfig),
    ],
)
def test_bad_arguments(args, error):
    with pytest.raises(error):
        init_sequence(*args)


def test_sequence_and_speedup_exclude_each_other():
    with pytest.raises(InvalidPlanConfig):
        init_sequence([0, 8], 50, speedup=3)
