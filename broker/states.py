"""A request's life, declared: its states, the events that move it, and nothing else.

In the spirit of h11's ``_state.py``: ``TRANSITIONS`` is the whole lifecycle of a
``RequestSession`` as one table, and ``next_state`` refuses an event the table does not allow
in the current state with ``RequestStateError`` (never a silent branch). ``docs/architecture.md``
draws this table; a test holds the drawing to it.

    PREPARING --started--> RUNNING --delivered--> DONE
                           RUNNING --released--> DECODING --delivered--> DONE
    PREPARING, RUNNING, DECODING --failed--> FAILED, --cancelled--> CANCELLED

Whether a request waits for a worker is not a state of its own: a request waits in whichever
state it is in (``RequestSession.no_worker_since``), and its client is told so.
"""

from __future__ import annotations

import enum

from chords_mq.errors import ChordsError


class RequestState(enum.Enum):
    PREPARING = "preparing"  # accepted; a worker is preparing it (the initial latent is due)
    RUNNING = "running"  # the plan runs: tasks go out, results come in, hits are released
    DECODING = "decoding"  # every hit is released; some still wait for their decoded media
    DONE = "done"  # every hit delivered (DONE sent)
    FAILED = "failed"  # an ERROR ended it
    CANCELLED = "cancelled"  # its client cancelled it, or is gone


class RequestEvent(enum.Enum):
    STARTED = "started"  # the initial latent arrived and the plan is built
    RELEASED = "released"  # the plan is done, but hits wait for their media
    DELIVERED = "delivered"  # the plan is done and every hit is delivered
    FAILED = "failed"
    CANCELLED = "cancelled"


S, E = RequestState, RequestEvent
TRANSITIONS: dict[RequestState, dict[RequestEvent, RequestState]] = {
    S.PREPARING: {E.STARTED: S.RUNNING, E.FAILED: S.FAILED, E.CANCELLED: S.CANCELLED},
    S.RUNNING: {
        E.RELEASED: S.DECODING,
        E.DELIVERED: S.DONE,
        E.FAILED: S.FAILED,
        E.CANCELLED: S.CANCELLED,
    },
    S.DECODING: {E.DELIVERED: S.DONE, E.FAILED: S.FAILED, E.CANCELLED: S.CANCELLED},
    S.DONE: {},
    S.FAILED: {},
    S.CANCELLED: {},
}
TERMINAL = frozenset(state for state, moves in TRANSITIONS.items() if not moves)


class RequestStateError(ChordsError, RuntimeError):
    """An event the lifecycle table does not allow in the request's current state."""


def next_state(state: RequestState, event: RequestEvent) -> RequestState:
    """The state ``event`` leads to from ``state``; RequestStateError if it is not allowed."""
    target = TRANSITIONS[state].get(event)
    if target is None:
        allowed = ", ".join(e.value for e in TRANSITIONS[state]) or "none (it is over)"
        raise RequestStateError(
            f"a request in state {state.value} cannot take event {event.value} (allowed: {allowed})"
        )
    return target


def table_markdown() -> str:
    """``TRANSITIONS`` as the Markdown table ``docs/architecture.md`` quotes."""
    events = list(RequestEvent)
    lines = [
        "| state | " + " | ".join(event.value for event in events) + " |",
        "|---|" + "---|" * len(events),
    ]
    for state, moves in TRANSITIONS.items():
        cells = [moves[event].value if event in moves else "-" for event in events]
        lines.append(f"| {state.value} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
