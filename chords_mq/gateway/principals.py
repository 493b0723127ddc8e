"""Who is asking, and how much they may run: the API key of a request (``Authorization: Bearer
KEY``) names its principal; each principal has its own count of running requests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from chords_mq.gateway.apikeys import KeyRing
from chords_mq.gateway.errors import ApiError

ANONYMOUS = "anonymous"  # the one principal of a gateway without --api-keys (loopback only)
RETRY_AFTER_S = 1.0


class Principals:
    def __init__(self, keys: KeyRing | None, max_requests_per_key: int) -> None:
        self.keys = keys
        self.limit = max_requests_per_key
        self.running: dict[str, int] = {}

    def authenticate(self, authorization: str | None) -> str:
        """The principal of a request's ``Authorization`` header; 401 without a valid key."""
        if self.keys is None:
            return ANONYMOUS
        scheme, _, secret = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise ApiError(
                401,
                "missing API key: send 'Authorization: Bearer <key>'",
                code="missing_api_key",
            )
        name = self.keys.principal(secret.strip())
        if name is None:
            raise ApiError(401, "incorrect API key provided", code="invalid_api_key")
        return name

    def take(self, principal: str) -> None:
        """Count one more running request of ``principal``; 429 past its limit."""
        running = self.running.get(principal, 0)
        if running >= self.limit:
            raise ApiError(
                429,
                f"too many requests running for this key ({running} of {self.limit}); "
                "try again when one finishes",
                code="rate_limit_exceeded",
                retry_after_s=RETRY_AFTER_S,
            )
        self.running[principal] = running + 1

    def give_back(self, principal: str) -> None:
        left = self.running.get(principal, 0) - 1
        if left > 0:
            self.running[principal] = left
        else:
            self.running.pop(principal, None)

    @contextlib.contextmanager
    def slot(self, principal: str) -> Iterator[None]:
        self.take(principal)
        try:
            yield
        finally:
            self.give_back(principal)
