"""The playground page at ``/`` (static HTML and JavaScript, no build step, nothing fetched from
elsewhere), its static files under ``/static/``, and ``GET /v1/schedule``: the CHORDS schedule of
N steps on K cores, computed in-process by the pure plan code, for the page to draw."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import Any, Protocol

import torch
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from chords_mq.algorithms import ChordsPlan, init_sequence
from chords_mq.algorithms.chords import hit_rounds
from chords_mq.errors import ChordsError
from chords_mq.gateway.errors import ApiError, invalid
from chords_mq.local import simulate
from chords_mq.solvers import grid_euler

STATIC = Path(__file__).parent / "static"
# Bounds of /v1/schedule: the plan is simulated in full (about 0.1 s at the largest), and the
# answer lists every evaluation (at most MAX_STEPS * MAX_CORES pairs).
MAX_STEPS = 500
MAX_CORES = 16
CACHED_SCHEDULES = 64


class _Authenticates(Protocol):
    def principal(self, request: Request) -> str: ...


def routes() -> list[BaseRoute]:
    """The playground's routes, for ``create_app`` to include."""
    return [
        Route("/", page, methods=["GET"]),
        Route("/v1/schedule", schedule_route, methods=["GET"]),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ]


async def page(request: Request) -> Response:
    # no-cache: a browser revalidates, so a new version of the page is seen at once
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


def _authenticate(request: Request) -> None:
    """Every /v1 route asks for the API key where the gateway has keys (its ``principal``)."""
    gateway: _Authenticates | None = getattr(request.app.state, "gateway", None)
    if gateway is not None:
        gateway.principal(request)


def _bounded_int(request: Request, name: str, low: int, high: int) -> int:
    text = request.query_params.get(name)
    if text is None:
        raise invalid(f"{name} is required (an integer in {low}..{high})", name, "missing")
    try:
        value = int(text)
    except ValueError:
        raise invalid(
            f"{name} must be an integer, got {text[:40]!r}", name, "invalid_type"
        ) from None
    if not low <= value <= high:
        raise invalid(f"{name} must be in {low}..{high}, got {value}", name)
    return value


async def schedule_route(request: Request) -> Response:
    _authenticate(request)
    unknown = sorted(set(request.query_params) - {"steps", "cores"})
    if unknown:
        raise invalid(
            f"unknown parameter: {unknown[0][:40]!r}", unknown[0][:40], "unknown_parameter"
        )
    steps = _bounded_int(request, "steps", 1, MAX_STEPS)
    cores = _bounded_int(request, "cores", 1, MAX_CORES)
    if cores > steps:
        raise invalid(f"{cores} cores need at least {cores} steps, got {steps}", "cores")
    try:
        answer = await run_in_threadpool(schedule, steps, cores)
    except ChordsError as exc:  # pragma: no cover - the bounds above keep the plan valid
        raise ApiError(400, str(exc), param="cores", code="invalid_value") from None
    return JSONResponse(answer, headers={"Cache-Control": "max-age=3600"})


@functools.lru_cache(maxsize=CACHED_SCHEDULES)
def schedule(steps: int, cores: int) -> dict[str, Any]:
    """The CHORDS schedule of ``steps`` steps on ``cores`` cores, with the init sequence a
    request with these ``steps`` and ``cores`` runs: every core's evaluations as ``[round,
    step]`` pairs (the task of round r evaluates step s; its result is step s + 1), the round
    and round-speedup of every hit (core 0: the zero-th hit) and the rectifications."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a duplicate core is still a valid schedule to draw
        sequence = init_sequence(cores, steps)
    plan = ChordsPlan(torch.zeros(1, dtype=torch.float64), steps, sequence)
    # the schedule does not depend on the values: a zero velocity is the cheapest network
    grid = grid_euler([i / steps for i in range(steps + 1)])
    result = simulate(plan, lambda x, step: torch.zeros_like(x), grid)
    evaluations: dict[int, list[list[int]]] = {core: [] for core in range(1, cores + 1)}
    for number, pairs in enumerate(result.rounds, start=1):
        for step, core in pairs:
            evaluations[core].append([number, step])
    rounds = hit_rounds(sequence, steps)
    hits = [
        {"core": hit.core, "round": hit.round, "round_speedup": round(steps / hit.round, 4)}
        for hit in result.hits
    ]
    assert all(hit.round == rounds[hit.core] for hit in result.hits)
    return {
        "steps": steps,
        "cores": cores,
        "init_sequence": sequence,
        "rounds": len(result.rounds),
        "evaluations": result.evaluations,
        "lanes": [
            {"core": core, "start": sequence[core - 1], "evaluations": evaluations[core]}
            for core in range(1, cores + 1)
        ],
        "hits": hits,
        "returned": {"core": result.returned.core, "round": result.returned.round},
        "rectifications": [
            {"core": r.core, "round": r.round, "anchor": r.anchor, "target": r.target}
            for r in plan.rectifications
        ],
    }
