"""The broker's directory of a request's results (``broker/directory.py``): who holds each
result, its lineage, what may be let go, the bytes each worker holds, and which results a lost
worker took with it that the request still needs. Plain function calls: no tensors move."""

from __future__ import annotations

import pytest
import torch

from chords_mq.algorithms.base import Parareal, Rectify, Ref, Task
from chords_mq.broker.directory import X0, Directory, Lineage, needed, source_of
from chords_mq.errors import PlanProtocolError

A, B, C = b"worker/a", b"worker/b", b"worker/c"
MB = 1 << 20


def line(task: int, step: int, targets: tuple[int, ...], source: object, core: int = 1) -> Lineage:
    return Lineage(task, core, step, targets, source)  # type: ignore[arg-type]


def test_a_record_names_each_target_its_holder_and_its_lineage():
    directory = Directory()
    record = line(3, 2, (3, 5), Ref(2, 2))
    assert directory.record(record, A, MB) == (Ref(3, 3), Ref(3, 5))
    assert directory.holders(Ref(3, 3)) == {A} and directory.holders(Ref(3, 5)) == {A}
    assert directory.lineage(Ref(3, 5)) == record and record.parents() == (Ref(2, 2),)
    assert directory.lineage(Ref(3, 4)) is None  # not one of its targets
    assert directory.lineage(Ref(9, 3)) is None and directory.holders(Ref(9, 3)) == frozenset()
    assert directory.bytes_per_holder() == {A: 2 * MB}
    directory.copied(Ref(3, 5), B)  # B pulled it for a task and keeps it
    assert directory.holders(Ref(3, 5)) == {A, B}
    assert directory.bytes_per_holder() == {A: 2 * MB, B: MB}
    assert directory.held_by(B) == {Ref(3, 5)} and len(directory) == 2


def test_a_task_input_by_name_is_its_lineage_and_a_tensor_is_the_initial_latent():
    first = Task(id=0, core=1, step=0, round=1, latent=torch.zeros(4), targets=(1, 2))
    assert Lineage.of(first) == line(0, 0, (1, 2), X0)
    assert source_of(torch.ones(2)) is X0 and Lineage.of(first).parents() == ()
    op = Rectify(Ref(4, 6), Ref(2, 6), Ref(3, 6), exclusive=True)
    task = Task(id=7, core=2, step=6, round=5, latent=op, targets=(7,))
    assert Lineage.of(task) == line(7, 6, (7,), op, core=2)
    assert Lineage.of(task).parents() == (Ref(4, 6), Ref(2, 6), Ref(3, 6))


def test_a_replay_is_the_same_task_counted_and_anything_else_is_refused():
    directory = Directory()
    op = Parareal(Ref(1, 4), Ref(2, 4), Ref(3, 4), exclusive=True)
    directory.record(line(5, 4, (5,), op), A, MB)
    assert directory.replays == 0
    out_of_place = Parareal(Ref(1, 4), Ref(2, 4), Ref(3, 4), exclusive=False)
    directory.record(line(5, 4, (5,), out_of_place), B, MB)  # recomputed elsewhere
    assert directory.replays == 1 and directory.holders(Ref(5, 5)) == {A, B}
    for other in (line(5, 3, (5,), op), line(5, 4, (6,), op), line(5, 4, (5,), Ref(1, 4))):
        with pytest.raises(PlanProtocolError, match="recorded as"):
            directory.record(other, C, MB)
    with pytest.raises(PlanProtocolError, match="bytes"):
        directory.record(line(6, 4, (5,), Ref(5, 5)), A, -1)
    with pytest.raises(PlanProtocolError, match="nobody to copy"):
        directory.copied(Ref(8, 9), A)


def scene() -> tuple[Directory, frozenset[Ref]]:
    """A request's results on three workers, and what it still needs: a result its plan names,
    one a queued task's input reads, two an in-flight rectification reads, one a hit not sent
    yet; the rest no one reads."""
    directory = Directory()
    directory.record(line(0, 0, (1, 2), X0), A, MB)  # (0, 1) named; (0, 2) read by nothing
    directory.record(line(1, 1, (2, 4), Ref(0, 1)), B, MB)  # (1, 2) queued input; (1, 4) not
    directory.record(line(2, 2, (4,), Ref(0, 2), core=2), A, MB)  # (2, 4) in flight's input
    directory.record(line(3, 2, (4,), Ref(1, 2)), C, MB)  # (3, 4) in flight's input
    directory.record(line(4, 4, (6,), Ref(3, 4)), C, MB)  # (4, 6): the hit not sent yet
    directory.copied(Ref(2, 4), C)
    queued = [Task(9, 1, 2, 3, Ref(1, 2), (3,))]
    in_flight = [Rectify(Ref(3, 4), Ref(2, 4), Ref(1, 4), exclusive=False)]
    wanted = needed({Ref(0, 1)}, [t.latent for t in queued] + in_flight, [Ref(4, 6)])
    return directory, wanted


def test_needed_is_the_plan_names_the_task_inputs_and_the_hits_not_sent():
    _, wanted = scene()
    assert wanted == {Ref(0, 1), Ref(1, 2), Ref(3, 4), Ref(2, 4), Ref(1, 4), Ref(4, 6)}
    assert needed([], [torch.zeros(2)], []) == frozenset()  # the initial latent is no result


def test_drop_candidates_are_what_no_name_no_task_input_and_no_hit_needs():
    directory, wanted = scene()
    assert directory.drop_candidates(wanted) == {A: {Ref(0, 2)}}
    dropping = needed({Ref(0, 1)}, [Ref(1, 2)], [])  # the in-flight task and the hit are done
    assert directory.drop_candidates(dropping) == {
        A: {Ref(0, 2), Ref(2, 4)},
        B: {Ref(1, 4)},
        C: {Ref(2, 4), Ref(3, 4), Ref(4, 6)},
    }
    told = directory.keep_only(dropping)
    assert told == {A: {Ref(0, 2), Ref(2, 4)}, B: {Ref(1, 4)}, C: {Ref(2, 4), Ref(3, 4), Ref(4, 6)}}
    assert directory.held_by(A) == {Ref(0, 1)} and directory.held_by(B) == {Ref(1, 2)}
    assert directory.held_by(C) == frozenset() and len(directory) == 2
    assert directory.bytes_per_holder() == {A: MB, B: MB}
    # let go, not forgotten: the lineage stays for a recomputation
    assert directory.lineage(Ref(3, 4)) == line(3, 2, (4,), Ref(1, 2))
    assert directory.missing(wanted) == {Ref(3, 4), Ref(2, 4), Ref(1, 4), Ref(4, 6)}
    assert directory.drop_candidates(dropping) == {}


def test_a_lost_worker_takes_exactly_the_needed_results_only_it_held():
    directory, wanted = scene()
    # A held (0, 1) (named), (0, 2) (nobody reads it) and a copy of (2, 4) that C also holds
    assert directory.worker_lost(A, wanted) == {Ref(0, 1)}
    assert directory.holders(Ref(2, 4)) == {C} and Ref(0, 2) not in directory
    assert directory.held_by(A) == frozenset() and A not in directory.bytes_per_holder()
    # then C: everything it held is needed and now held nowhere
    assert directory.worker_lost(C, wanted) == {Ref(2, 4), Ref(3, 4), Ref(4, 6)}
    assert directory.worker_lost(C, wanted) == frozenset()  # gone already
    assert directory.missing(wanted) == {Ref(0, 1), Ref(2, 4), Ref(3, 4), Ref(4, 6)}
    assert directory.worker_lost(B, frozenset()) == frozenset()  # nothing needed: just gone
    assert len(directory) == 0 and directory.bytes_per_holder() == {}


def test_holders_of_a_result_on_two_workers_survive_one_loss():
    directory = Directory()
    directory.record(line(0, 0, (1,), X0), A, MB)
    directory.copied(Ref(0, 1), B)
    assert directory.worker_lost(A, {Ref(0, 1)}) == frozenset()
    assert directory.holders(Ref(0, 1)) == {B}
    assert directory.worker_lost(B, {Ref(0, 1)}) == {Ref(0, 1)}


@pytest.mark.parametrize("kind", [Rectify, Parareal])
def test_an_exclusive_operation_uses_up_its_first_operand_where_it_runs(kind):
    directory = Directory()
    for task in range(3):
        directory.record(line(task, 3, (4,), X0), A, MB)
    directory.copied(Ref(0, 4), B)
    directory.evaluated(kind(Ref(0, 4), Ref(1, 4), Ref(2, 4), False), A)
    assert directory.holders(Ref(0, 4)) == {A, B}  # computed out of place: still there
    directory.evaluated(kind(Ref(0, 4), Ref(1, 4), Ref(2, 4), True), A)
    assert directory.holders(Ref(0, 4)) == {B}  # overwritten in A's memory; B's copy stands
    assert directory.holders(Ref(1, 4)) == {A} and directory.holders(Ref(2, 4)) == {A}
    directory.evaluated(Ref(1, 4), A)
    assert directory.holders(Ref(1, 4)) == {A}
