"""What several benchmarks share: the broker's data-plane switch, and result files that keep
each run under its label (``before``, ``after``, ...)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from chords_mq.client import AsyncClient, RequestFailed
from chords_mq.request import RequestSpec

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


async def outcome(address: str, spec: RequestSpec, timeout: float = 600) -> tuple[str, float]:
    """Submit ``spec`` and wait for its end: the failure's code ("finished" if it finished) and
    the seconds it took, client-side."""
    async with AsyncClient(address) as client:
        started = time.perf_counter()
        try:
            async for _ in client.submit(spec, timeout=timeout):
                pass
        except RequestFailed as exc:
            return exc.code, time.perf_counter() - started
    return "finished", time.perf_counter() - started
