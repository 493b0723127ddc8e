"""What several benchmarks share: the broker's data-plane switch, and result files that keep
each run under its label (``before``, ``after``, ...)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PLANE_ARGS = {"on": ["--data-plane"], "off": ["--no-data-plane"]}


def plane_args(plane: str | None) -> list[str]:
    """chords-broker's --data-plane switch for ``plane`` ("on" or "off"), said explicitly so a
    run keeps its setting whatever the default; None: the broker's default."""
    return [] if plane is None else list(PLANE_ARGS[plane])


def save_labelled(path: Path, label: str, result: dict[str, Any]) -> None:
    """Write ``result`` under ``label`` in the JSON file ``path``, keeping its other labels."""
    previous = json.loads(path.read_text()) if path.exists() else {}
    previous[label] = result
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(previous, indent=2) + "\n")
    print(f"wrote {path} ({label})")
