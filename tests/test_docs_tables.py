"""docs/architecture.md quotes the failure policy and the request states as the code declares
them: the tables there are the tables in broker/failures.py and broker/states.py."""

from __future__ import annotations

from pathlib import Path

from chords_mq.broker import failures, states

DOC = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()


def test_the_failure_policy_in_the_docs_is_the_table_the_broker_runs():
    assert failures.table_markdown() in DOC


def test_every_failure_has_exactly_one_rule():
    assert set(failures.RULES) == set(failures.Failure)


def test_the_request_states_in_the_docs_are_the_declared_transitions():
    assert states.table_markdown() in DOC


def test_a_transition_the_table_does_not_allow_is_a_typed_error():
    import pytest

    s, e = states.RequestState, states.RequestEvent
    assert states.next_state(s.PREPARING, e.STARTED) is s.RUNNING
    assert states.next_state(s.RUNNING, e.RELEASED) is s.DECODING
    with pytest.raises(states.RequestStateError, match="cannot take event started"):
        states.next_state(s.RUNNING, e.STARTED)
    for terminal in states.TERMINAL:
        for event in e:
            with pytest.raises(states.RequestStateError):
                states.next_state(terminal, event)
    assert {s.DONE, s.FAILED, s.CANCELLED} == states.TERMINAL
