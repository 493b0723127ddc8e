"""A hit's latent sent on in pieces (PART), checked as it goes (pure: no I/O).

Across hosts a big hit's latent makes two hops, its decoder to the broker and the broker to the
client: 2 x 134 ms for 16 MiB at 1 Gbit, sent one after the other when the broker waits for the
whole message. Asked for pieces (``DecodeMessage.parts``, only of a worker whose HELLO lists
"parts" and for a client whose SUBMIT said ``hit_parts``), the worker sends each as a PART and
then its DECODED; the broker checks each piece here as it arrives (its place and size, every
value finite, the digest the holders reported, folded in as it goes) and sends it on to the
client at once, so the second hop overlaps the first. The client assembles the pieces but gives
out the hit only with the HIT, which the broker sends once the DECODED completed a stream that
passed every check; a piece of index 0 starts the latent over (another worker decodes it after
a bad piece). The broker holds one piece at a time, never the whole latent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from chords_mq.algorithms.base import all_finite
from chords_mq.wire import PartMessage, TensorDigest, bytes_as, part_bounds, parts_for

__all__ = ["HitStream", "stream_for"]


@dataclass
class HitStream:
    """What one DECODE asked for in pieces expects, and how far it came."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    bounds: list[tuple[int, int]]  # ``wire.part_bounds``: the byte range of each piece
    digesting: bool = False  # the holders reported digests (verifying): fold one in
    received: int = 0  # pieces taken so far
    _digest: TensorDigest | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.digesting:  # the digest of the latent as ``wire.tensor_digest`` makes it
            self._digest = TensorDigest(self.dtype, self.shape)

    @property
    def parts(self) -> int:
        return len(self.bounds)

    def take(self, message: PartMessage) -> str | None:
        """Check the next piece and fold it in; what is wrong with it, or None."""
        index = self.received
        if message.index != index or message.parts != self.parts:
            return f"piece {message.index} of {message.parts} where {index} of {self.parts} was due"
        start, stop = self.bounds[index]
        data = message.data
        if data.numel() != stop - start:
            return f"piece {index} of {data.numel()} bytes, not {stop - start}"
        if not all_finite(bytes_as(data, self.dtype)):
            return f"piece {index} holds NaN or Inf"
        if self._digest is not None:
            self._digest.update(data)
        self.received += 1
        return None

    def finish(self, parts: int | None) -> str | None:
        """The DECODED that ends the stream says ``parts``: what is wrong, or None."""
        if parts != self.parts or self.received != self.parts:
            return f"DECODED after {self.received} of {self.parts} pieces says {parts}"
        return None

    def digest(self) -> str | None:
        """The digest of the pieces taken (``wire.tensor_digest``'s, once all are in); None
        when not digesting."""
        return None if self._digest is None else self._digest.hexdigest()


def stream_for(
    shape: tuple[int, ...], dtype: torch.dtype | None, digesting: bool = False
) -> HitStream | None:
    """A stream for a hit's latent of ``shape`` and ``dtype``, or None where it goes whole (a
    latent under ``2 x wire.PART_MIN_BYTES``, or a dtype not known yet). ``digesting``: the
    hit's holders reported digests, which the pieces must have."""
    if dtype is None or not shape:
        return None
    nbytes = math.prod(shape) * dtype.itemsize
    asked = parts_for(nbytes)
    if asked < 2:
        return None
    return HitStream(shape, dtype, part_bounds(nbytes, dtype.itemsize, asked), digesting)
