"""What moving a latent between two workers costs: each worker's host, and the bandwidth between
two hosts as the workers' own fetches measured it (``RESULT.fetched``, protocol 8).

A worker's host is the host part of the data endpoint it announced in HELLO; a worker without
one is a host of its own. Before a pair of hosts has been measured, a fetch between two hosts is
assumed at ``DEFAULT_BYTES_S`` (1 Gbit/s) and one within a host is free but for ``LATENCY_S``,
the round trip every fetch pays (a holder uses its own result in place: nothing). Pure and
sans-I/O: the dispatcher asks it, the RESULT handler teaches it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from chords_mq.wire.named import Fetched

DEFAULT_BYTES_S = 125e6  # between two hosts, until measured: 1 Gbit/s
LATENCY_S = 5e-4  # the round trip of one fetch (asked, then answered), on any link
ALPHA = 0.3  # the weight of a new measurement in a link's average
MIN_BYTES = 64 * 1024  # smaller fetches measure the round trip, not the bandwidth
MAX_PAIRS = 1024  # host pairs remembered (the least recently measured go first)


def host_of(endpoint: str | None, identity: bytes) -> str:
    """The host of a worker that announced ``endpoint`` (``tcp://HOST:PORT``; IPv6 in
    brackets); without one it is a host of its own, named by its routing id."""
    if endpoint is None:
        return "worker:" + identity.hex()
    host = endpoint.removeprefix("tcp://").rpartition(":")[0]
    return host.strip("[]").lower() or endpoint


class Links:
    """The learnt bandwidth of each pair of hosts (bytes per second; a link is taken to be as
    fast both ways)."""

    def __init__(self, default_bytes_s: float = DEFAULT_BYTES_S) -> None:
        self.default_bytes_s = default_bytes_s
        self._bytes_s: OrderedDict[tuple[str, str], float] = OrderedDict()

    @staticmethod
    def _pair(one: str, other: str) -> tuple[str, str]:
        return (one, other) if one <= other else (other, one)

    def bytes_s(self, one: str, other: str) -> float | None:
        """The learnt bandwidth between two hosts (None: not measured yet)."""
        return self._bytes_s.get(self._pair(one, other))

    def learn(self, host: str, fetched: Iterable[Fetched]) -> None:
        """A worker on ``host`` reported the fetches of one EVAL: each teaches the link from the
        fetched endpoint's host (its round trip taken off, fetches too small to tell skipped)."""
        for fetch in fetched:
            if fetch.nbytes < MIN_BYTES or fetch.seconds <= 0:
                continue
            sample = fetch.nbytes / max(fetch.seconds - LATENCY_S, fetch.seconds / 2)
            pair = self._pair(host_of(fetch.endpoint, b""), host)
            old = self._bytes_s.pop(pair, None)
            self._bytes_s[pair] = sample if old is None else old + ALPHA * (sample - old)
            while len(self._bytes_s) > MAX_PAIRS:
                self._bytes_s.popitem(last=False)

    def seconds(self, source: str, to: str, nbytes: int) -> float:
        """What fetching ``nbytes`` from a worker on ``source`` to one on ``to`` takes: the round
        trip and the bytes at the learnt bandwidth (within a host, unmeasured: free)."""
        rate = self.bytes_s(source, to)
        if rate is None:
            rate = None if source == to else self.default_bytes_s
        return LATENCY_S + (nbytes / rate if rate else 0.0)

    def summary(self) -> dict[str, float]:
        """The learnt links, ``host<->host``: Mbit/s (for STATUS and logs)."""
        return {f"{a}<->{b}": round(rate * 8 / 1e6, 1) for (a, b), rate in self._bytes_s.items()}
