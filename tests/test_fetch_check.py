"""A fetcher checks what it fetched (issue 26): an EVAL by name names, with each holder of an
input, the digest that holder reported of it, and the worker that fetches compares the bytes it
received with it. A holder that serves other bytes than it reported (``--fault serve:zeros``)
is answered FAILED corrupt_input: its copy counts as lost and the input is recomputed by
lineage. Once fetchers of two principals said so (one fetcher's word could be a lie), a worker
of a third principal probes the holder's copy (``broker.probes``): other bytes strike the holder,
the reported bytes make the claimants suspects (struck once refuted about holders of two
principals), and no such worker or no answer strikes nobody. Broker core on a fake clock
(``drive``, as the data-plane tests), and the wire's holder and probe fields."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from chords_mq.algorithms.base import Ref
from chords_mq.broker.core import BrokerConfig, BrokerCore, Send
from chords_mq.broker.probes import (
    FALSE_CLAIM_WINDOW_S,
    MAX_PENDING,
    MAX_PROBES_PER_HOLDER,
    Probe,
)
from chords_mq.broker.testing import FakeClock, failed_for, hello
from chords_mq.broker.trust import CLAIM_WINDOW_S
from chords_mq.wire import (
    ComparedMessage,
    CompareMessage,
    DoneMessage,
    EvalMessage,
    Kind,
    Message,
    WireError,
    decode,
    encode,
    tensor_digest,
)
from chords_mq.wire.named import X0_REF, Holder, NamedInput, NamedRef
from tests.test_broker_dataplane import CHORDS, HonestPool, Run, drive, kill, same_hits

W3 = HonestPool.endpoint("w3")
# Verification on: results carry digests and fetches check them. With --verify off the pool is
# trusted: results carry no digest and nothing is checked (tests/test_no_digests.py).
CHECKED: dict[str, object] = {"verify": "sample", "verify_seed": 0}


@pytest.fixture(scope="module")
def honest() -> Run:
    return drive(CHORDS, data_plane=False)


def serving_zeros(run: Run, core: BrokerCore) -> list[Send]:
    """From the start, w3 serves zeros of each result it keeps (``--fault serve:zeros``)."""
    run.pool.serving[W3] = torch.zeros_like
    for name in ("w2", "w3"):  # a long clean record each
        info = core.registry.get(name.encode())
        assert info is not None
        core.verification.records.clean[info.principal] = 600
    return []


def test_every_holder_an_eval_names_comes_with_the_digest_it_reported():
    run = drive(CHORDS, **CHECKED)
    named = [
        (ref, holder)
        for message in run.sent(Kind.EVAL)
        if isinstance(message, EvalMessage) and message.inputs is not None
        for value in message.inputs
        for ref in value.refs
        for holder in ref.holders
    ]
    assert any(ref.ref != X0_REF for ref, _ in named)
    for ref, holder in named:
        assert holder.digest is not None, (ref.ref, holder)
        if ref.ref == X0_REF:
            assert holder.digest == tensor_digest(run.pool.x0)


def test_a_holder_serving_other_bytes_is_struck_and_its_results_recomputed(honest):
    """w3 keeps and reports honest results but serves zeros: every fetch from it fails the
    digest check, the fetcher answers FAILED corrupt_input, and once two fetchers did, the
    third worker probes w3's copy, sees zeros too, and w3 is struck (quarantined at 2), never
    the fetchers; the output is the honest pool's, bitwise."""
    run = drive(CHORDS, events={0: serving_zeros}, **CHECKED)
    assert isinstance(run.final, DoneMessage), run.final
    same_hits(run, honest)
    core = run.core
    assert core is not None and core.metrics.failures["corrupt_input"] >= 1
    assert core.probes.counts.get("confirmed", 0) >= 1, core.probes.counts
    assert not core.probes.counts.get("refuted"), core.probes.counts
    probes = [
        s for s in run.to_workers if isinstance(s.message, CompareMessage) and not s.message.mine
    ]
    assert probes and all(s.identity != b"w3" for s in probes)
    assert core.metrics.failures.get("lost_input") is None
    struck = {principal for principal, count in core.trust.strikes.items() if count}
    assert struck and all("w3" in principal for principal in struck), struck
    # the liar's record starts again (from its 600: what it ran after the strike, if anything),
    # no other's
    clean = core.verification.records.clean
    assert all(n < 600 for p, n in clean.items() if "w3" in p), clean
    assert [p for p, n in clean.items() if "w2" in p and n >= 600], clean
    assert run.final.stats["replays"] > 0


@pytest.mark.parametrize(
    "placement",
    [{}, {"placement": "fifo", "link_placement": False}],
    ids=["eft", "fifo"],  # fifo: no other gate keeps the accused from a queue of recomputations
)
def test_a_holder_accused_of_serving_corrupt_data_recomputes_nothing_of_the_request(
    honest, placement, caplog
):
    """No probe answers (the prober is busy, as under CI's load; here: never). Before, each
    result w3 made and a fetcher caught was recomputed, by lineage, wherever a worker was idle
    first: often on w3 again, which served it corrupt again. 241 claims and 1024 replays later
    the request failed (recovery_too_large; seen once in CI, with real processes, in
    tests/integration/test_fetch_check.py). Now a holder a fetcher accused runs no
    recomputation of that request (``RequestSession.accuse``): the request ends with the
    honest pool's hits, and w3 was never sent a recomputation after its first accusation
    (nor, where only recomputations are ready, an EVAL of none)."""
    sent_to_accused: list[int] = []

    def busy_prober(run: Run, identity: bytes, job: Message) -> Message | None:
        if isinstance(job, CompareMessage) and not job.mine:
            return None  # the probe is never answered: nobody is struck
        session = None if run.core is None else next(iter(run.core.sessions.values()), None)
        if session is not None and isinstance(job, EvalMessage) and identity in session.accused:
            sent_to_accused.extend(e.task for e in job.entries if e.task in session.replays)
        return run.pool.answer(job, HonestPool.endpoint(identity.decode()))

    with caplog.at_level(logging.ERROR, logger="chords.broker"):
        run = drive(CHORDS, events={0: serving_zeros}, answer=busy_prober, **placement, **CHECKED)
    assert isinstance(run.final, DoneMessage), run.final
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    same_hits(run, honest)
    core = run.core
    assert core is not None and core.metrics.failures["corrupt_input"] >= 2
    assert not core.probes.counts.get("confirmed") and not struck(core)
    assert not sent_to_accused
    assert 0 < run.final.stats["replays"] < 1024


def test_with_every_worker_accused_recomputations_still_run():
    """Every worker of the request accused (here by hand, after the first answer): nobody
    is avoided, or the recomputations would wait for a worker the request will not use. The
    request ends (DONE here: every worker serves honestly), not waits."""

    def accuse_all(run: Run, core: BrokerCore) -> list[Send]:
        (session,) = core.sessions.values()
        for identity in session.prepared | session.preparing:
            session.accuse(identity)
        assert session.accused and session.tasks.avoid is not None
        return []

    # then w0 is lost: what it held is recomputed, on the accused others
    run = drive(CHORDS, events={1: accuse_all, 8: kill("w0")}, **CHECKED)
    assert isinstance(run.final, DoneMessage), run.final
    assert run.final.stats["replays"] >= 1


def finished(run: Run, honest: Run) -> BrokerCore:
    """``run`` ended DONE with the honest pool's hits; its broker core."""
    assert isinstance(run.final, DoneMessage), run.final
    same_hits(run, honest)
    assert run.core is not None
    return run.core


def unreachable(holder: str):  # type: ignore[no-untyped-def]
    """A ``HonestPool._fetch`` for which ``holder`` answers no fetch (a firewalled data port):
    an input only it holds is FAILED lost_input naming it; others are fetched elsewhere."""
    endpoint = HonestPool.endpoint(holder)
    fetch = HonestPool._fetch

    def _fetch(pool: HonestPool, at: str, request: str, named: NamedRef) -> torch.Tensor:
        others = tuple(h for h in named.holders if h.endpoint != endpoint)
        if len(others) == len(named.holders):
            return fetch(pool, at, request, named)
        if not others:
            raise LookupError(named, None)  # (the pool names the last holder: this one)
        return fetch(pool, at, request, dataclasses.replace(named, holders=others))

    return _fetch


def test_a_holder_whose_copies_nobody_gets_leaves_the_request_not_its_readers(honest, monkeypatch):
    """w3 answers no fetch. Before, each reader that could not get w3's copies passed
    --max-lost-inputs and left the request (3 of 3 honest workers, "FAILED lost_input, too
    often") and w3 finished it alone. Now, once workers of two principals could not get its
    copies, w3 leaves the request: its copies are recomputed elsewhere, and it is sent no
    more of the request's work. The bits are the honest pool's."""
    monkeypatch.setattr(HonestPool, "_fetch", unreachable("w3"))
    after: list[Message] = []

    def answer(run: Run, identity: bytes, job: Message) -> Message | None:
        session = None if run.core is None else next(iter(run.core.sessions.values()), None)
        if identity == b"w3" and session is not None and b"w3" in session.excluded:
            after.append(job)
        return run.pool.answer(job, HonestPool.endpoint(identity.decode()))

    core = finished(drive(CHORDS, answer=answer, **CHECKED), honest)
    assert core.metrics.failures["holder_unreachable"] == 1, core.metrics.failures
    assert not core.metrics.failures.get("inputs_unreachable"), core.metrics.failures
    assert not [job for job in after if isinstance(job, EvalMessage)]


def test_a_holder_that_leaves_mid_task_has_its_task_run_again_elsewhere(honest):
    """Two principals' claims make w3 leave while it runs a task of the request: that task
    is taken back (run again elsewhere, its answer stale), w3 holds nothing of the request,
    and the request ends with the honest pool's bits."""
    from chords_mq.broker.outbox import Outbox

    left: list[tuple[int, ...]] = []

    def leave(run: Run, core: BrokerCore) -> list[Send]:
        if left or not core.sessions:
            return []
        (session,) = core.sessions.values()
        w3, w0, w1 = (core.registry.get(n) for n in (b"w3", b"w0", b"w1"))
        assert w3 is not None and w0 is not None and w1 is not None
        if w3.job is None or w3.job.request != session.id or w3.job.kind is not Kind.EVAL:
            return []
        running = tuple(task.id for task, _ in w3.job.tasks)
        out = Outbox(core.epoch)
        handlers = core._workers
        assert not handlers._unreachable(out, session, w3, w0)  # one principal: no
        assert handlers._unreachable(out, session, w3, w1)  # two: w3 leaves
        assert w3.job is None and b"w3" in session.excluded
        assert not set(running) & {
            t for t, (_, _, at) in session.tasks.in_flight.items() if at == b"w3"
        }
        left.append(running)
        return out.sends

    run = drive(CHORDS, events={n: leave for n in range(2, 600, 3)}, **CHECKED)
    assert left, "w3 never ran a task of the request"
    assert isinstance(run.final, DoneMessage), run.final
    same_hits(run, honest)


def test_one_principals_lost_input_claims_never_make_a_holder_leave(honest):
    """w0 claims lost_input about every input another worker holds (a lie, or its own broken
    link): one principal's word. No holder leaves the request; past --max-lost-inputs w0
    does, as before, and the bits are the honest pool's."""
    core = finished(drive(CHORDS, answer=lying("w0", "lost_input"), **CHECKED), honest)
    assert not core.metrics.failures.get("holder_unreachable"), core.metrics.failures
    assert core.metrics.failures["inputs_unreachable"] == 1, core.metrics.failures


def lying(liar: str, code: str = "corrupt_input"):  # type: ignore[no-untyped-def]
    """``liar`` answers each EVAL that fetches a result another worker holds with FAILED
    ``code`` (corrupt_input, or lost_input) about that (honest) holder."""
    own = HonestPool.endpoint(liar)

    def answer(run: Run, identity: bytes, job: Message) -> Message | None:
        if identity == liar.encode() and isinstance(job, EvalMessage) and job.inputs:
            for value in job.inputs:
                for named in value.refs:
                    others = [h.endpoint for h in named.holders if h.endpoint != own]
                    if named.ref != X0_REF and others:
                        lie = f"input {named.ref}: {others[0]} served other bytes than its digest"
                        if code == "lost_input":
                            lie = f"input {named.ref}: {others[0]} did not answer"
                        return dataclasses.replace(
                            failed_for(job, code, lie),
                            lost_ref=[named.ref.task, named.ref.target],
                            lost_holder=others[0],
                        )
        return run.pool.answer(job, HonestPool.endpoint(identity.decode()))

    return answer


def test_one_lying_fetcher_gets_no_honest_holder_struck(honest):
    """w2 claims corrupt data of every holder it fetches from: each claim costs it its task and
    makes the holder's copy count as lost, but one principal's word is no strike: no honest
    worker is struck or quarantined, and the output is the honest pool's, bitwise. (Verification
    off: with it on, each claim makes its holder a suspect again, whose tasks are replicated,
    and the claims then spend the request's 1024 replays: recovery_too_large. With it off the
    copies carry no digest, so each claim is a lost input: tests/test_no_digests.py.)"""
    run = drive(CHORDS, answer=lying("w2"))
    core = run.core
    assert core is not None and core.metrics.failures["lost_input"] >= 2
    assert isinstance(run.final, DoneMessage), run.final
    same_hits(run, honest)
    assert not [p for p, count in core.trust.strikes.items() if count], core.trust.strikes
    assert not core.trust.quarantined()


def test_a_corrupt_claim_is_confirmed_only_by_another_principal_in_time():
    run = drive(CHORDS, workers=1)  # a core with a fake clock
    core = run.core
    assert core is not None
    trust, clock = core.trust, core.clock
    assert not trust.corrupt_claim("holder", "liar")
    assert not trust.corrupt_claim("holder", "liar")  # the same principal again: no proof
    assert trust.corrupt_claim("holder", "other")  # a second principal: confirmed
    assert not trust.corrupt_claim("holder2", "liar")
    clock.now += CLAIM_WINDOW_S + 1  # type: ignore[attr-defined]
    assert not trust.corrupt_claim("holder2", "other")  # the first claim was forgotten
    for n in range(10 * core.config.max_workers):  # bounded
        trust.corrupt_claim(f"h{n}", "liar")
    assert len(trust.claims) <= 4 * core.config.max_workers


def test_a_holder_digest_is_optional_on_the_wire_and_checked():
    digest = "0123456789abcdef" * 2
    for holder in (Holder("tcp://a:1"), Holder("tcp://a:1", None, digest)):
        wire = ["ref", [[3, 4, [holder.to_wire()]]], False]
        parsed = NamedInput.from_wire("EVAL", wire)
        assert parsed.refs[0].holders == (holder,)
    for bad in ("0123", digest.upper(), 7):
        with pytest.raises(WireError, match="digest"):
            NamedInput.from_wire("EVAL", ["ref", [[3, 4, [["tcp://a:1", None, bad]]]], False])


# -- probes: a third principal checks the claims (broker/probes.py) ----------------------------

DIGEST = tensor_digest(torch.ones(4))
REF = Ref(3, 4)
OTHER = tensor_digest(torch.zeros(4))


def pool(*names: str, **changes: object) -> BrokerCore:
    """A core on a fake clock with these workers registered (each answers probes)."""
    settings: dict[str, object] = {"liveness": 10**6, "heartbeat_s": 10**6, "verify_seed": 0}
    config = BrokerConfig(**{**settings, **changes})  # type: ignore[arg-type]
    core = BrokerCore(config, FakeClock(), epoch=7)
    for name in names:
        core.worker_message(name.encode(), hello(name, "m", data=HonestPool.endpoint(name)))
    return core


def p(core: BrokerCore, name: str) -> str:
    info = core.registry.get(name.encode())
    assert info is not None
    return info.principal


def claimed(core: BrokerCore, holder: str, *claimants: str, ref: Ref = REF):  # type: ignore[no-untyped-def]
    """Fetchers of ``claimants`` claimed corrupt data of ``holder``'s ``ref``: the probe sent."""
    for claimant in claimants:
        core.trust.corrupt_claim(p(core, holder), p(core, claimant))
    info = core.registry.get(holder.encode())
    assert info is not None
    return core.probes.start(
        info, core.trust.claimants(p(core, holder)), "r1", ref, DIGEST, "float32"
    )


def answer(core: BrokerCore, sent, **fields: object) -> list[Send]:  # type: ignore[no-untyped-def]
    identity, probe = sent
    reply = ComparedMessage(**fields).ids(probe.stamped(core.epoch))  # type: ignore[arg-type]
    return core.worker_message(identity, reply)


def struck(core: BrokerCore) -> set[str]:
    return {principal for principal, count in core.trust.strikes.items() if count}


def test_a_probe_goes_to_a_worker_of_neither_the_holder_nor_a_claimant_and_names_no_digest():
    for seed in range(8):  # bounded: the prober is picked at random among those that may
        core = pool("h", "a", "b", "c", "d", verify_seed=seed)
        sent = claimed(core, "h", "a", "b")
        assert sent is not None
        identity, probe = sent
        assert identity in (b"c", b"d")
        assert probe.mine == () and len(probe.theirs) == 1
        (named,) = probe.theirs[0].refs
        assert named.ref == Ref(3, 4) and named.holders == (Holder(HonestPool.endpoint("h")),)


def test_a_probe_that_fetches_other_bytes_strikes_the_holder_not_the_claimants():
    core = pool("h", "a", "b", "c")
    sent = claimed(core, "h", "a", "b")
    assert sent is not None and sent[0] == b"c"
    answer(core, sent, digests=(OTHER,))
    assert struck(core) == {p(core, "h")}
    assert core.metrics.failures["corrupt_confirmed"] == 1
    assert not core.trust.claims.get(p(core, "h"))  # settled: new claims count anew
    assert not core.probes.pending


def test_refuted_claims_make_the_claimants_suspects_and_strike_them_at_two_holders():
    """The probe fetched the bytes the holder reported: the holder is not struck, each
    claimant's clean record starts again; refuted about a second holder's principal within the
    hour, each claimant gets a strike (twice about one holder is one)."""
    core = pool("h", "g", "a", "b", "c", "d")
    records = core.verification.records
    for name in ("h", "a", "b"):
        records.clean[p(core, name)] = 600
    for round_ in range(2):  # the same holder twice: one refuted claim each
        sent = claimed(core, "h", "a", "b", ref=Ref(3, round_))
        assert sent is not None and sent[0] in (b"c", b"d", b"g")
        answer(core, sent, digests=(DIGEST,))
        assert not struck(core), core.trust.strikes
    assert core.metrics.failures["corrupt_refuted"] == 4  # a claimant each, twice
    assert records.clean.get(p(core, "h")) == 600  # the holder keeps its record
    assert p(core, "a") not in records.clean and p(core, "b") not in records.clean
    core.clock.now += FALSE_CLAIM_WINDOW_S / 2  # type: ignore[attr-defined]
    sent = claimed(core, "g", "a", "b")
    assert sent is not None
    answer(core, sent, digests=(DIGEST,))
    assert struck(core) == {p(core, "a"), p(core, "b")}
    assert core.metrics.failures["false_claims"] == 2


def test_refuted_claims_an_hour_apart_strike_nobody():
    core = pool("h", "g", "a", "b", "c")
    for holder in ("h", "g"):
        sent = claimed(core, holder, "a", "b")
        assert sent is not None
        answer(core, sent, digests=(DIGEST,))
        core.clock.now += FALSE_CLAIM_WINDOW_S + 1  # type: ignore[attr-defined]
    assert not struck(core)


def test_no_worker_of_a_third_principal_means_no_probe_and_no_strike():
    """Only the holder and the claimants may probe (the others cannot: no "probe" in their
    HELLO, or quarantined): no probe, nobody struck, the claims stay."""
    core = pool("h", "a", "b")
    core.worker_message(b"old", hello("old", "m", data=HonestPool.endpoint("old"), capabilities=[]))
    core.worker_message(b"q", hello("q", "m", data=HonestPool.endpoint("q")))
    q = core.registry.get(b"q")
    assert q is not None
    q.quarantined_until = 10**9
    assert claimed(core, "h", "a", "b") is None
    assert core.probes.counts["no_prober"] == 1 and not core.probes.pending
    assert not struck(core) and len(core.trust.claimants(p(core, "h"))) == 2


def test_a_probe_unanswered_in_time_or_failed_is_no_verdict():
    """No verdict: nobody struck, no claimant suspected, the claims stay for a later probe;
    an answer after the deadline, or from another worker, is ignored."""
    core = pool("h", "a", "b", "c", "d")
    records = core.verification.records
    records.clean[p(core, "a")] = 600
    sent = claimed(core, "h", "a", "b")
    assert sent is not None
    other = b"d" if sent[0] == b"c" else b"c"
    answer(core, (other, sent[1]), digests=(OTHER,))  # not the worker asked
    assert core.probes.pending and not struck(core)
    core.clock.now += core.config.job_deadline_ceiling_s / 2  # type: ignore[attr-defined]
    core.tick(core.clock())
    assert core.probes.pending  # not late yet
    core.clock.now += core.config.job_deadline_ceiling_s  # type: ignore[attr-defined]
    core.tick(core.clock())
    assert not core.probes.pending and core.probes.counts["no_verdict"] == 1
    answer(core, sent, digests=(OTHER,))  # too late: stale
    sent = claimed(core, "h", "a")  # the claims stayed: probed again
    assert sent is not None
    answer(core, sent, error="input 3:4 not fetched from tcp://h:1: no answer")
    assert core.probes.counts["no_verdict"] == 2 and not core.probes.pending
    assert not struck(core) and records.clean.get(p(core, "a")) == 600
    assert len(core.trust.claimants(p(core, "h"))) == 2
    assert not core.metrics.failures.get("corrupt_refuted")


def test_probes_are_bounded_per_holder_and_in_all():
    core = pool("h", "g", "a", "b", *[f"x{n}" for n in range(MAX_PENDING + 2)])
    first = claimed(core, "h", "a", "b")
    assert first is not None
    assert claimed(core, "h", "a", "b") is None  # one out per holder at a time
    for n in range(MAX_PROBES_PER_HOLDER - 1):
        answer(core, first, error="gone")
        first = claimed(core, "h", "a", "b")
        assert first is not None, n
    answer(core, first, error="gone")
    assert claimed(core, "h", "a", "b") is None  # MAX_PROBES_PER_HOLDER in the window
    core.clock.now += CLAIM_WINDOW_S + 1  # type: ignore[attr-defined]
    assert claimed(core, "h", "a", "b") is not None
    for n in range(MAX_PENDING - 1):
        holder = f"x{n}"
        assert claimed(core, holder, "a", "b") is not None, n
    assert len(core.probes.pending) == MAX_PENDING
    assert claimed(core, "g", "a", "b") is None
    assert core.probes.counts["bounded"] == 3


def framing(victim: str, *liars: str):  # type: ignore[no-untyped-def]
    """Each of ``liars`` answers an EVAL that fetches a result ``victim`` (honest) holds with
    FAILED corrupt_input about it: two principals collude to get it struck."""
    target = HonestPool.endpoint(victim)

    def answer(run: Run, identity: bytes, job: Message) -> Message | None:
        if identity.decode() in liars and isinstance(job, EvalMessage) and job.inputs:
            for value in job.inputs:
                for named in value.refs:
                    if named.ref != X0_REF and any(h.endpoint == target for h in named.holders):
                        lie = f"input {named.ref}: {target} served other bytes than its digest"
                        return dataclasses.replace(
                            failed_for(job, "corrupt_input", lie),
                            lost_ref=[named.ref.task, named.ref.target],
                            lost_holder=target,
                        )
        return run.pool.answer(job, HonestPool.endpoint(identity.decode()))

    return answer


def test_two_colluding_fetchers_get_no_honest_holder_struck(honest):
    """w1 and w3 both claim corrupt data of w0 (which would have struck it before probes):
    w2, of neither principal, probes w0's copy and fetches the bytes w0 reported, so w0 is not
    struck and the claimants are suspects instead; the output is the honest pool's, bitwise."""
    run = drive(CHORDS, answer=framing("w0", "w1", "w3"), **CHECKED)
    core = run.core
    assert core is not None and isinstance(run.final, DoneMessage), run.final
    same_hits(run, honest)
    assert core.probes.counts.get("refuted", 0) >= 1, core.probes.counts
    assert not core.probes.counts.get("confirmed"), core.probes.counts
    probed = {s.identity for s in run.to_workers if isinstance(s.message, CompareMessage)}
    assert probed == {b"w2"}
    assert not struck(core), core.trust.strikes
    assert core.metrics.failures["corrupt_refuted"] >= 2


def test_colluders_refuted_about_a_holder_are_not_believed_about_it_again(honest):
    """w1 and w2 keep claiming corrupt data of w0. Once a probe refuted them, their claims about
    w0 no longer cost its copy (nothing recomputed): each such claimant leaves the request, so
    the request finishes bitwise instead of spending its replays on their word (it failed
    recovery_too_large without this), and no honest worker is struck."""
    run = drive(CHORDS, answer=framing("w0", "w1", "w2"), **CHECKED)
    core = run.core
    assert core is not None and isinstance(run.final, DoneMessage), run.final
    same_hits(run, honest)
    assert core.probes.counts.get("refuted", 0) >= 1, core.probes.counts
    assert core.metrics.failures["corrupt_disbelieved"] >= 1
    assert not {s for s in struck(core) if "w0" in s or "w3" in s}, core.trust.strikes


def test_a_refuted_claimant_is_disbelieved_about_that_holder_for_an_hour():
    core = pool("h", "g", "a", "b", "c")
    sent = claimed(core, "h", "a", "b")
    assert sent is not None
    answer(core, sent, digests=(DIGEST,))
    probes = core.probes
    assert probes.disbelieved(p(core, "a"), p(core, "h"))
    assert not probes.disbelieved(p(core, "a"), p(core, "g"))  # about that holder only
    assert not probes.disbelieved(p(core, "c"), p(core, "h"))
    core.clock.now += FALSE_CLAIM_WINDOW_S + 1  # type: ignore[attr-defined]
    assert not probes.disbelieved(p(core, "a"), p(core, "h"))
    for n in range(10 * core.config.max_workers):  # bounded
        refuted = Probe(n, b"c", f"x{n}", f"x{n}", frozenset({"a"}), "r1", REF, DIGEST, 0.0)
        probes._refuted(refuted, core.clock())
    assert len(probes.disproved) <= 4 * core.config.max_workers


def test_a_probe_travels_as_a_compare_without_mine_and_its_answer_as_digests():
    theirs = NamedInput("ref", (NamedRef(Ref(3, 4), (Holder("tcp://h:1"),)),))
    probe = CompareMessage(mine=(), theirs=(theirs,), dtype="float32", request="r1", task=9)
    back = decode(encode(probe))
    assert isinstance(back, CompareMessage) and back.mine == () and back.theirs == (theirs,)
    reply = ComparedMessage(digests=(DIGEST,)).ids(probe)
    back = decode(encode(reply))
    assert isinstance(back, ComparedMessage) and back.digests == (DIGEST,)
    assert "digests" not in ComparedMessage(distances=((0.0, 0.0),)).body()
    for bad in (["xyz"], [DIGEST.upper()], [7], DIGEST):
        with pytest.raises(WireError, match="digest"):
            ComparedMessage.parse({}, {"distances": [], "digests": bad}, {})
    with pytest.raises(WireError, match="theirs"):
        CompareMessage.parse({}, {"mine": [], "theirs": [], "dtype": "float32"}, {})
