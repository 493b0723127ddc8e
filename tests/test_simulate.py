"""The placement simulator (broker/simulate.py): the real BrokerCore on simulated pools.

These are decisions, not timings: fake time is exact, so a slow worker that gets a critical
task shows up as a later DONE in every run."""

from __future__ import annotations

import warnings

import pytest

from chords_mq.broker.simulate import simulate
from chords_mq.request import RequestSpec

FASTEST = RequestSpec(model="sim", steps=50, cores=8, stop="core-index:1")


def run(speeds: list[float], policy: str = "eft", spec: RequestSpec = FASTEST):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # K=8's default init sequence has a gap of one
        return simulate(speeds, spec, policy)


def test_a_uniform_pool_runs_at_the_critical_path():
    report = run([0.03] * 8)
    assert report.done_s == pytest.approx(report.critical_rounds * 0.03)
    assert report.done_s == pytest.approx(report.lower_bound_s)


@pytest.mark.parametrize("slow", [0.09, 0.15, 2.0])
def test_adding_a_slow_worker_never_slows_the_pool(slow):
    alone = run([0.03] * 7)
    mixed = run([0.03] * 7 + [slow])
    assert mixed.done_s <= alone.done_s * 1.0 + 1e-9
    assert mixed.per_worker[-1] == 0  # it gets no task on the critical chains
    fifo = run([0.03] * 7 + [slow], "fifo")
    assert fifo.done_s > mixed.done_s  # today's FIFO let the slow worker hold them up


def test_four_fast_and_four_slow_beat_eight_slow():
    mixed = run([0.03] * 4 + [0.09] * 4)
    slow = run([0.09] * 8)
    assert mixed.done_s <= 0.65 * slow.done_s


@pytest.mark.parametrize("cores", [4, 8])
def test_placement_changes_no_result(cores):
    spec = RequestSpec(model="sim", steps=30, cores=cores)
    uniform = run([0.03] * cores, spec=spec)
    mixed = run([0.03] * (cores - 1) + [0.2, 0.5], spec=spec)
    assert uniform.evaluations == mixed.evaluations  # the same dataflow, whoever runs it


def test_fifo_depends_on_which_worker_registers_first_and_eft_does_not():
    """K=4 on 4 fast workers and a slow one: FIFO prepares whoever is idle first, so the slow
    worker is in the request for some registration orders (a later DONE) and out for others;
    placement by earliest finish time leaves it out whatever the order."""
    spec = RequestSpec(model="sim", steps=50, cores=4, stop="core-index:1")
    pool = [0.03] * 4 + [0.15]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fifo = {round(simulate(pool, spec, "fifo", seed=s).done_s, 6) for s in range(8)}
        eft = {round(simulate(pool, spec, "eft", seed=s).done_s, 6) for s in range(8)}
        again = simulate(pool, spec, "fifo", seed=3).done_s
        same = simulate(pool, spec, "fifo", seed=3).done_s
    assert len(fifo) > 1  # the order matters to FIFO
    assert len(eft) == 1  # and not to the speed model
    assert min(fifo) == pytest.approx(eft.pop())
    assert again == same  # a seed is one order, every time


def test_jitter_lengthens_evaluations_within_its_bound():
    exact = run([0.03] * 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        noisy = simulate([0.03] * 8, FASTEST, jitter=0.1, seed=1)
    assert exact.done_s < noisy.done_s <= exact.done_s * 1.1 + 1e-9
