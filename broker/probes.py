"""Probes: a corrupt_input claim checked by a worker of a third principal before anyone is struck.

Fetchers of two principals that claim, within ``CLAIM_WINDOW_S``, that a holder served other
bytes than the digest it reported (``Trust.corrupt_claim``) are no proof: two colluding
principals could say it of an honest holder. So the broker asks one worker of a third principal
(neither the holder's nor any claimant's, picked at random among those that may, so that nobody
can arrange to be the one asked) to fetch the holder's copy as served and tell its digest: a
*probe*, a COMPARE without results of its own, answered by COMPARED ``digests``. Other bytes
than the holder reported confirm the claims (the holder is struck); the reported bytes refute
them (each claimant becomes a suspect, and one refuted about holders of
``FALSE_CLAIMS_TO_STRIKE`` principals within ``FALSE_CLAIM_WINDOW_S`` is struck; meanwhile its
word about that holder is not believed: ``disbelieved``). No such
worker, a bound reached, an error, or no answer within ``job_deadline_ceiling_s``: no verdict,
nobody struck (the copy was recomputed all the same). Sans-I/O: the core's handlers call it.
"""

from __future__ import annotations

import enum
import logging
import random
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from chords_mq.algorithms.base import Ref
from chords_mq.broker.config import BrokerConfig
from chords_mq.broker.registry import WorkerInfo, WorkerRegistry
from chords_mq.broker.trust import CLAIM_WINDOW_S
from chords_mq.wire.messages import ComparedMessage, CompareMessage
from chords_mq.wire.named import Holder, NamedInput, NamedRef

log = logging.getLogger("chords.broker")

# Probe ids (a probe COMPARE's task): apart from any check's task id (plan tasks count up from
# 0, replicas from 2**61), below ``X0_REF``'s.
PROBE_BASE = 3 << 61
MAX_PENDING = 16  # probes out at once, over every holder
MAX_PROBES_PER_HOLDER = 3  # probes of one holder per CLAIM_WINDOW_S, answered or not
# A claimant is struck once probes refuted its claims about holders of this many principals
# within FALSE_CLAIM_WINDOW_S. Two, not one: a holder that serves other bytes to some fetchers
# only (by their key) could get one honest claimant refuted; it takes two such holders.
FALSE_CLAIMS_TO_STRIKE = 2
FALSE_CLAIM_WINDOW_S = 3600.0


class Outcome(enum.Enum):
    CONFIRMED = "confirmed"  # the prober fetched other bytes than the holder reported
    REFUTED = "refuted"  # the prober fetched the bytes the holder reported
    NO_VERDICT = "no_verdict"  # an error, no answer in time, the prober gone or quarantined


@dataclass(frozen=True)
class Probe:
    """One probe out: who was asked, about whom, on whose claims, and what the holder reported
    of which result."""

    id: int
    prober: bytes  # the worker asked (its routing id)
    holder: str  # the holder's principal
    holder_name: str
    claimants: frozenset[str]  # the principals whose claims it judges
    request: str
    ref: Ref
    digest: str  # what the holder reported of ``ref``
    since: float


@dataclass(frozen=True)
class Verdict:
    probe: Probe
    outcome: Outcome
    struck: tuple[str, ...] = ()  # REFUTED: claimants past FALSE_CLAIMS_TO_STRIKE
    why: str = ""


class Probes:
    def __init__(
        self,
        config: BrokerConfig,
        registry: WorkerRegistry,
        clock: Callable[[], float],
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.clock = clock
        self.rng = rng if rng is not None else random.Random(config.verify_seed)
        self.pending: dict[int, Probe] = {}  # probe id -> the probe out
        self.next_id = PROBE_BASE
        # holder principal -> when probes of it were sent (the last MAX_PROBES_PER_HOLDER)
        self.sent: OrderedDict[str, list[float]] = OrderedDict()
        # claimant principal -> {holder principal -> when a probe refuted its claim about it},
        # toward a strike (emptied at one)
        self.refuted: OrderedDict[str, dict[str, float]] = OrderedDict()
        # (claimant, holder) -> when a probe last refuted that claimant about that holder
        self.disproved: OrderedDict[tuple[str, str], float] = OrderedDict()
        # sent, confirmed, refuted, no_verdict, no_prober, bounded (chords_probes_total)
        self.counts: dict[str, int] = {}

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def start(
        self,
        holder: WorkerInfo,
        claimants: frozenset[str],
        request: str,
        ref: Ref,
        digest: str | None,
        dtype: str,
    ) -> tuple[bytes, CompareMessage] | None:
        """Fetchers of ``claimants`` (two principals at least) say ``holder`` served other
        bytes of ``ref`` than ``digest``, which it reported: the probe to send (the worker, the
        COMPARE), or None (nothing to check, a bound reached, or no worker of a third
        principal)."""
        now = self.clock()
        if digest is None or holder.data is None:
            return None  # nothing reported, or nowhere to fetch from: nothing to check
        times = [at for at in self.sent.get(holder.principal, []) if now - at <= CLAIM_WINDOW_S]
        if (
            len(self.pending) >= MAX_PENDING
            or len(times) >= MAX_PROBES_PER_HOLDER
            or any(probe.holder == holder.principal for probe in self.pending.values())
        ):
            self._count("bounded")
            log.info("no probe of worker %s now: a bound on probes is reached", holder.name)
            return None
        prober = self._prober({holder.principal, *claimants}, now)
        if prober is None:
            self._count("no_prober")
            log.warning(
                "worker %s: corrupt data claimed by %d principals, and no worker of another "
                "principal may check it: no strike",
                holder.name,
                len(claimants),
            )
            return None
        probe = Probe(
            self.next_id,
            prober.identity,
            holder.principal,
            holder.name,
            claimants,
            request,
            ref,
            digest,
            now,
        )
        self.next_id += 1
        self.pending[probe.id] = probe
        self.sent[holder.principal] = [*times, now]
        self.sent.move_to_end(holder.principal)
        while len(self.sent) > 4 * self.config.max_workers:
            self.sent.popitem(last=False)
        self._count("sent")
        key = holder.principal[4:] if holder.principal.startswith("key:") else None
        theirs = NamedInput("ref", (NamedRef(ref, (Holder(holder.data, key),)),))  # no digest
        message = CompareMessage(
            mine=(), theirs=(theirs,), dtype=dtype, request=request, task=probe.id
        )
        log.info("probe %d: %s checks %s's %s", probe.id, prober.name, holder.name, ref)
        return prober.identity, message

    def _prober(self, excluded: set[str], now: float) -> WorkerInfo | None:
        """A worker of none of ``excluded``'s principals that answers probes, not quarantined
        nor late, not asked another probe already; at random among those."""
        asked = {probe.prober for probe in self.pending.values()}
        candidates = sorted(
            (
                worker
                for worker in self.registry.workers.values()
                if worker.probes
                and worker.principal not in excluded
                and not worker.quarantined(now)
                and worker.identity not in asked
            ),
            key=lambda worker: worker.identity,
        )
        return self.rng.choice(candidates) if candidates else None

    def answered(self, worker: WorkerInfo, message: ComparedMessage) -> Verdict | None:
        """A COMPARED from ``worker``: the verdict of the probe it answers, or None if it
        answers none of ours (a cross-class COMPARE's, or stale)."""
        probe = self.pending.get(message.task if message.task is not None else -1)
        if probe is None or probe.prober != worker.identity or message.request != probe.request:
            return None
        del self.pending[probe.id]
        if message.error is not None or len(message.digests) != 1:
            why = message.error or f"{len(message.digests)} digests for 1 result"
            return self._no_verdict(probe, f"{worker.name} could not fetch: {why[:200]}")
        if message.digests[0] == probe.digest:
            struck = self._refuted(probe, self.clock())
            self._count("refuted")
            why = f"{worker.name} fetched the bytes worker {probe.holder_name} reported"
            return Verdict(probe, Outcome.REFUTED, struck, why)
        self._count("confirmed")
        why = f"{worker.name} fetched other bytes than worker {probe.holder_name} reported too"
        return Verdict(probe, Outcome.CONFIRMED, (), why)

    def disbelieved(self, claimant: str, holder: str) -> bool:
        """Did a probe refute ``claimant``'s claim about ``holder`` within
        ``FALSE_CLAIM_WINDOW_S``? Its word about that holder costs the holder nothing then."""
        at = self.disproved.get((claimant, holder))
        return at is not None and self.clock() - at <= FALSE_CLAIM_WINDOW_S

    def expired(self, now: float) -> list[Verdict]:
        """Probes that will not be answered (the prober gone, quarantined or late, or past
        ``job_deadline_ceiling_s``): no verdict."""
        verdicts = []
        ceiling = self.config.job_deadline_ceiling_s
        for probe in list(self.pending.values()):
            if self.registry.answering(probe.prober, probe.since, now, ceiling):
                continue
            del self.pending[probe.id]
            verdicts.append(self._no_verdict(probe, "unanswered"))
        return verdicts

    def _no_verdict(self, probe: Probe, why: str) -> Verdict:
        self._count("no_verdict")
        log.warning("probe %d of worker %s: no verdict (%s)", probe.id, probe.holder_name, why)
        return Verdict(probe, Outcome.NO_VERDICT, (), why)

    def _refuted(self, probe: Probe, now: float) -> tuple[str, ...]:
        """Count a refuted claim against each claimant; those that reach
        ``FALSE_CLAIMS_TO_STRIKE`` holders within ``FALSE_CLAIM_WINDOW_S`` (then counted from
        zero again)."""
        struck = []
        for claimant in sorted(probe.claimants):
            self.disproved[claimant, probe.holder] = now
            self.disproved.move_to_end((claimant, probe.holder))
            while len(self.disproved) > 4 * self.config.max_workers:
                self.disproved.popitem(last=False)
            holders = {
                holder: at
                for holder, at in self.refuted.pop(claimant, {}).items()
                if now - at <= FALSE_CLAIM_WINDOW_S
            }
            holders[probe.holder] = now
            if len(holders) >= FALSE_CLAIMS_TO_STRIKE:
                struck.append(claimant)
                holders = {}
            self.refuted[claimant] = holders
            while len(self.refuted) > 4 * self.config.max_workers:
                self.refuted.popitem(last=False)
        return tuple(struck)
