"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, and the map
from the client's typed failures (``RequestFailed``, ``RequestTimeout``, ``BrokerSilent``) to
HTTP statuses."""

from __future__ import annotations

import itertools
import math
import re
from typing import Any

from chords_mq.client import BrokerSilent, RequestFailed, RequestTimeout

# The words of a refusal's message that name a request parameter, and the parameter they name
# (the earliest word in the message wins: "init sequence ... steps" names init).
PARAM_WORDS = (
    ("negative_prompt", "negative_prompt"),
    ("guidance", "guidance_scale"),
    ("init", "init"),
    ("steps", "steps"),
    ("cores", "cores"),
    ("seed", "seed"),
    ("stop", "stop"),
    ("method", "method"),
    ("height", "size"),
    ("width", "size"),
    ("prompt", "prompt"),
)
FALLBACK_WORDS = (("params", "params"), ("model", "model"))
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


class ApiError(Exception):
    """An HTTP error answer: status, message, the parameter at fault and a short code."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        kind = _TYPES.get(self.status, "server_error" if self.status >= 500 else "api_error")
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


def param_named(message: str) -> str | None:
    """The request parameter a refusal's message is about (its earliest mention, after a
    family's ``"digits model: "`` prefix), or None."""
    head, sep, tail = message.partition(": ")
    text = tail if sep and len(head) <= 40 and tail else message
    for words, where in itertools.product((PARAM_WORDS, FALLBACK_WORDS), (text, message)):
        found: list[tuple[int, str]] = []
        for word, param in words:
            match = re.search(rf"(?<![a-z_-]){word}", where)
            if match is not None:
                found.append((match.start(), param))
        if found:
            return min(found)[1]
    return None


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param or param_named(message), code=code)


def from_failure(exc: BaseException, served: list[str] | None = None) -> ApiError:
    """The HTTP answer to a failure the client raised for a request."""
    if isinstance(exc, BrokerSilent):
        return ApiError(503, f"the broker cannot be reached: {exc}", code="broker_unreachable")
    if isinstance(exc, RequestTimeout):
        return ApiError(504, str(exc), code="timeout")
    if isinstance(exc, RequestFailed):
        if exc.code == "broker_lost":
            return ApiError(503, exc.message, code="broker_lost")
        if exc.code == "busy":
            retry = exc.retry_after_s if exc.retry_after_s is not None else 1.0
            return ApiError(429, exc.message, code="busy", retry_after_s=retry)
        if exc.code == "no_worker":
            return ApiError(404, exc.message, param="model", code="model_not_found")
        if exc.code in ("invalid_request", "too_large"):
            return invalid(exc.message, code=exc.code)
        if exc.code == "draining":
            return ApiError(503, exc.message, code="draining", retry_after_s=5.0)
        return ApiError(502, f"{exc.code}: {exc.message}", code=exc.code)
    return ApiError(500, f"internal error: {type(exc).__name__}", code="internal")
