"""A client "host" for the namespace tests: run inside a network namespace with
``ip netns exec NS python -m tests.multihost.agent``.

It reads one JSON command per line on stdin and answers each with one JSON line on stdout,
``{"id": N, "ok": true, "result": ...}`` or ``{"id": N, "ok": false, "error": TYPE, "message":
...}``. Commands run concurrently (a long request and status polls at once), each with its own
AsyncClient, so a poll never shares a socket with a request. The test process never opens a
socket to a namespace address itself (see TRANSPORT-NOTES section 6, route safety).

Ops:
    run      specs, out, keys, timeout, accept_timeout_s, latents: submit every spec on one
             client, write each spec's hits (core, round, dtype, shape, sha256 and, unless
             ``latents`` is false, the latent bytes in base64) and the time each arrived (seconds
             after its submit) to the JSON file ``out``
    status   keys: one STATUS reply
    wait     keys, workers, sessions, timeout: poll STATUS every 50 ms until it lists exactly
             ``workers`` workers (and at least ``sessions`` sessions); returns the
             time.monotonic() at which it first did (the clock is shared across namespaces)
    probe    host, port: can a plain TCP connection be opened (is the broker reachable)?
    quit
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch

from chords_mq.client import AsyncClient, ClientHit
from chords_mq.request import RequestSpec


def hit_record(hit: ClientHit, with_latent: bool = True) -> dict[str, Any]:
    assert hit.latent is not None
    latent = hit.latent.contiguous()
    raw = latent.view(torch.uint8).numpy().tobytes() if latent.numel() else b""
    return {
        "core": hit.core,
        "round": hit.round,
        "dtype": str(latent.dtype).removeprefix("torch."),
        "shape": list(latent.shape),
        "sha256": hashlib.sha256(raw).hexdigest(),
        "latent_b64": base64.b64encode(raw).decode("ascii") if with_latent else None,
    }


class Agent:
    def __init__(self, address: str) -> None:
        self.address = address
        self.out = sys.stdout
        self.tasks: set[asyncio.Task[None]] = set()

    def reply(self, message: dict[str, Any]) -> None:
        self.out.write(json.dumps(message) + "\n")
        self.out.flush()

    def client(self, command: dict[str, Any]) -> AsyncClient:
        keys = command.get("keys") or {}
        return AsyncClient(
            command.get("address", self.address),
            accept_timeout_s=float(command.get("accept_timeout_s", 10.0)),
            curve_secret=keys.get("curve_secret"),
            broker_key=keys.get("broker_key"),
        )

    async def op_run(self, command: dict[str, Any]) -> dict[str, Any]:
        specs = [RequestSpec.from_dict(s) for s in command["specs"]]
        timeout = float(command.get("timeout", 60.0))
        with_latents = bool(command.get("latents", True))
        started = time.monotonic()
        async with self.client(command) as client:

            async def one(spec: RequestSpec) -> dict[str, Any]:
                submitted = time.monotonic()
                stream = client.submit(spec, timeout=timeout)
                hits = []
                async for hit in stream:
                    at_s = time.monotonic() - submitted  # its arrival, before it is hashed
                    hits.append({**hit_record(hit, with_latents), "at_s": at_s})
                return {"hits": hits, "stats": stream.stats, "resubmissions": stream.resubmissions}

            results = await asyncio.gather(*(one(spec) for spec in specs))
        elapsed = time.monotonic() - started
        Path(command["out"]).write_text(json.dumps({"elapsed_s": elapsed, "requests": results}))
        return {"out": command["out"], "elapsed_s": elapsed}

    async def op_status(self, command: dict[str, Any]) -> dict[str, Any]:
        async with self.client(command) as client:
            return await client.status(timeout=float(command.get("timeout", 5.0)))

    async def op_wait(self, command: dict[str, Any]) -> dict[str, Any]:
        deadline = time.monotonic() + float(command["timeout"])
        workers = command.get("workers")
        sessions = int(command.get("sessions", 0))
        polls = 0
        last: dict[str, Any] = {}
        async with self.client(command) as client:
            while True:
                polls += 1
                try:
                    last = await client.status(timeout=1.0)
                except TimeoutError:
                    last = {}
                seen = time.monotonic()
                enough = workers is None or len(last.get("workers", [])) == workers
                if last and enough and len(last.get("sessions", [])) >= sessions:
                    return {"seen_at": seen, "polls": polls, "status": last}
                if seen > deadline:
                    got = len(last.get("workers", [])) if last else None
                    raise TimeoutError(
                        f"wanted {workers} worker(s) and >= {sessions} session(s) within "
                        f"{command['timeout']}s; last status had {got} worker(s)"
                    )
                await asyncio.sleep(0.05)

    async def op_probe(self, command: dict[str, Any]) -> dict[str, Any]:
        def connect() -> dict[str, Any]:
            try:
                with socket.create_connection((command["host"], int(command["port"])), 3.0):
                    return {"connected": True}
            except OSError as exc:
                return {"connected": False, "error": str(exc)}

        return await asyncio.to_thread(connect)

    async def handle(self, command: dict[str, Any]) -> None:
        ident = command.get("id")
        try:
            result = await getattr(self, f"op_{command['op']}")(command)
        except Exception as exc:  # every failure goes back to the test, typed
            self.reply({"id": ident, "ok": False, "error": type(exc).__name__, "message": str(exc)})
        else:
            self.reply({"id": ident, "ok": True, "result": result})

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        self.reply({"id": None, "ok": True, "result": "ready"})
        while True:
            line = await reader.readline()
            if not line:  # the test went away: stop too
                break
            command = json.loads(line)
            if command.get("op") == "quit":
                break
            task = asyncio.create_task(self.handle(command))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=5.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", required=True, help="the broker's client endpoint")
    args = parser.parse_args()
    asyncio.run(Agent(args.address).serve())


if __name__ == "__main__":
    main()
