"""CurveZMQ keys: certificate files, the broker's allow-lists, and the ZAP handler.

Keys are ZeroMQ's certificate files (``NAME.key`` holds the public key, ``NAME.key_secret`` both),
written by ``chords keygen DIR NAME``. A broker started with ``--curve KEYS`` reads:

    KEYS/broker.key_secret      its own key pair
    KEYS/clients/*.key          public keys allowed to SUBMIT, CANCEL and ask STATUS
    KEYS/workers/*.key          public keys allowed to register as workers
    KEYS/admins/*.key           client keys that also see every request and worker in STATUS

Roles are per socket: the client socket admits client and admin keys, the worker socket only
worker keys, so a client key cannot say HELLO and a worker key cannot SUBMIT. The ZAP handler
answers libzmq's authentication requests on the broker's own event loop (it is one more plain
socket the loop watches); an unlisted key fails the handshake, so its peer gets nothing at all,
and the broker logs each denied key once. ``AllowList.reload`` (SIGHUP) re-reads the folders, and
the server also checks every message's key against the current lists, so a removed key loses
access at once, not only at its next connection.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import zmq
import zmq.auth
from zmq.utils import z85

from chords_mq.errors import ChordsError

log = logging.getLogger("chords.keys")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
CLIENT_DOMAIN = "chords-client"
WORKER_DOMAIN = "chords-worker"
ROLES = ("clients", "workers", "admins")
MAX_DENIALS_LOGGED = 4096  # distinct denied keys remembered (each is logged once)


def is_loopback(endpoint: str) -> bool:
    """Does a bind endpoint stay on this host? ``tcp://127.x``, ``tcp://[::1]``,
    ``tcp://localhost``, and ``ipc://`` and ``inproc://`` do; ``tcp://*`` and others do not."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface name or a host name: may face the network


class KeyFileError(ChordsError):
    """A key file or key folder that cannot be used."""


def keygen(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write ``DIR/NAME.key`` and ``DIR/NAME.key_secret``; the secret is readable by its owner
    only. Refuses to overwrite an existing key."""
    folder = Path(directory)
    if not name or "/" in name or name.startswith("."):
        raise KeyFileError(f"{name!r} is not a usable key name")
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise KeyFileError(f"{path} exists; remove it first to make a new key")
    folder.mkdir(parents=True, exist_ok=True)
    made_public, made_secret = zmq.auth.create_certificates(folder, name)
    os.chmod(made_secret, 0o600)
    return Path(made_public), Path(made_secret)


def pool_keys(
    folder: str | os.PathLike[str],
    workers: tuple[str, ...] = ("worker",),
    clients: tuple[str, ...] = ("client",),
    admins: tuple[str, ...] = (),
) -> Path:
    """A whole pool's keys in one folder, laid out as ``chords-broker --curve`` reads it, with
    every secret in ``private/`` (a test or a one-host pool; across hosts each secret stays on
    its own host, see deploy/README.md). Returns the folder."""
    root = Path(folder)
    keygen(root, "broker")
    private = root / "private"
    for role, names in (("workers", workers), ("clients", clients), ("admins", admins)):
        (root / role).mkdir(parents=True, exist_ok=True)
        for name in names:
            public, _ = keygen(private, name)
            public.rename(root / role / public.name)
    return root


def load_public(path: str | os.PathLike[str]) -> bytes:
    """The z85 public key in a ``.key`` (or ``.key_secret``) file."""
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read a public key from {path}: {exc}") from None
    if len(public) != 40:
        raise KeyFileError(f"{path}: a z85 public key has 40 characters, this one {len(public)}")
    return public


def load_secret(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys from a ``.key_secret`` file."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read a key pair from {path}: {exc}") from None
    if secret is None:
        raise KeyFileError(f"{path} holds no secret key (a .key file is public; use .key_secret)")
    return public, secret


@dataclass(frozen=True)
class CurveClient:
    """What a client or worker socket needs to talk CURVE to a broker."""

    public: bytes
    secret: bytes
    server: bytes  # the broker's public key

    @classmethod
    def from_files(
        cls, secret_file: str | os.PathLike[str], broker_key_file: str | os.PathLike[str]
    ) -> CurveClient:
        public, secret = load_secret(secret_file)
        return cls(public, secret, load_public(broker_key_file))

    def apply(self, sock: Any) -> None:
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server)


def curve_client(
    secret_file: str | os.PathLike[str] | None, broker_key_file: str | os.PathLike[str] | None
) -> CurveClient | None:
    """Both files or neither: the options ``--curve-secret`` and ``--broker-key`` go together."""
    if secret_file is None and broker_key_file is None:
        return None
    if secret_file is None or broker_key_file is None:
        raise KeyFileError("CURVE needs both --curve-secret FILE and --broker-key FILE")
    return CurveClient.from_files(secret_file, broker_key_file)


class AllowList:
    """The broker's key pair and its allowed public keys per role, read from one folder."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise KeyFileError(f"--curve {folder}: not a folder")
        self.public, self.secret = load_secret(self.folder / "broker.key_secret")
        self.keys: dict[str, frozenset[bytes]] = {}
        self.reload()

    def reload(self) -> None:
        """Re-read ``clients/``, ``workers/`` and ``admins/`` (SIGHUP). A folder that is missing
        admits nobody in that role; an unreadable key file is skipped with a warning."""
        keys: dict[str, frozenset[bytes]] = {}
        for role in ROLES:
            found: set[bytes] = set()
            folder = self.folder / role
            for path in sorted(folder.glob("*.key")) if folder.is_dir() else []:
                try:
                    found.add(load_public(path))
                except KeyFileError as exc:
                    log.warning("skipping %s", exc)
            keys[role] = frozenset(found)
        self.keys = keys
        log.info(
            "allow-lists from %s: %d client, %d worker, %d admin key(s)",
            self.folder,
            len(keys["clients"]),
            len(keys["workers"]),
            len(keys["admins"]),
        )

    def role(self, domain: str, key: bytes) -> str | None:
        """The role ``key`` has on the socket of ``domain``: client, admin, worker or None."""
        if domain == WORKER_DOMAIN:
            return "worker" if key in self.keys["workers"] else None
        if domain == CLIENT_DOMAIN:
            if key in self.keys["admins"]:
                return "admin"
            if key in self.keys["clients"]:
                return "client"
        return None

    def serve(self, sock: Any, domain: str) -> None:
        """Make ``sock`` a CURVE server of ``domain`` (before it binds)."""
        curve_server(sock, self.public, self.secret, domain)


def curve_server(sock: Any, public: bytes, secret: bytes, domain: str) -> None:
    """Make ``sock`` a CURVE server with this key pair, its peers checked by the ZAP handler
    under ``domain`` (before it binds)."""
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    sock.setsockopt_string(zmq.ZAP_DOMAIN, domain)


class KeyRoles(Protocol):
    """What a ZAP handler asks: the role a public key has on a socket's domain, or None."""

    def role(self, domain: str, key: bytes) -> str | None: ...


class ZapHandler:
    """Answers ZAP requests (RFC 27) from a plain REP socket; the owner's loop calls ``handle``
    whenever the socket is readable. It must be bound before any CURVE socket binds.
    ``allow``: the broker's ``AllowList``, or any other ``KeyRoles`` (a worker's pool keys)."""

    def __init__(self, ctx: Any, allow: KeyRoles) -> None:
        self.allow = allow
        self.sock = ctx.socket(zmq.REP)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(ZAP_ENDPOINT)
        self.denied: set[bytes] = set()

    def handle(self) -> None:
        while self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self.sock.send_multipart(self.answer(self.sock.recv_multipart(zmq.DONTWAIT)))

    def answer(self, frames: list[bytes]) -> list[bytes]:
        if len(frames) < 6:
            return [b"1.0", b"", b"500", b"malformed ZAP request", b"", b""]
        version, request_id, domain, address, _identity, mechanism = frames[:6]
        credentials = frames[6:]
        if version != b"1.0":
            return [b"1.0", request_id, b"500", b"unknown ZAP version", b"", b""]
        if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
            return [version, request_id, b"400", b"CURVE required", b"", b""]
        key = z85.encode(credentials[0])
        role = self.allow.role(domain.decode("ascii", "replace"), key)
        if role is None:
            self._log_denial(key, domain, address)
            return [version, request_id, b"400", b"key not allowed", b"", b""]
        # User-Id reaches every frame the peer sends: "role:key".
        return [version, request_id, b"200", b"OK", f"{role}:".encode() + key, b""]

    def _log_denial(self, key: bytes, domain: bytes, address: bytes) -> None:
        if key in self.denied:
            return
        if len(self.denied) >= MAX_DENIALS_LOGGED:
            self.denied.clear()
        self.denied.add(key)
        log.warning(
            "denied an unlisted CURVE key %s from %s on %s (logged once per key)",
            key.decode(),
            address.decode("ascii", "replace"),
            domain.decode("ascii", "replace"),
        )

    def close(self) -> None:
        self.sock.close(0)
