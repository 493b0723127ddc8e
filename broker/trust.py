"""Which workers may get work: confirmed bad results (strikes) and quarantines, per principal.

The principal is a worker's CURVE key (or, insecure, its connection), so a quarantine outlasts
a reconnect on the same key. A bad result makes its worker a suspect of that task; when another
worker's result for the task passes the checks, the fault is confirmed: a strike. At
``quarantine_after`` strikes, or ``max_missed_deadlines`` late EVALs in a row, the worker gets
no work for ``quarantine_s``. Both tables are bounded (oldest forgotten first).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

from chords_mq.broker.config import BrokerConfig
from chords_mq.broker.registry import WorkerInfo, WorkerRegistry

log = logging.getLogger("chords.broker")


class Trust:
    def __init__(
        self, config: BrokerConfig, registry: WorkerRegistry, clock: Callable[[], float]
    ) -> None:
        self.config = config
        self.registry = registry
        self.clock = clock
        self.quarantine: OrderedDict[str, float] = OrderedDict()  # principal -> until
        self.strikes: OrderedDict[str, int] = OrderedDict()  # principal -> confirmed bad results

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
