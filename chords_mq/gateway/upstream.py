"""The gateway's one connection to the broker: an ``AsyncClient`` held for the gateway's
lifetime, and the broker's STATUS read through one lock and kept for a moment (the client has
one STATUS reply slot, and every /v1/models or /healthz would otherwise ask again)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from chords_mq.client import AsyncClient, within

STATUS_FRESH_S = 0.5  # a STATUS this young answers /v1/models and /healthz


class BrokerLink:
    def __init__(
        self,
        address: str,
        *,
        curve_secret: str | None = None,
        broker_key: str | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.client = AsyncClient(
            address,
            accept_timeout_s=timeout_s,
            curve_secret=curve_secret,
            broker_key=broker_key,
        )
        self._lock = asyncio.Lock()
        self._status: dict[str, Any] | None = None
        self._status_at = -1.0

    async def start(self) -> None:
        await self.client.__aenter__()

    async def close(self) -> None:
        await self.client.close()

    async def status(self, timeout: float | None = None, fresh: bool = False) -> dict[str, Any]:
        """The broker's STATUS (at most ``STATUS_FRESH_S`` old unless ``fresh``); raises
        ``BrokerSilent`` (or ``asyncio.TimeoutError``) when no broker answers in time."""
        limit = self.timeout_s if timeout is None else timeout
        async with self._lock:
            now = time.monotonic()
            if not fresh and self._status is not None and now - self._status_at < STATUS_FRESH_S:
                return self._status
            status: dict[str, Any] = await within(self.client.status(timeout=limit), limit + 0.5)
            self._status, self._status_at = status, time.monotonic()
            return status

    async def models(self) -> list[str]:
        """The models some worker serves now, sorted."""
        status = await self.status()
        return sorted({str(w.get("model")) for w in status.get("workers", []) if w.get("model")})
