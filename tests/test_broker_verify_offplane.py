"""Verification off the data plane (``--no-data-plane``, and plans that read their latents'
values such as ParaDIGMS), in the broker core with a fake clock: the results come through the
broker as tensors, so the broker digests a sampled one and its replica's itself, compares them
bitwise in one device class and within the tolerance across two (no COMPARE), and holds every
sampled result, counted in the request's bytes, until a replica agrees: no lineage could undo
one the plan took in. A worker outvoted after its unsampled results went into the plan fails
the request (typed), since nothing can recompute them there. And on the data plane, a hit's
latent that a DECODE returns must be the held result's own bytes, where the hit is one."""

from __future__ import annotations

import dataclasses

import pytest

from chords_mq.algorithms.base import distinct_bytes
from chords_mq.broker.core import BrokerCore, Send
from chords_mq.broker.testing import HonestPool
from chords_mq.request import RequestSpec
from chords_mq.wire import DecodedMessage, DoneMessage, ErrorMessage, Kind, Message
from tests.test_broker_dataplane import CHORDS, MODEL, Run, drive, kill, same_hits
from tests.test_broker_verify import counts, faulty, scaled, strikes, zeros
from tests.test_broker_verify_cross import GPU, OTHER, close_hits, faults, pool

SEQUENTIAL = RequestSpec(model=MODEL, steps=6, method="sequential", seed=0)


def off(spec: RequestSpec = CHORDS, workers: int = 4, **config: object) -> Run:
    settings: dict[str, object] = {"verify": "sample", "verify_seed": 0, **config}
    return drive(spec, workers=workers, data_plane=False, **settings)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def honest() -> Run:
    return drive(CHORDS, data_plane=False)  # verification off


def test_off_the_plane_an_honest_pool_is_verified_and_its_hits_unchanged(honest):
    seen: list[tuple[int, int]] = []

    def look(run: Run, core: BrokerCore) -> list[Send]:
        (session,) = core.sessions.values()
        held = session.verifying.tensors()
        if held:  # a held result and its replica's count in the request's bytes
            others = session.plan.held_tensors() if session.plan is not None else []
            others += session.results.tensors() + session.tasks.tensors()
            seen.append((session.held_bytes() - distinct_bytes(others), distinct_bytes(held)))
        return []

    run = off(events={n: look for n in range(10, 60, 3)})
    assert isinstance(run.final, DoneMessage), run.final
    same_hits(run, honest)
    assert not run.sent(Kind.COMPARE) and run.final.stats["replays"] == 0
    assert counts(run)["replicas"] == counts(run)["agreed"] > 0 and not strikes(run)
    assert run.final.stats["verify_evaluations"] == counts(run)["replicas"]
    assert seen and all(extra >= held > 0 for extra, held in seen), seen


def test_off_the_plane_the_clean_record_lowers_the_rate(honest):
    run = off(verify_trusted_after=2, verify_half_life=1)
    assert isinstance(run.final, DoneMessage), run.final
    same_hits(run, honest)
    assert 0 < counts(run)["replicas"] < run.final.stats["evaluations"] / 2


@pytest.mark.parametrize("fault", [zeros, scaled(1.001)], ids=["zeros", "scale"])
def test_off_the_plane_a_fast_faulty_worker_is_outvoted_and_the_hits_stay_honest(honest, fault):
    run = off(events={0: faulty(w3=fault)}, speeds={"w3": (0, 0.2)}, quarantine_after=1)
    assert isinstance(run.final, DoneMessage), run.final
    same_hits(run, honest)  # held until a replica agreed: no wrong value reached the plan
    assert counts(run)["mismatches"] >= 1 and counts(run)["outvoted"] >= 1
    assert set(strikes(run)) == {"w3"}
    assert run.core is not None and [w.name for w in run.core.quarantined()] == ["w3"]


def test_off_the_plane_a_trusted_workers_sampled_result_is_held_too(honest):
    """w0 is trusted after one agreement (then sampled at a rate just under 1, so not held on
    the data plane), and wrong from then on: off the plane its sampled results are held all
    the same, so it is outvoted and the hits stay honest."""
    run = off(
        events={0: faulty(), 12: faulty(w0=zeros)},
        verify_trusted_after=0,
        verify_half_life=10**6,
    )
    assert isinstance(run.final, DoneMessage), run.final
    same_hits(run, honest)
    assert "w0" in strikes(run)


def test_off_the_plane_a_worker_outvoted_after_its_unsampled_results_fails_the_request():
    """w0's results went into the plan unsampled once it was trusted; then it turns wrong and a
    sampled one is outvoted: nothing off the plane can recompute the others, so the request
    fails, typed, rather than finish with them."""
    run = off(
        events={20: faulty(w0=zeros)},
        verify_trusted_after=2,
        verify_half_life=1,
        verify_floor=0.3,
    )
    assert isinstance(run.final, ErrorMessage), run.final
    assert run.final.code == "unverifiable" and "outvoted" in run.final.message
    assert strikes(run) == {"w0": 1}


def test_off_the_plane_a_replica_nobody_is_left_to_run_lets_the_result_out():
    honest2 = drive(SEQUENTIAL, workers=2, data_plane=False)
    run = off(SEQUENTIAL, workers=2, events={3: kill("w1")})
    assert isinstance(run.final, DoneMessage), run.final
    same_hits(run, honest2)
    assert counts(run)["unverifiable"] >= 1


def test_off_the_plane_the_broker_compares_two_classes_itself():
    """w1 is of another device class and cannot compare: its results, 1e-6 off, are judged by
    the broker within float32's tolerance (no COMPARE goes out)."""
    events = {0: pool(("w1", GPU, False)), 1: faults(w1=scaled(1 + 1e-6))}
    run = drive(SEQUENTIAL, workers=0, events=events, data_plane=False, verify="sample")
    assert isinstance(run.final, DoneMessage), run.final
    close_hits(run, drive(SEQUENTIAL, workers=1, data_plane=False), 1e-5)
    assert counts(run)["compared_agree"] >= 1 and "unverifiable" not in counts(run)
    assert not run.sent(Kind.COMPARE) and not strikes(run)


def test_off_the_plane_a_worker_of_another_class_past_the_tolerance_is_outvoted():
    events = {
        0: pool(("w1", GPU, False), ("w2", OTHER, False)),
        1: faults(w1=scaled(1.001), w2=scaled(1 - 1e-6)),
    }
    run = drive(SEQUENTIAL, workers=0, events=events, data_plane=False, verify="sample")
    assert isinstance(run.final, DoneMessage), run.final
    close_hits(run, drive(SEQUENTIAL, workers=1, data_plane=False), 1e-5)
    assert counts(run)["compared_differ"] >= 1 and strikes(run) == {"w1": 1}
    assert not run.sent(Kind.COMPARE)


def test_paradigms_runs_off_the_plane_and_is_verified_there():
    """ParaDIGMS reads its window's values, so it runs off the data plane whatever the flag:
    its results are verified there, and a fast worker returning zeros changes no bit."""
    spec = RequestSpec(model=MODEL, method="paradigms", steps=12, cores=4, seed=0)
    want = drive(spec, workers=4)  # (the data plane on, verification off)
    run = drive(
        spec, workers=4, events={0: faulty(w3=zeros)}, speeds={"w3": (0, 0.2)}, verify="sample"
    )
    assert isinstance(run.final, DoneMessage), run.final
    assert run.core is not None and not any(s.named for s in run.core.sessions.values())
    same_hits(run, want)
    assert counts(run)["outvoted"] >= 1 and set(strikes(run)) == {"w3"}


# -- decoded hits on the data plane: a hit that is one held result comes back with its digest ----


def test_a_decoder_returning_a_hits_latent_other_than_its_holders_is_a_bad_result():
    """On the data plane a DECODE returns the hit's latent, computed by its decoder: where the
    hit is one held result, its bytes must have the digest its holders reported. The first
    decoder lies (x1.001): its answer is a bad result, another worker decodes the hit, and the
    hits are the honest pool's."""
    lied: list[bytes] = []

    def lying_decoder(run: Run, identity: bytes, job: Message) -> Message | None:
        reply = run.pool.answer(job, HonestPool.endpoint(identity.decode()))
        if isinstance(reply, DecodedMessage) and reply.latent is not None and not lied:
            lied.append(identity)
            reply = dataclasses.replace(reply, latent=reply.latent * 1.001)
        return reply

    run = drive(CHORDS, answer=lying_decoder, verify="sample", verify_seed=0)  # with digests
    assert isinstance(run.final, DoneMessage), run.final
    same_hits(run, drive(CHORDS))
    assert lied and run.core is not None and run.core.metrics.failures["digest"] == 1
