"""The gateway's settings: its limits as one frozen dataclass (each on the command line, in a
``CHORDS_*`` variable and in ``--config``, as the other daemons' are), and what it connects to."""

from __future__ import annotations

from dataclasses import dataclass, field

from chords_mq.options import BYTES, option


@dataclass(frozen=True)
class GatewayConfig:
    max_requests_per_key: int = field(
        default=8,
        metadata=option(
            "Requests one API key may run at once; past it: 429 with Retry-After.", min=1
        ),
    )
    max_body_bytes: int = field(
        default=1 << 20,
        metadata=option("Largest request body accepted; past it: 413.", unit=BYTES),
    )
    max_prompt_chars: int = field(
        default=4000, metadata=option("Longest prompt (and negative prompt) accepted.", min=1)
    )
    max_n: int = field(
        default=8, metadata=option("Most images (seeds) one request may ask for with n.", min=1)
    )
    request_timeout_s: float = field(
        default=300.0,
        metadata=option(
            "Seconds an image request (or a video job) may take; past it: 504 (a video job: "
            "failed, code timeout), and the broker cancels it.",
            name="request-timeout",
            min=0.1,
        ),
    )
    max_video_jobs: int = field(
        default=64,
        metadata=option("Video jobs kept at once (running or done); past it: 429.", min=1),
    )
    video_ttl_s: float = field(
        default=3600.0,
        metadata=option(
            "Seconds a finished video job (and its MP4) is kept.", name="video-ttl", min=1
        ),
    )
    max_connections: int = field(
        default=1024,
        metadata=option("Open HTTP connections at once; past it uvicorn answers 503.", min=1),
    )
    broker_timeout_s: float = field(
        default=5.0,
        metadata=option(
            "Seconds to wait for the broker to accept a request or answer STATUS; past it: 503.",
            name="broker-timeout",
            min=0.1,
        ),
    )


@dataclass(frozen=True)
class GatewaySettings:
    """Everything ``create_app`` needs: where the broker is, the CURVE keys to reach it, the API
    keys file (None: no keys, loopback only) and the limits."""

    broker: str = "tcp://127.0.0.1:5555"
    curve_secret: str | None = None
    broker_key: str | None = None
    api_keys: str | None = None
    config: GatewayConfig = field(default_factory=GatewayConfig)
