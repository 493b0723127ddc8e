"""The playground page at ``/`` (static HTML and JavaScript, no build step), its static files,
and ``GET /v1/schedule``."""

from __future__ import annotations

from starlette.routing import BaseRoute


def routes() -> list[BaseRoute]:
    return []
