"""Load and abuse probes of chords-gateway over raw HTTP/1.1 on asyncio: a keep-alive connection,
bursts of concurrent image requests from one key, and a corpus of malformed requests (bad JSON,
wrong types, unknown fields, huge bodies, bad keys, bad paths and methods), each of which must be
answered 4xx. Shared by tests/integration/test_gateway_playground.py (small sizes) and
benchmarks/gateway.py (full sizes). Raw sockets, not an HTTP library, so that a request can be
as malformed as a hostile client makes it and the client's own cost stays small and constant."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

MAX_HEAD = 64 * 1024


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Connection:
    """One HTTP/1.1 connection to ``url``, kept alive between requests and reopened when the
    server closes it. Reads Content-Length and chunked bodies. On a plain non-blocking socket,
    not asyncio's streams: a server that answers 413 and closes while the client still sends
    resets the connection, and a stream then drops the answer it had already received; the
    socket still reads it (as curl does)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self._sock: socket.socket | None = None
        self._buffer = bytearray()

    async def close(self) -> None:
        sock, self._sock = self._sock, None
        self._buffer.clear()
        if sock is not None:
            sock.close()

    async def _open(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                await asyncio.get_running_loop().sock_connect(sock, (self.host, self.port))
            except BaseException:
                sock.close()
                raise
            self._sock = sock
        return self._sock

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        raw_head: bytes | None = None,
        close: bool = False,
        on_chunk: Callable[[bytes], None] | None = None,
    ) -> Answer:
        """Send one request and read its answer. ``raw_head`` replaces the request line and
        headers as written (then ``body`` follows it unframed); ``close`` asks the server to
        close the connection after answering; ``on_chunk`` sees each chunk of a chunked answer
        (a stream's events) as it arrives."""
        if self._sock is not None and _closed_by_peer(self._sock):
            await self.close()  # the server closed it while idle (its keep-alive timeout)
        sock = await self._open()
        if raw_head is None:
            lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
            given = {name.lower() for name in headers or {}}
            for name, value in (headers or {}).items():
                lines.append(f"{name}: {value}")
            if "content-length" not in given and "transfer-encoding" not in given:
                lines.append(f"Content-Length: {len(body)}")
            if close:
                lines.append("Connection: close")
            raw_head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        # the server may answer (413) before it reads the whole body: send while reading
        sending = asyncio.ensure_future(_send(sock, raw_head + body))
        try:
            answer = await self._read_answer(sock, on_chunk)
        except BaseException:
            await self.close()
            raise
        finally:
            if not sending.done():
                sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)
        unsent = sending.cancelled() or sending.exception() is not None
        if close or unsent or answer.headers.get("connection", "").lower() == "close":
            await self.close()
        return answer

    async def _fill(self, sock: socket.socket) -> None:
        data = await asyncio.get_running_loop().sock_recv(sock, 1 << 16)
        if not data:
            raise asyncio.IncompleteReadError(bytes(self._buffer), None)
        self._buffer += data

    async def _take(self, sock: socket.socket, size: int) -> bytes:
        while len(self._buffer) < size:
            await self._fill(sock)
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    async def _line(self, sock: socket.socket, end: bytes = b"\r\n") -> bytes:
        while (at := self._buffer.find(end)) < 0:
            if len(self._buffer) > MAX_HEAD:
                raise ValueError("the answer's head is too long")
            await self._fill(sock)
        return await self._take(sock, at + len(end))

    async def _read_answer(
        self, sock: socket.socket, on_chunk: Callable[[bytes], None] | None = None
    ) -> Answer:
        lines = (await self._line(sock, b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await self._take(sock, int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await self._line(sock)).split(b";")[0], 16)
                chunks.append((await self._take(sock, size + 2))[:size])
                if on_chunk is not None and size:
                    on_chunk(chunks[-1])
                if size == 0:
                    break
            body = b"".join(chunks)
        else:
            while True:
                try:
                    await self._fill(sock)
                except asyncio.IncompleteReadError:
                    break
            body = await self._take(sock, len(self._buffer))
        return Answer(status, headers, body)


def _closed_by_peer(sock: socket.socket) -> bool:
    """True if an idle kept-alive connection has been closed (or reset) by the server."""
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False  # nothing to read: still open
    except OSError:
        return True


async def _send(sock: socket.socket, data: bytes) -> None:
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    for start in range(0, len(view), 1 << 16):
        await loop.sock_sendall(sock, view[start : start + (1 << 16)])


def image_body(seed: int = 0, steps: int = 50, cores: int = 4, **extra: Any) -> bytes:
    """A valid ``/v1/images/generations`` body for the digits model."""
    body = {
        "model": "digits",
        "prompt": "a handwritten 7",
        "response_format": "b64_json",
        "steps": steps,
        "cores": cores,
        "seed": seed,
        **extra,
    }
    return json.dumps(body).encode()


def bearer(key: str | None) -> dict[str, str]:
    return {} if key is None else {"Authorization": f"Bearer {key}"}


@dataclass
class Burst:
    """What ``burst`` saw: each request's status (``"hung"`` past its timeout, ``"error:
    ..."`` for a broken connection), the seconds until all had answered, Retry-After seen."""

    statuses: list[int | str]
    seconds: float
    retry_after: Counter[str] = field(default_factory=Counter)

    def counts(self) -> dict[str, int]:
        return {str(status): n for status, n in sorted(Counter(self.statuses).items(), key=str)}


async def burst(
    url: str, key: str | None, count: int, *, timeout: float, steps: int = 20, cores: int = 4
) -> Burst:
    """``count`` image requests at once from one key, each on its own connection."""

    async def one(seed: int) -> tuple[int | str, str | None]:
        connection = Connection(url)
        try:
            answer = await asyncio.wait_for(
                connection.request(
                    "POST",
                    "/v1/images/generations",
                    body=image_body(seed, steps=steps, cores=cores),
                    headers={"Content-Type": "application/json", **bearer(key)},
                ),
                timeout,
            )
            return answer.status, answer.headers.get("retry-after")
        except asyncio.TimeoutError:
            return "hung", None
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            return f"error: {type(exc).__name__}", None
        finally:
            await connection.close()

    started = time.perf_counter()
    results = await asyncio.gather(*(one(seed) for seed in range(count)))
    seconds = time.perf_counter() - started
    retry = Counter(str(after) for status, after in results if status == 429)
    return Burst([status for status, _ in results], seconds, retry)


# -- malformed requests ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Malformed:
    """One malformed request: its kind, how to send it, and the 4xx statuses it may get."""

    kind: str
    method: str
    path: str
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    raw_head: bytes | None = None
    expect: tuple[int, ...] = (400,)
    close: bool = False  # a fresh connection (the server may close it after answering)


def malformed_corpus(key: str, huge_bytes: int = 2 << 20) -> list[Malformed]:
    """One of each kind of malformed request; ``key`` is a valid API key (so the body is what
    is wrong), except in the bad-key kinds. ``huge_bytes``: over the gateway's body limit."""
    json_type = ("Content-Type", "application/json")
    auth = ("Authorization", f"Bearer {key}")
    good = {"model": "digits", "prompt": "a handwritten 7"}

    def post(kind: str, body: Any, expect: tuple[int, ...] = (400,)) -> Malformed:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return Malformed(
            kind, "POST", "/v1/images/generations", data, (json_type, auth), None, expect
        )

    deep = b"[" * 100_000 + b"]" * 100_000
    corpus = [
        post("bad_json_truncated", b'{"model": "digits", "prompt": '),
        post("bad_json_garbage", b"\x00\xff\xfe not json at all"),
        post("bad_json_invalid_utf8", b'{"model": "digits", "prompt": "\xff\xfe"}'),
        post("bad_json_deep_nesting", deep),
        post("bad_json_empty", b""),
        post("not_an_object", [1, 2, 3]),
        post("wrong_type_steps", {**good, "steps": "fifty"}),
        post("wrong_type_cores", {**good, "cores": 1.5}),
        post("wrong_type_prompt", {"model": "digits", "prompt": 7}),
        post("wrong_type_model", {"model": ["digits"], "prompt": "x"}),
        post("wrong_type_n", {**good, "n": "2"}),
        post("wrong_type_stream", {**good, "stream": "yes"}),
        post("wrong_type_size", {**good, "size": 64}),
        post("wrong_type_seed", {**good, "seed": -5}),
        post("bad_value_steps", {**good, "steps": -1}),
        post("bad_value_n", {**good, "n": 10_000}),
        post("bad_value_size", {**good, "size": "64x"}),
        post("bad_value_response_format", {**good, "response_format": "url"}),
        post("bad_value_method", {**good, "method": "nope"}),
        post("missing_prompt", {"model": "digits"}),
        post("prompt_too_long", {**good, "prompt": "7" * 50_000}),
        post("unknown_field", {**good, "colour": "red"}),
        post("unknown_model", {"model": "no-such-model", "prompt": "x"}, (404,)),
        Malformed(
            "huge_body_declared",
            "POST",
            "/v1/images/generations",
            raw_head=(
                "POST /v1/images/generations HTTP/1.1\r\nHost: gateway\r\n"
                f"Content-Type: application/json\r\nAuthorization: Bearer {key}\r\n"
                f"Content-Length: {huge_bytes}\r\nConnection: close\r\n\r\n"
            ).encode(),
            body=b"{" + b" " * (huge_bytes - 1),
            expect=(413,),
            close=True,
        ),
        Malformed(
            "huge_body_chunked",
            "POST",
            "/v1/images/generations",
            raw_head=(
                "POST /v1/images/generations HTTP/1.1\r\nHost: gateway\r\n"
                f"Content-Type: application/json\r\nAuthorization: Bearer {key}\r\n"
                "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            ).encode(),
            body=b"".join(
                f"{1 << 16:x}\r\n".encode() + b" " * (1 << 16) + b"\r\n"
                for _ in range(huge_bytes // (1 << 16) + 1)
            )
            + b"0\r\n\r\n",
            expect=(413,),
            close=True,
        ),
        Malformed(
            "bad_content_length",
            "POST",
            "/v1/images/generations",
            raw_head=(
                "POST /v1/images/generations HTTP/1.1\r\nHost: gateway\r\n"
                f"Authorization: Bearer {key}\r\nContent-Length: abc\r\nConnection: close\r\n\r\n"
            ).encode(),
            expect=(400,),
            close=True,
        ),
        Malformed(
            "bad_key_wrong",
            "POST",
            "/v1/images/generations",
            image_body(),
            (json_type, ("Authorization", "Bearer sk-not-a-key")),
            expect=(401,),
        ),
        Malformed(
            "bad_key_missing",
            "POST",
            "/v1/images/generations",
            image_body(),
            (json_type,),
            expect=(401,),
        ),
        Malformed(
            "bad_key_scheme",
            "GET",
            "/v1/models",
            headers=(("Authorization", f"Basic {key}"),),
            expect=(401,),
        ),
        Malformed("wrong_method", "GET", "/v1/images/generations", headers=(auth,), expect=(405,)),
        Malformed(
            "unknown_path", "POST", "/v1/nothing-here", b"{}", (json_type, auth), expect=(404,)
        ),
        Malformed("unknown_video", "GET", "/v1/videos/no-such-job", headers=(auth,), expect=(404,)),
        Malformed("bad_schedule_query", "GET", "/v1/schedule?steps=abc&cores=4", headers=(auth,)),
        Malformed("bad_schedule_bounds", "GET", "/v1/schedule?steps=50&cores=999", headers=(auth,)),
    ]
    return corpus


def cycle(corpus: list[Malformed], count: int) -> Iterator[Malformed]:
    for index in range(count):
        yield corpus[index % len(corpus)]


@dataclass
class Flood:
    """What ``flood`` saw: answers by kind and status, the ones outside their expected 4xx."""

    by_kind: dict[str, Counter[str]]
    unexpected: list[str]
    sent: int
    seconds: float

    def all_4xx(self) -> bool:
        return all(
            status.isdigit() and 400 <= int(status) < 500
            for counts in self.by_kind.values()
            for status in counts
        )


async def flood(
    url: str, corpus: list[Malformed], count: int, *, connections: int = 16, timeout: float = 30
) -> Flood:
    """Send ``count`` malformed requests (the corpus in turn) over ``connections`` at once."""
    requests = cycle(corpus, count)
    by_kind: dict[str, Counter[str]] = {item.kind: Counter() for item in corpus}
    unexpected: list[str] = []
    sent = 0

    async def sender() -> None:
        nonlocal sent
        connection = Connection(url)
        try:
            for item in requests:  # a shared iterator: each request is sent once
                sent += 1
                try:
                    answer = await asyncio.wait_for(
                        connection.request(
                            item.method,
                            item.path,
                            body=item.body,
                            headers=dict(item.headers),
                            raw_head=item.raw_head,
                            close=item.close,
                        ),
                        timeout,
                    )
                    status = str(answer.status)
                except asyncio.TimeoutError:
                    status = "hung"
                    await connection.close()
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    status = f"error: {type(exc).__name__}"
                    await connection.close()
                by_kind[item.kind][status] += 1
                wrong = not status.isdigit() or int(status) not in item.expect
                if wrong and len(unexpected) < 20:
                    unexpected.append(f"{item.kind}: {status}")
        finally:
            await connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(connections)))
    return Flood(by_kind, unexpected, sent, time.perf_counter() - started)


def rss_bytes(pid: int) -> int | None:
    """The process's VmRSS in bytes; None once it is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None
