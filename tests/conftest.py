"""Shared test set-up: offline hub, one torch thread (steady timings on shared 2-core boxes).

``DEFAULT_THREADS`` is what torch chose before that, as a user's plain Python process has it;
``default_threads()`` runs a block at that count, for references that must be computed the way
a user computes them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

DEFAULT_THREADS = torch.get_num_threads()
torch.set_num_threads(1)


@contextmanager
def default_threads() -> Iterator[int]:
    """Run the block at torch's default thread count, then go back to one thread."""
    torch.set_num_threads(DEFAULT_THREADS)
    try:
        yield DEFAULT_THREADS
    finally:
        torch.set_num_threads(1)
