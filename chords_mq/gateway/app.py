"""chords-gateway's application and daemon: ``create_app(settings)`` builds the Starlette app
(routes, error answers in OpenAI's shape, metrics, the one ``AsyncClient`` opened and closed with
the app's lifespan); ``main`` is the ``chords-gateway`` command, which runs it on uvicorn.

A request's broker id is its principal's name, a dot and a fresh id, so each key's requests are
its own. A client that goes away (mid-request or mid-stream) cancels its requests in the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import click
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from chords_mq import __version__
from chords_mq.client import BrokerSilent
from chords_mq.gateway import playground
from chords_mq.gateway.apikeys import ApiKeyError, KeyRing
from chords_mq.gateway.config import GatewayConfig, GatewaySettings
from chords_mq.gateway.errors import ApiError, from_failure
from chords_mq.gateway.forms import form_type, read_form
from chords_mq.gateway.images import (
    ImageRequest,
    b64_png,
    hit_fields,
    parse_image_request,
    run_to_end,
    stream_events,
)
from chords_mq.gateway.metrics import GatewayMetrics, Metered
from chords_mq.gateway.principals import Principals
from chords_mq.gateway.upstream import BrokerLink
from chords_mq.gateway.videos import VideoJobs, parse_video_request
from chords_mq.keys import is_loopback
from chords_mq.logs import log_options, setup_logging
from chords_mq.options import (
    DAEMON_CONTEXT,
    ENDPOINT,
    METRICS_BIND,
    ConfigError,
    config_from_options,
    config_option,
    config_options,
)

log = logging.getLogger("chords.gateway")
T = TypeVar("T")
CLIENT_GONE = 499  # nginx's "client closed request": logged and counted, read by nobody
SSE_PING_S = 15
# An over-limit body is still read (and dropped) up to this many times the limit, for at most
# DRAIN_S seconds, so that the 413 reaches the client (see _discard); past that, it is cut off.
DRAIN_FACTOR = 4
DRAIN_S = 2.0


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


class Gateway:
    """The app's state: the broker link, the principals and their limits, the video jobs."""

    def __init__(self, settings: GatewaySettings, keys: KeyRing | None) -> None:
        self.settings = settings
        self.config = settings.config
        self.link = BrokerLink(
            settings.broker,
            curve_secret=settings.curve_secret,
            broker_key=settings.broker_key,
            timeout_s=settings.config.broker_timeout_s,
        )
        self.principals = Principals(keys, settings.config.max_requests_per_key)
        self.jobs = VideoJobs(settings.config.max_video_jobs, settings.config.video_ttl_s)
        self.metrics = GatewayMetrics()

    # -- helpers -------------------------------------------------------------------------------

    def principal(self, request: Request) -> str:
        return self.principals.authenticate(request.headers.get("authorization"))

    async def body(self, request: Request, forms: bool = False) -> Any:
        """The JSON body (or, with ``forms``, a form read as one), at most ``max_body_bytes``
        (413 past it, before reading it all)."""
        limit = self.config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            if not length.isdigit():
                raise ApiError(400, "bad Content-Length", code="invalid_request")
            # a client that waits for "100 Continue" sends nothing more: answer it at once
            if int(length) <= DRAIN_FACTOR * limit and not _expects_continue(request):
                await _discard(request.stream(), DRAIN_FACTOR * limit)
            raise ApiError(413, f"the body is {length} bytes; at most {limit}", code="too_large")
        chunks, total = [], 0
        stream = request.stream()
        async for chunk in stream:
            total += len(chunk)
            if total > limit:
                await _discard(stream, DRAIN_FACTOR * limit - total)
                raise ApiError(413, f"the body is over {limit} bytes", code="too_large")
            chunks.append(chunk)
        if forms and form_type(request.headers.get("content-type")):
            return await read_form(request.headers, b"".join(chunks))
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, RecursionError):
            raise ApiError(400, "the body is not valid JSON", code="invalid_json") from None

    async def check_model(self, model: str) -> None:
        """404 naming the served models unless a worker serves ``model``; 503 without a broker."""
        try:
            served = await self.link.models()
        except (BrokerSilent, asyncio.TimeoutError) as exc:
            raise ApiError(
                503,
                f"the broker at {self.link.address} cannot be reached: {exc}",
                code="broker_unreachable",
            ) from None
        if model not in served:
            listed = ", ".join(served) or "none (no worker is connected)"
            raise ApiError(
                404,
                f"the model {model!r} is not served here; served models: {listed}",
                param="model",
                code="model_not_found",
            )

    def request_id(self, principal: str) -> str:
        return f"{principal}.{uuid.uuid4().hex}"

    # -- routes --------------------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        try:
            status = await self.link.status(timeout=2.0, fresh=True)
        except Exception as exc:  # no broker, or a broken reply: unhealthy either way
            down = {"status": "unreachable", "broker": self.link.address, "reason": str(exc)}
            return JSONResponse(down, status_code=503)
        workers = status.get("workers", [])
        models = sorted({str(w.get("model")) for w in workers if w.get("model")})
        report: dict[str, Any] = {
            "status": "ok",
            "broker": self.link.address,
            "workers": status.get("workers_total", len(workers)),
            "models": models,
        }
        return JSONResponse(report)

    async def metrics_text(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def models(self, request: Request) -> Response:
        self.principal(request)
        try:
            served = await self.link.models()
        except (BrokerSilent, asyncio.TimeoutError) as exc:
            raise ApiError(
                503, f"the broker cannot be reached: {exc}", code="broker_unreachable"
            ) from None
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "chords-mq"} for m in served]
        return JSONResponse({"object": "list", "data": data})

    async def images(self, request: Request) -> Response:
        principal = self.principal(request)
        job = parse_image_request(
            await self.body(request),
            max_n=self.config.max_n,
            max_prompt_chars=self.config.max_prompt_chars,
        )
        await self.check_model(job.model)
        if job.stream:
            return await self.stream_images(request, principal, job)
        with self.principals.slot(principal):
            outcomes = await guarded(request, run_all(self, principal, job))
        data = []
        for outcome in outcomes:
            assert outcome.returned.media is not None  # run_to_end asked for media
            b64, size = b64_png(outcome.returned.media)
            data.append({"b64_json": b64, "seed": outcome.seed, **hit_fields(outcome.returned)})
        answer = {
            "created": int(time.time()),
            "data": data,
            "output_format": "png",
            "size": size,
        }
        return JSONResponse(answer)

    async def stream_images(self, request: Request, principal: str, job: ImageRequest) -> Response:
        self.principals.take(principal)
        events = stream_events(
            self.link.client,
            job.specs[0],
            self.request_id(principal),
            self.config.request_timeout_s,
            job.partial_images,
        )
        released = False

        async def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.principals.give_back(principal)
                with contextlib.suppress(Exception):
                    await events.aclose()

        try:  # the first event decides the status: a refusal is still an HTTP error
            first = await guarded(request, events.__anext__())
        except BaseException:
            await release()
            raise

        async def sse() -> AsyncIterator[dict[str, str]]:
            try:
                kind, data = first
                yield {"event": kind, "data": json.dumps(data)}
                async for kind, data in events:
                    if kind.endswith("partial_image"):
                        self.metrics.hits.inc()
                    yield {"event": kind, "data": json.dumps(data)}
            except ApiError as exc:
                yield {"event": "error", "data": json.dumps(exc.body())}
            except Exception as exc:  # the status line is sent: say it in-band
                yield {"event": "error", "data": json.dumps(from_failure(exc).body())}
            finally:
                await release()

        if first[0].endswith("partial_image"):
            self.metrics.hits.inc()
        return ClosingEventSource(sse(), release, ping=SSE_PING_S)

    async def create_video(self, request: Request) -> Response:
        principal = self.principal(request)
        job_request = parse_video_request(
            await self.body(request, forms=True), max_prompt_chars=self.config.max_prompt_chars
        )
        await self.check_model(job_request.model)
        self.principals.take(principal)
        try:
            job = self.jobs.start(
                principal,
                job_request,
                self.link.client,
                self.config.request_timeout_s,
                lambda: self.principals.give_back(principal),
            )
        except BaseException:
            self.principals.give_back(principal)
            raise
        return JSONResponse(job.body(self.config.video_ttl_s))

    async def get_video(self, request: Request) -> Response:
        job = self.jobs.get(self.principal(request), request.path_params["video_id"])
        return JSONResponse(job.body(self.config.video_ttl_s))

    async def video_content(self, request: Request) -> Response:
        job = self.jobs.get(self.principal(request), request.path_params["video_id"])
        if job.status != "completed" or job.path is None:
            raise ApiError(
                404 if job.status == "failed" else 409,
                f"video {job.id} is {job.status}: no content yet",
                code="not_ready",
            )
        content = await asyncio.to_thread(job.path.read_bytes)
        return Response(content, media_type="video/mp4")

    async def delete_video(self, request: Request) -> Response:
        job = self.jobs.get(self.principal(request), request.path_params["video_id"])
        self.jobs.drop(job)
        return JSONResponse({"id": job.id, "object": "video.deleted", "deleted": True})


def _uvicorn_server() -> type[Any]:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, except that SIGTERM or SIGINT is a clean stop (exit 0, as the other
        daemons): uvicorn raises the signal again after its graceful shutdown."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            self._captured_signals.clear()

    return Server


class ClosingEventSource(EventSourceResponse):
    """An event stream that runs ``on_close`` however it ends (its generator may never start
    when the client is gone at once): the request is cancelled and the key's slot given back."""

    def __init__(
        self, content: Any, on_close: Callable[[], Awaitable[None]], **kwargs: Any
    ) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.on_close()


async def run_all(gateway: Gateway, principal: str, job: ImageRequest) -> list[Any]:
    """The request's n seeds at once; the first failure cancels the others."""
    tasks = [
        asyncio.ensure_future(
            run_to_end(
                gateway.link.client,
                spec,
                gateway.request_id(principal),
                gateway.config.request_timeout_s,
            )
        )
        for spec in job.specs
    ]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        return [task.result() for task in tasks]
    finally:
        unfinished = [task for task in tasks if not task.done()]
        for task in unfinished:
            task.cancel()
        if unfinished:
            await asyncio.wait(unfinished, timeout=2.0)


def _expects_continue(request: Request) -> bool:
    return "100-continue" in request.headers.get("expect", "").lower()


async def _discard(stream: AsyncIterator[bytes], budget: int) -> None:
    """Read and drop the rest of an over-limit body, up to ``budget`` bytes and ``DRAIN_S``
    seconds. A server that closes a connection with unread bytes resets it, and the client then
    loses the 413 already sent to it (one in five chunked 2 MiB bodies, 8 clients at once)."""

    async def drop() -> None:
        left = budget
        async for chunk in stream:
            left -= len(chunk)
            if left < 0:
                return

    with contextlib.suppress(asyncio.TimeoutError, ClientDisconnect):
        await asyncio.wait_for(drop(), DRAIN_S)


async def _until_disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def guarded(request: Request, work: Coroutine[Any, Any, T] | Awaitable[T]) -> T:
    """``await work``, cancelled (so its broker requests are) if the client disconnects first;
    a failure of the client's becomes its HTTP answer (``ApiError``)."""
    task: asyncio.Future[T] = asyncio.ensure_future(work)
    watch: asyncio.Future[None] = asyncio.ensure_future(_until_disconnected(request))
    try:
        both: list[asyncio.Future[Any]] = [task, watch]
        await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=2.0)
        raise ClientGone
    try:
        return task.result()
    except ApiError:
        raise
    except StopAsyncIteration:
        raise
    except Exception as exc:
        raise from_failure(exc) from exc


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error = ApiError(
        exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None
    )
    return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)


async def _client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=CLIENT_GONE)


async def _internal(request: Request, exc: Exception) -> Response:
    log.exception("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    error = ApiError(500, f"internal error: {type(exc).__name__}", code="internal")
    return JSONResponse(error.body(), status_code=500)


def create_app(settings: GatewaySettings) -> Starlette:
    """The gateway as an ASGI app; its lifespan opens and closes the broker client."""
    keys = None if settings.api_keys is None else KeyRing.load(settings.api_keys)
    gateway = Gateway(settings, keys)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.link.start()
        log.info("chords-gateway %s: broker %s", __version__, settings.broker)
        try:
            yield
        finally:
            await gateway.jobs.close()
            await gateway.link.close()

    routes: list[BaseRoute] = [
        Route("/healthz", gateway.healthz, methods=["GET"]),
        Route("/metrics", gateway.metrics_text, methods=["GET"]),
        Route("/v1/models", gateway.models, methods=["GET"]),
        Route("/v1/images/generations", gateway.images, methods=["POST"]),
        Route("/v1/videos", gateway.create_video, methods=["POST"]),
        Route("/v1/videos/{video_id}", gateway.get_video, methods=["GET"]),
        Route("/v1/videos/{video_id}", gateway.delete_video, methods=["DELETE"]),
        Route("/v1/videos/{video_id}/content", gateway.video_content, methods=["GET"]),
        *playground.routes(),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[Middleware(Metered, metrics=gateway.metrics)],
        exception_handlers={
            ApiError: _api_error,
            HTTPException: _http_error,
            ClientGone: _client_gone,
            Exception: _internal,
        },
    )
    app.state.gateway = gateway
    return app


# -- the daemon ------------------------------------------------------------------------------------


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any), made before uvicorn starts so that a
    port in use is one ``Error:`` line and exit 2, like the other daemons."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and
    # without it a kept-alive connection's answers wait 40 ms (Nagle and delayed ACKs)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"--http-bind {host}:{port}: cannot listen: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


@click.command(context_settings={"help_option_names": ["-h", "--help"], **DAEMON_CONTEXT})
@config_option
@click.option(
    "--http-bind",
    type=METRICS_BIND,
    default="127.0.0.1:8000",
    show_default=True,
    metavar="HOST:PORT",
    help="Serve HTTP here (loopback unless you say otherwise; off loopback needs --api-keys).",
)
@click.option(
    "--broker",
    type=ENDPOINT,
    default="tcp://127.0.0.1:5555",
    show_default=True,
    help="The broker's client endpoint (host:port means tcp://host:port).",
)
@click.option(
    "--curve-secret",
    type=click.Path(dir_okay=False),
    envvar="CHORDS_CURVE_SECRET",
    default=None,
    help="The gateway's CURVE key pair (NAME.key_secret from chords keygen), for a CURVE broker.",
)
@click.option(
    "--broker-key",
    type=click.Path(dir_okay=False),
    envvar="CHORDS_BROKER_KEY",
    default=None,
    help="The broker's public key (broker.key), with --curve-secret.",
)
@click.option(
    "--api-keys",
    type=click.Path(dir_okay=False),
    default=None,
    help="The API keys file (chords apikey create NAME --file KEYS): every /v1 request then "
    "needs 'Authorization: Bearer <key>'.",
)
@config_options(GatewayConfig)
@log_options
@click.version_option(__version__, prog_name="chords-gateway")
def main(
    http_bind: tuple[str, int],
    broker: str,
    curve_secret: str | None,
    broker_key: str | None,
    api_keys: str | None,
    log_level: str,
    log_format: str,
    **limits: Any,
) -> None:
    """Run the OpenAI-compatible HTTP gateway in front of a chords-broker."""
    setup_logging("chords-gateway", log_level, log_format)
    host, port = http_bind
    if api_keys is None and not is_loopback(f"tcp://{host}:{port}"):
        raise click.UsageError(
            f"refusing to serve on {host}:{port} without --api-keys KEYS: off loopback every "
            "client must present a key (chords apikey create NAME --file KEYS)"
        )
    if (curve_secret is None) != (broker_key is None):
        raise click.UsageError("--curve-secret and --broker-key go together")
    settings = GatewaySettings(
        broker=broker,
        curve_secret=curve_secret,
        broker_key=broker_key,
        api_keys=api_keys,
        config=config_from_options(GatewayConfig, limits),
    )
    try:
        app = create_app(settings)
    except (ApiKeyError, OSError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    sock = listen(host, port)
    log.info("serving on http://%s:%d", host, sock.getsockname()[1])

    import uvicorn

    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
        timeout_keep_alive=5,
        h11_max_incomplete_event_size=16 * 1024,  # a request line and headers
        limit_concurrency=settings.config.max_connections,
        lifespan="on",
    )
    _uvicorn_server()(config).run(sockets=[sock])
