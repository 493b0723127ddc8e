"""The running requests: by the broker's own id, by their owner's id, and counted per owner.

Request ids are namespaced by their owner: a client names its requests as it likes, and the
broker gives each its own id (``<n>.<epoch>``), which is all a worker ever sees. A client sees,
cancels and resubmits only its own (principal, id) pairs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, ValuesView
from typing import Any

from chords_mq.broker.session import RequestSession


class SessionTable(Mapping[str, RequestSession]):
    """Read as a mapping (the broker's id -> session); changed only by ``add`` and ``remove``."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self._by_id: dict[str, RequestSession] = {}
        self._owned: dict[tuple[str, str], str] = {}  # (principal, the client's id) -> our id
        self._per_owner: dict[str, int] = {}  # principal -> requests it has running
        self._ids = 0

    def __getitem__(self, key: str) -> RequestSession:
        return self._by_id[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_id)

    def __len__(self) -> int:
        return len(self._by_id)

    # The Mapping mixins go through __getitem__ and __iter__; the dict's own are faster, and
    # the broker calls these for every message.
    def get(self, key: str, default: Any = None) -> Any:
        return self._by_id.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._by_id

    def values(self) -> ValuesView[RequestSession]:
        return self._by_id.values()

    def new_id(self) -> str:
        self._ids += 1
        return f"{self._ids:x}.{self.epoch % 4096:x}"

    def add(self, session: RequestSession) -> None:
        self._by_id[session.id] = session
        self._owned[(session.owner, session.client_id)] = session.id
        self._per_owner[session.owner] = self._per_owner.get(session.owner, 0) + 1

    def remove(self, session: RequestSession) -> bool:
        """Forget ``session``; False if it was not running (already finished)."""
        if self._by_id.pop(session.id, None) is None:
            return False
        self._owned.pop((session.owner, session.client_id), None)
        left = self._per_owner.pop(session.owner, 1) - 1
        if left > 0:
            self._per_owner[session.owner] = left
        return True

    def owned(self, principal: str, client_id: str | None) -> RequestSession | None:
        """The running request ``principal`` calls ``client_id``, if any."""
        ours = self._owned.get((principal, client_id or ""))
        return None if ours is None else self._by_id.get(ours)

    def running_for(self, principal: str) -> int:
        return self._per_owner.get(principal, 0)

    def queued_tasks(self) -> int:
        return sum(session.queued for session in self._by_id.values())

    def of_model(self, model: str) -> int:
        return sum(1 for session in self._by_id.values() if session.model == model)
