"""API keys: a file of ``NAME sha256:HEX`` lines, one principal each.

``chords apikey create NAME --file KEYS`` appends a line and prints the secret once. The secret
is 32 random bytes (``secrets.token_urlsafe``), so a plain SHA-256 of it cannot be searched
back; a presented key is hashed and compared with every stored hash in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from chords_mq.errors import ChordsError

PREFIX = "sk-chords-"
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_KEYS = 10_000
MAX_KEY_CHARS = 256  # a presented key longer than this is wrong without hashing it


class ApiKeyError(ChordsError):
    """A keys file that cannot be used, or a name that cannot be a principal."""


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class KeyRing:
    """The principals of a keys file: ``(name, sha256 hex)`` pairs."""

    entries: tuple[tuple[str, str], ...]

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KeyRing:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ApiKeyError(f"cannot read the API keys file {path}: {exc.strerror}") from None
        entries: list[tuple[str, str]] = []
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, _, hashed = line.partition(" ")
            hashed = hashed.strip()
            if not NAME.match(name) or not re.fullmatch(r"sha256:[0-9a-f]{64}", hashed):
                raise ApiKeyError(f"{path}:{number}: expected 'NAME sha256:HEX'")
            entries.append((name, hashed.removeprefix("sha256:")))
        if len(entries) > MAX_KEYS:
            raise ApiKeyError(f"{path}: more than {MAX_KEYS} keys")
        return cls(tuple(entries))

    def principal(self, secret: str) -> str | None:
        """The name whose key ``secret`` is, or None; every stored hash is compared, in
        constant time, whether or not one matched."""
        if not secret or len(secret) > MAX_KEY_CHARS:
            return None
        digest = _digest(secret)
        found = None
        for name, stored in self.entries:
            if hmac.compare_digest(digest, stored) and found is None:
                found = name
        return found


def create_key(path: str | os.PathLike[str], name: str) -> str:
    """Append ``name`` and the hash of a new secret to the keys file (created readable by its
    owner only); return the secret, which is stored nowhere."""
    if not NAME.match(name):
        raise ApiKeyError(f"{name!r}: a key name is 1..64 of A-Z a-z 0-9 _ . -")
    file = Path(path)
    if file.exists() and name in {n for n, _ in KeyRing.load(file).entries}:
        raise ApiKeyError(f"{file} already has a key named {name!r}")
    secret = PREFIX + secrets.token_urlsafe(32)
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as handle:
        handle.write(f"{name} sha256:{_digest(secret)}\n")
    return secret
