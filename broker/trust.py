"""Which workers may get work: confirmed bad results (strikes) and quarantines, per principal.

The principal is a worker's CURVE key (or, insecure, its connection), so a quarantine outlasts
a reconnect on the same key. A bad result makes its worker a suspect of that task; when another
worker's result for the task passes the checks, the fault is confirmed: a strike. At
``quarantine_after`` strikes, or ``max_missed_deadlines`` late EVALs in a row, the worker gets
no work for ``quarantine_s``. Both tables are bounded (oldest forgotten first).

A fetcher's claim that a holder served corrupt data (FAILED corrupt_input) is not proof on its
own: a lying fetcher could make it about an honest holder. The claim is kept
(``corrupt_claim``), and once fetchers of two principals have made one within
``CLAIM_WINDOW_S`` a worker of a third principal checks the holder's copy (``broker.probes``):
only its verdict strikes anyone. That table is bounded too.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

from chords_mq.broker.config import BrokerConfig
from chords_mq.broker.registry import WorkerInfo, WorkerRegistry

log = logging.getLogger("chords.broker")

CLAIM_WINDOW_S = 600.0  # how long a corrupt_input claim waits for another principal's
MAX_CLAIMANTS = 8  # claimants remembered per holder (the oldest forgotten first)


class Trust:
    def __init__(
        self, config: BrokerConfig, registry: WorkerRegistry, clock: Callable[[], float]
    ) -> None:
        self.config = config
        self.registry = registry
        self.clock = clock
        self.quarantine: OrderedDict[str, float] = OrderedDict()  # principal -> until
        self.strikes: OrderedDict[str, int] = OrderedDict()  # principal -> confirmed bad results
        # holder principal -> {claimant principal -> when it last claimed corrupt data}
        self.claims: OrderedDict[str, dict[str, float]] = OrderedDict()

    def corrupt_claim(self, holder: str, claimant: str) -> bool:
        """``claimant``'s fetcher says ``holder`` served bytes other than their digest. True
        (worth a probe, ``broker.probes``) if a fetcher of another principal said so within
        ``CLAIM_WINDOW_S``; one principal's claims alone never are."""
        now = self.clock()
        claims = {
            who: at
            for who, at in self.claims.pop(holder, {}).items()
            if now - at <= CLAIM_WINDOW_S and who != claimant
        }
        confirmed = bool(claims)
        claims[claimant] = now
        while len(claims) > MAX_CLAIMANTS:
            del claims[min(claims, key=claims.__getitem__)]
        self.claims[holder] = claims
        while len(self.claims) > 4 * self.config.max_workers:
            self.claims.popitem(last=False)
        return confirmed

    def claimants(self, holder: str) -> frozenset[str]:
        """The principals whose fetchers claimed corrupt data of ``holder`` within
        ``CLAIM_WINDOW_S``."""
        now = self.clock()
        claims = self.claims.get(holder, {})
        return frozenset(who for who, at in claims.items() if now - at <= CLAIM_WINDOW_S)

    def judged(self, holder: str) -> None:
        """A probe judged the claims about ``holder``: they are settled (new ones count anew)."""
        self.claims.pop(holder, None)

    def standing(self, principal: str) -> tuple[float, int]:
        """A registering worker's (quarantined until, strikes): what its key has earned."""
        return self.quarantine.get(principal, 0.0), self.strikes.get(principal, 0)

    def strike(self, principal: str, why: str) -> list[WorkerInfo]:
        """One confirmed bad result. Returns the workers this quarantines now (their work must
        be taken back)."""
        strikes = self.strikes.pop(principal, 0) + 1
        self.strikes[principal] = strikes
        while len(self.strikes) > 4 * self.config.max_workers:
            self.strikes.popitem(last=False)
        now = self.clock()
        workers = [w for w in self.registry.workers.values() if w.principal == principal]
        for worker in workers:
            worker.bad_results = strikes
        if strikes < self.config.quarantine_after:
            return []
        until = self._quarantine(principal, now)
        quarantined = []
        for worker in workers:
            if worker.quarantined(now):
                continue
            worker.quarantined_until = until
            log.error(
                "worker %s quarantined for %.0fs after %d bad results (last: %s)",
                worker.name,
                self.config.quarantine_s,
                strikes,
                why,
            )
            quarantined.append(worker)
        return quarantined

    def missed_deadline(self, worker: WorkerInfo, now: float) -> None:
        """``worker`` was late again: quarantined once it has missed too many in a row."""
        worker.missed += 1
        if worker.missed < self.config.max_missed_deadlines:
            return
        worker.quarantined_until = self._quarantine(worker.principal, now)
        log.error(
            "worker %s quarantined for %.0fs after %d missed deadlines in a row",
            worker.name,
            self.config.quarantine_s,
            worker.missed,
        )

    def _quarantine(self, principal: str, now: float) -> float:
        until = now + self.config.quarantine_s
        self.quarantine[principal] = until
        self.quarantine.move_to_end(principal)
        while len(self.quarantine) > 4 * self.config.max_workers:
            self.quarantine.popitem(last=False)
        return until

    def quarantined(self) -> list[WorkerInfo]:
        now = self.clock()
        return [w for w in self.registry.workers.values() if w.quarantined(now)]
