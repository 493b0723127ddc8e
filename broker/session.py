"""One request: owns its plan, its tasks (``broker.tasks.TaskBook``) and what it holds.

The plan is a dataflow graph, so there is no round barrier here: every task ``plan.ready()``
returns is queued until the dispatcher hands it to an idle worker, except a task none of the
request's hits depends on (``plan.rank`` -1, under a ``core-index`` stop), which is abandoned:
running it would only take a worker from the tasks that matter. The book keeps the attempts:
a lost or failed worker's task runs again, a stale answer is dropped, a late task is copied and
the first answer wins. Every result is checked (one tensor per target, the latent's shape, one
dtype for the whole request) before the plan sees it. The session knows the bytes it holds and
never lets a task run far ahead of the slowest one while it holds more than its budget.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from chords_mq.algorithms.base import (
    Hit,
    Latent,
    Ref,
    Task,
    TaskLedger,
    all_finite,
    check_results,
    distinct_bytes,
    refs_of,
)
from chords_mq.algorithms.stopping import parse_stop
from chords_mq.broker.directory import Directory, Initial, Lineage, needed
from chords_mq.broker.placement import MAX_NODES, GoalGraph, Node, Schedule
from chords_mq.broker.results import ResultStore
from chords_mq.broker.states import RequestEvent, RequestState, next_state
from chords_mq.broker.tasks import Entry, TaskBook
from chords_mq.broker.verify import SessionChecks
from chords_mq.broker.verify import holder_gone as checks_holder_gone
from chords_mq.errors import BadResult, PlanProtocolError
from chords_mq.request import RequestSpec
from chords_mq.solvers import Solver
from chords_mq.wire import DTYPES
from chords_mq.wire.named import HeldResult

log = logging.getLogger("chords.broker")

if TYPE_CHECKING:
    from chords_mq.broker.lineage import RecoveryFailed

# The most tasks one request may run again over its recoveries (``broker.lineage``'s default).
MAX_REPLAYS = 1024

# Tasks may run up to this many rounds ahead of the oldest unfinished one whatever the
# session holds; beyond it only while the session is within its byte budget.
RUN_AHEAD_ROUNDS = 2


@dataclass(frozen=True)
class Declared:
    """What a PREPARED declares of a request's latent, before any tensor: its shape and dtype,
    their size, and the dtype of every result (None: its worker's adapter does not say)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    result_dtype: torch.dtype | None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class PendingHit:
    """A released hit waiting for its decoded media (requests with output media or both)."""

    hit: Hit
    decode_id: int
    media: torch.Tensor | None = None
    worker: bytes | None = None  # the worker decoding it now
    latent: torch.Tensor | None = None  # by name: the hit's latent, as its decoder computed it
    arrived: bool = False  # its decode answered
    parts: int | None = None  # its latent went to the client in PARTs, this many (``broker.parts``)


class MediaQueue:
    """A request's released hits waiting for their decoded media (a request with output media
    or both), in release order: each is decoded by one worker at a time, and goes out once it
    and every hit released before it have their media."""

    def __init__(self) -> None:
        self.pending: list[PendingHit] = []
        self._decode_ids = 0

    def add(self, hits: list[Hit]) -> None:
        for hit in hits:
            self._decode_ids += 1
            self.pending.append(PendingHit(hit, self._decode_ids))

    def next_decode(
        self,
        worker: bytes,
        ready: Callable[[Hit], bool] | None = None,
        one_at_a_time: bool = False,
    ) -> PendingHit | None:
        """The next hit without media that nobody decodes (and, with ``ready``, whose inputs
        are there), now assigned to ``worker``. ``one_at_a_time``: only the first hit not
        delivered, and only while nobody decodes it, so at most one hit's answer is on its
        way and it goes out as it arrives (none waits here for an earlier one)."""
        for pending in self.pending:
            if pending.arrived:
                continue
            if pending.worker is None and (ready is None or ready(pending.hit)):
                pending.worker = worker
                return pending
            if one_at_a_time:
                return None
        return None

    def backlog(self) -> int:
        """Released hits that still need a worker to decode them."""
        return sum(1 for p in self.pending if not p.arrived and p.worker is None)

    def arrived(
        self,
        decode_id: int,
        media: torch.Tensor | None,
        latent: torch.Tensor | None = None,
        parts: int | None = None,
    ) -> list[PendingHit]:
        """Store media (and, by name, the latent, or how many PARTs the client got it in);
        returns the hits now deliverable, in release order."""
        for pending in self.pending:
            if pending.decode_id == decode_id and not pending.arrived:
                pending.media, pending.latent, pending.arrived = media, latent, True
                pending.parts = parts
        ready = []
        while self.pending and self.pending[0].arrived:
            ready.append(self.pending.pop(0))
        return ready

    def decoding(self, decode_id: int, worker: bytes) -> bool:
        """Is ``worker`` the one decoding the hit of ``decode_id`` now (its answer still
        awaited)? Not once the hit is redone under another id, or decoded elsewhere."""
        return any(
            p.decode_id == decode_id and p.worker == worker and not p.arrived for p in self.pending
        )

    def failed(self, decode_id: int) -> None:
        """That decode did not complete: the hit goes to the next free worker."""
        for pending in self.pending:
            if pending.decode_id == decode_id:
                pending.worker = None

    def worker_lost(self, identity: bytes) -> None:
        for pending in self.pending:
            if pending.worker == identity:
                pending.worker = None

    def redo(self, wrong: Callable[[Hit], bool]) -> None:
        """The hits ``wrong`` names are made of wrong results (``broker.verify``): each is
        decoded again under a new id (an answer to the old one is dropped) once they are
        recomputed."""
        for index, pending in enumerate(self.pending):
            if wrong(pending.hit):
                self._decode_ids += 1
                self.pending[index] = PendingHit(pending.hit, self._decode_ids)

    def tensors(self) -> list[torch.Tensor]:
        held = [p.hit.latent for p in self.pending] + [p.latent for p in self.pending]
        return [t for t in held if isinstance(t, torch.Tensor)]

    def latents(self) -> list[Latent]:
        """The hits' latents (by name: what they are made of) not delivered yet."""
        return [p.hit.latent for p in self.pending]


class RequestSession:
    def __init__(
        self,
        request_id: str,
        client: bytes,
        spec: RequestSpec,
        clock: Callable[[], float],
        budget_bytes: int | None = None,
        owner: str | None = None,
        client_id: str | None = None,
        asked_cores: int | None = None,
        wait_for_worker_s: float | None = None,
        data_plane: bool = False,
        max_replays: int = MAX_REPLAYS,
        verify: bool = False,
    ) -> None:
        self.id = request_id  # the broker's own id: workers see this one
        self.client = client  # the routing id its messages go to (the owner's connection)
        self.owner = owner if owner is not None else client.hex()  # who may see and cancel it
        self.client_id = client_id if client_id is not None else request_id  # the owner's id
        self.spec = spec
        self.clock = clock
        self.created = clock()
        self.state = RequestState.PREPARING  # moved only by ``transition`` (broker.states)
        self.budget_bytes = budget_bytes
        self.plan: TaskLedger | None = None
        # Whether the plan is fed its results by name, the tensors kept in ``results``
        # (``broker.results``); decided when the plan starts.
        self.by_name = False
        self.results = ResultStore()
        self.latent_bytes = 0
        # The data plane (``data_plane``, decided when the plan starts): fed by name, its results
        # stay on the workers; ``directory`` says who holds each and how it was made, and a lost
        # one is recomputed (``replays``: tasks run again, by id, with their recorded input;
        # ``recovering``: the results they will make, which tasks reading them wait for).
        self.data_plane = data_plane
        self.named = False
        self.directory = Directory()
        self.max_replays = max_replays
        self.replays: dict[int, Lineage] = {}
        self.recovering: set[Ref] = set()
        self.recovery_failed: RecoveryFailed | None = None  # the core carries it out
        self.drops: dict[bytes, set[Ref]] = {}  # what each holder may let go, not sent yet
        # results asked pushed to the workers that will read them (issue 25; not holders: the
        # directory and recovery by lineage do not count these copies), until let go
        self.pushes: dict[Ref, frozenset[bytes]] = {}
        # Verification by redundancy (``broker.verify``): results carry digests (off the data
        # plane the broker digests them), and sampled tasks run again as replicas.
        self.verify = verify
        self.verifying = SessionChecks()
        self.x0: torch.Tensor | None = None
        self.latent_shape: tuple[int, ...] = ()
        self.broker_latent_bytes = 0  # latent bytes through the broker, to and from workers
        # Any order gives the same bits. The queue serves first the task the schedule starts
        # first, if the dispatcher scheduled the goal graph ahead (``use_schedule``), then the
        # task with the longest chain of work still to come before the request's hits (the
        # plan's rank, HEFT's upward rank), then the earliest round (an even wavefront), then
        # the fastest core (``urgency``).
        self.tasks = TaskBook(self.urgency)
        self.tasks.spare = self.verifying.is_replica
        self.failures: dict[tuple[str, int], int] = {}  # (job kind, task / decode id) -> count
        # The workers preparing / prepared for it, and those it must not use again: written
        # only by ``broker.bindings.Bindings``, which keeps both ends of the relation.
        self.preparing: set[bytes] = set()
        self.prepared: set[bytes] = set()
        self.excluded: set[bytes] = set()
        self.x0_from: bytes | None = None  # the worker asked for the initial latent
        self.x0_values = False  # a PREPARED without x0 could not start the plan: ask for it
        self.x0_digest: str | None = None  # of the initial latent the plan started from
        self.x0_source = ""  # the name of the worker that sent it
        self.digests: dict[bytes, tuple[str, str]] = {}  # before x0: worker -> (name, digest)
        # Workers whose result for a task failed the checks, until another worker's result
        # for that task passes them (which confirms the fault): task id -> worker principals.
        self.suspects: dict[int, set[str]] = {}
        # By worker: the inputs it could not get (FAILED lost_input or corrupt_input); past
        # --max-lost-inputs it leaves the request (the failure table's INPUTS_UNREACHABLE).
        self.lost_inputs: dict[bytes, int] = {}
        # Holders a fetcher said served other bytes than their digest (FAILED corrupt_input,
        # verifying): no recomputation of this request goes to them (``avoids``). Else a holder
        # that serves corrupt copies is given back each result it was caught on, for as long as
        # no probe has struck it: under load, 1024 replays and recovery_too_large.
        self.accused: set[bytes] = set()
        # By holder: the principals whose workers could not get its copies (FAILED
        # lost_input); at two, the holder leaves the request (``WorkerHandlers._unreachable``).
        self.unreachable: dict[bytes, set[str]] = {}
        self.chained = 0  # tasks sent behind the one they follow, in a chain (``follow``)
        self.pushes_asked = 0  # results asked pushed to a reader's worker, times its readers
        self.pushed_inputs = 0  # inputs an EVAL named pushed to its worker (``Job.pushed``)
        self.bad_results = 0
        self.last_bad = ""  # the reason of the latest bad result (non_finite, dtype ...)
        self.result_dtype: torch.dtype | None = None
        # The latent PREPARED declared (every prepared worker must declare the same); with a
        # declared result dtype, a result of another dtype is a bad one, held against its worker.
        self.declared: Declared | None = None
        self.evaluations = 0
        self.compute_s = 0.0  # worker-reported model and solver time, over accepted results
        self.forwards = 0  # EVAL messages answered (fewer than evaluations in batch mode)
        self.abandoned = 0  # tasks not run: the returned hit does not depend on them
        self.hits_sent = 0
        self.core_hits = 0  # hits of real cores sent (the zero-th hit not counted)
        self.peak_bytes = 0
        self.core_steps: dict[int, int] = {}  # highest step each core has evaluated
        self.finished: set[Node] = set()  # (core, step) of every task whose result is in
        self.schedule: Schedule | None = None  # the goal graph scheduled ahead (dispatch)
        self._goal: GoalGraph | None = None
        self.media = MediaQueue()  # released hits waiting for their media (output media)
        self.no_worker_since: float | None = None
        self.wait_for_worker_s = wait_for_worker_s  # the request's own patience, if it said
        # its client takes a hit's latent in PARTs (its SUBMIT said so: ``broker.parts``)
        self.hit_parts = False
        self.parts_sent = 0  # PARTs of hits' latents sent on to it
        self.last_progress = -1e9
        # How many workers can usefully work on this request at once.
        self.parallelism = spec.resolved_cores()
        # what it asked for, before the cores policy granted ``parallelism``
        self.asked_cores = self.parallelism if asked_cores is None else asked_cores

    @property
    def model(self) -> str:
        return self.spec.model

    @property
    def queued(self) -> int:
        return len(self.tasks)

    @property
    def in_flight(self) -> dict[int, Entry]:
        return self.tasks.in_flight

    @property
    def retries(self) -> int:
        return self.tasks.retries

    @property
    def done(self) -> bool:
        """The plan is finished and every hit has been delivered (media included)."""
        return self.plan is not None and self.plan.done and not self.media.pending

    @property
    def wants_media(self) -> bool:
        return self.spec.output != "latent"

    def elapsed(self) -> float:
        return self.clock() - self.created

    # -- preparing -------------------------------------------------------------------------------

    def wants_worker(self, identity: bytes) -> bool:
        """Should this idle worker be prepared for us now? Yes if it is not prepared yet and
        the request can use one more worker, or if the request still lacks its initial latent
        and nobody is asked for it (the one asked was lost, and the others are prepared)."""
        if identity in self.preparing or identity in self.excluded:
            return False
        if self.plan is None and self.x0_from is None:
            return True
        if identity in self.prepared:
            return False
        if len(self.prepared) + len(self.preparing) >= self.parallelism:
            return False
        return self.plan is None or bool(self.tasks)

    def transition(self, event: RequestEvent) -> None:
        """Move to the state ``event`` leads to (``broker.states.TRANSITIONS``); an event the
        table does not allow here raises RequestStateError."""
        self.state = next_state(self.state, event)

    def x0_wanted(self, has_data: bool) -> bool:
        """Must the first PREPARED send x0's values (the PREPARE's ``initial``)? Only where the
        broker reads them: off the data plane (or for a worker without a data endpoint), for a
        method not fed by name (ParaDIGMS), a stop rule that reads the hits' values, or once a
        PREPARED without them could not start the plan (``x0_values``). On the data plane the
        worker sends x0's declaration and digest and keeps x0, as every prepared worker does."""
        if self.x0_values or not (self.data_plane and has_data and self.spec.rules.by_name):
            return True
        stop = parse_stop(self.spec.resolved_stop())
        return stop is not None and stop.reads_latents

    def start(self, x0: torch.Tensor, solver: Solver) -> bool:
        """Build the plan from the initial latent and the solver spec a worker sent. On the
        data plane the plan starts from a stand-in of x0's shape and dtype that holds no
        memory: every prepared worker holds x0 itself and the broker never reads it (unless
        the plan reads its hits' values: then it is fed tensors, and x0 is kept). ``x0`` may
        be that stand-in already (the worker declared x0 and kept it): False, and nothing
        starts, if the plan needs x0's values after all."""
        initial = x0
        if self.data_plane and self.spec.rules.by_name:
            # torch.empty, not empty_like: on a meta tensor empty_like goes through torch's
            # Python reference kernels, whose first call imports sympy (0.37 s here: the
            # broker's first request waited for it between PREPARED and its first EVAL)
            initial = torch.empty(tuple(x0.shape), dtype=x0.dtype, device="meta")
        plan = self.spec.build_plan(initial, solver)
        if initial is not x0 and plan.reads_latents:
            initial, plan = x0, self.spec.build_plan(x0, solver)
        if x0.is_meta and (initial is x0 or plan.reads_latents):
            return False  # the plan reads x0's values, and only a stand-in came
        self.transition(RequestEvent.STARTED)
        self.plan = plan
        self.by_name = self.spec.rules.by_name and not plan.reads_latents
        self.named = self.by_name and self.data_plane
        self.latent_bytes = x0.untyped_storage().nbytes()
        self.x0, self.latent_shape = initial, tuple(x0.shape)
        self.tasks.unfollow = plan.unfollow
        self._pull()
        return True

    # -- chains ----------------------------------------------------------------------------------

    @property
    def chains(self) -> bool:
        """May an EVAL carry a core's next steps too (``follow``)? On the data plane (a
        follower reads its input where the worker keeps it), and only unverified: a follower
        reads its input before the broker has judged it, which verification forbids."""
        return self.named and not self.verify and self.plan is not None

    def follow(self, head: Task, worker: bytes, limit: int) -> list[tuple[Task, int]]:
        """Up to ``limit`` tasks that follow ``head`` one after another (``Plan.follow``: each
        reads only the step before's fine result), in flight on ``worker`` behind it."""
        assert self.plan is not None
        chain: list[tuple[Task, int]] = []
        task = head
        while len(chain) < limit and (nxt := self.plan.follow(task.id)) is not None:
            self.tasks.follow(nxt, worker)
            chain.append((nxt, 0))
            task = nxt
        self.chained += len(chain)
        return chain

    def take_back(self, entries: list[tuple[Task, int]]) -> None:
        """A chain's worker will not run ``entries`` (its head's answer was bad, stale or the
        worker went): each runs again elsewhere, or, not ready yet, is taken back."""
        for task, attempt in entries:
            self.tasks.requeue(task.id, attempt)

    @property
    def hits_one_at_a_time(self) -> bool:
        """By name, each hit's latent comes from the worker that computes it and goes on to
        the client through the broker: one at a time, in release order, so the broker holds
        at most the one arriving and the one going out (``MediaQueue.next_decode``)."""
        return self.named and self.spec.output != "media"

    # -- tasks -----------------------------------------------------------------------------------

    def urgency(self, task: Task) -> tuple[float, ...]:
        """The queue's order for ``task``: smaller goes out first (see ``__init__``); a
        replay first of all, parents before children."""
        assert self.plan is not None
        if task.id in self.replays or self.verifying.urgent(task):  # a chain waits for it
            return (-math.inf, 0.0, 0.0, task.step, -task.core)
        slot = None if self.schedule is None else self.schedule.slots.get((task.core, task.step))
        planned = (0.0, 0.0) if slot is None else (slot.start, slot.budget)
        return (*planned, -self.plan.rank(task), task.round, -task.core)

    def queued_tasks(self) -> list[Task]:
        """The queued tasks, the next to go out first."""
        return self.tasks.queued()

    def goal_graph(self) -> GoalGraph | None:
        """The plan's goal graph (``Plan.goal``) with what scheduling reads; None if the plan
        does not know its tasks in advance, or they are too many to schedule ahead."""
        if self._goal is None and self.plan is not None:
            graph = self.plan.goal()
            if graph is not None and len(graph) <= MAX_NODES:
                self._goal = GoalGraph.of(graph)
        return self._goal

    def use_schedule(self, schedule: Schedule | None) -> None:
        """Order the queue by ``schedule`` from now on (None: by rank alone)."""
        self.schedule = schedule
        self.tasks.reorder()

    def _pull(self, hits: list[Hit] | None = None) -> None:
        """Queue what the plan readied; ``hits``: just released, not yet in the media queue
        (by name, what they are made of is kept for them)."""
        assert self.plan is not None
        for task in self.plan.ready():
            if self.plan.rank(task) < 0:  # none of the request's hits depends on it
                self.plan.abandon(task.id)
                self.abandoned += 1
            elif self.by_name and not self.named:  # the task goes out with its input computed
                self.tasks.push(
                    dataclasses.replace(task, latent=self.results.evaluate(task.latent))
                )
            else:  # (by name on the data plane: its input as the plan's operation)
                self.tasks.push(task)
        if self.named:
            self._let_go([hit.latent for hit in hits or ()])
        elif self.by_name:
            self.results.keep_only(self.plan.names())

    # -- the data plane (``named``) --------------------------------------------------------------

    def needed(self, extra: list[Latent] | None = None) -> frozenset[Ref]:
        """The results the request still needs (``directory.needed``): its plan's names, the
        inputs of its queued, running and late tasks (replays included), its hits not
        delivered yet, and the results being recomputed."""
        assert self.plan is not None
        inputs = [task.latent for task in self.tasks.all_tasks()] + (extra or [])
        kept = needed(self.plan.names(), inputs, self.media.latents()) | self.recovering
        return kept | self.verifying.compared()  # (a COMPARE may fetch them)

    def _let_go(self, extra: list[Latent] | None = None) -> None:
        """Whatever no longer needed is let go: a DROP for each holder (``drops``)."""
        needed = self.needed(extra)
        for holder, refs in self.directory.keep_only(needed).items():
            self.drops.setdefault(holder, set()).update(refs)
        # a pushed copy never read (its reader ran elsewhere): once its result is in and
        # nothing needs it (a push is asked for before its result exists)
        done = [
            ref
            for ref in self.pushes
            if ref not in needed and self.directory.record_of(ref.task) is not None
        ]
        for ref in done:
            log.debug("request %s: the copy of %s pushed was not read there", self.id, ref)
            for target in self.pushes.pop(ref):
                self.drops.setdefault(target, set()).add(ref)

    def drop_later(self, holder: bytes, refs: tuple[Ref, ...] | set[Ref]) -> None:
        """``holder`` is to let ``refs`` go (a replica's results, a wrong result); off the
        data plane workers keep nothing."""
        if self.named:
            self.drops.setdefault(holder, set()).update(refs)

    def take_drops(self) -> dict[bytes, set[Ref]]:
        drops, self.drops = self.drops, {}
        return drops

    def blocked(self, task: Task) -> bool:
        """Does ``task`` read a result being recomputed? It waits for it."""
        return not self.recovering.isdisjoint(refs_of(task.latent))

    def home(self, task: Task) -> frozenset[bytes]:
        """The workers holding ``task``'s first input (a core's own chain): where it runs
        without a transfer. Empty for x0, which every prepared worker holds."""
        refs = refs_of(task.latent)
        return self.directory.holders(refs[0]) if refs else frozenset()

    def decodable(self, hit: Hit) -> bool:
        """May ``hit`` be decoded now? Not while a result it is made of is recomputed, nor
        while one it is made from waits for its replica (``broker.verify``: that replica is
        then urgent), so a hit never goes out before the checks of its lineage end."""
        refs = refs_of(hit.latent)
        if self.recovering and not self.recovering.isdisjoint(refs):
            return False
        audited = self.verifying.audited()
        if not audited:
            return True
        waiting = audited & self.directory.ancestors(refs)
        self.verifying.awaited |= waiting
        return not waiting

    def holder_gone(self, identity: bytes) -> None:
        """``identity`` holds nothing of the request any more (lost, or released from it):
        every result it held that the request still needs is recomputed."""
        if not self.named or self.plan is None:
            return
        checks_holder_gone(self, identity)  # a result held for verification is gone too
        lost = self.directory.worker_lost(identity, self.needed())
        self.recover(lost)

    def accuse(self, holder: bytes) -> None:
        """A fetcher said ``holder`` served other bytes than their digest: from now on no
        recomputation of this request goes to it (the request's other tasks still may; the
        holder is not judged here: a probe does that, ``broker.probes``). Until the first
        accusation the task book has no such gate: no cost to a request without any."""
        self.accused.add(holder)
        self.tasks.avoid = self.avoids

    def avoids(self, task: Task, worker: bytes) -> bool:
        """Must ``worker`` not run ``task``? A recomputation (``replays``) on a worker accused
        in this request of serving corrupt data, unless every worker the request has is
        accused (then it runs as before: the request's replays bound it, and it never waits
        on a worker it will not use)."""
        if task.id not in self.replays or worker not in self.accused:
            return False
        return not (self.prepared - self.excluded) <= self.accused

    def input_lost(self, ref: Ref, holder: bytes | None) -> None:
        """A worker could not get ``ref`` from ``holder`` (FAILED lost_input): that holder
        counts as lost for it, and it is recomputed if nobody else holds it."""
        if not self.named or self.plan is None:
            return
        if holder is not None:
            self.directory.forget(holder, (ref,))
        if ref not in self.directory and ref in self.needed() and ref not in self.recovering:
            self.recover(frozenset((ref,)))

    def recover(self, lost: frozenset[Ref]) -> None:
        """Queue the replays that recompute ``lost`` (``broker.lineage``), ahead of every
        other task; a recovery past the request's bound is ``recovery_failed``. No capable
        worker left is not a failure here: the replays wait, and the request fails after its
        patience as any request without a worker (``NO_WORKER``)."""
        # (imported here: the failure table that lineage names imports this module)
        from chords_mq.broker.lineage import RecoveryFailed, recovery_plan

        lost = frozenset(ref for ref in lost if ref not in self.recovering)
        if not lost:
            self._let_go()
            return
        try:
            plan = recovery_plan(self.directory, lost, self.max_replays)
        except RecoveryFailed as exc:
            self.recovery_failed = exc
            return
        for record in plan.replays:
            if record.task in self.replays:
                continue
            self.replays[record.task] = record
            self.recovering.update(record.results())
            latent: Latent = self.x0 if isinstance(record.input, Initial) else record.input  # type: ignore[assignment]
            task = Task(record.task, record.core, record.step, 0, latent, record.targets)
            self.tasks.push(task)
        self.tasks.blocked = self.blocked if self.recovering else None

    def check_held(self, task: Task, held: Mapping[int, HeldResult]) -> None:
        """``check`` for results a worker kept: what it says it checked of each (one per target,
        the latent's shape, the request's one dtype, its size, finite). A worker that lies
        about the shape is caught by the next worker that fetches it (value verification is
        issue 26)."""
        if set(held) != set(task.targets):
            raise BadResult(
                "malformed", f"task {task.id}: results for {sorted(held)}, not {task.targets}"
            )
        first = next(iter(held.values()))
        wanted = self.result_dtype or DTYPES.get(first.dtype)
        for target, meta in held.items():
            dtype = DTYPES.get(meta.dtype)
            if dtype is None or not dtype.is_floating_point or dtype != wanted:
                raise BadResult(
                    "dtype",
                    f"task {task.id}: result for step {target} is {meta.dtype}, the request's "
                    f"latents are {wanted}",
                )
            if meta.shape != self.latent_shape:
                raise BadResult(
                    "shape",
                    f"task {task.id}: result for step {target} has shape {list(meta.shape)}, "
                    f"the request's latents {list(self.latent_shape)}",
                )
            size = math.prod(meta.shape) * dtype.itemsize
            if meta.nbytes != size:
                raise BadResult(
                    "malformed", f"task {task.id}: {meta.nbytes} bytes for a {size}-byte result"
                )
            if not meta.finite:
                raise BadResult(
                    "non_finite", f"task {task.id}: result for step {target} has NaN or Inf"
                )
            # it could never be verified (--verify off: none asked for, and none needed)
            if self.verify and meta.digest is None:
                raise BadResult(
                    "malformed", f"task {task.id}: result for step {target} has no digest"
                )

    def complete_held(self, task: Task, held: Mapping[int, HeldResult], holder: bytes) -> list[Hit]:
        """Record one checked result a worker kept (``holder``); feed the plan its names and
        return the hits it released. A replay's results only re-enter the directory."""
        assert self.plan is not None
        self.tasks.answered(task.id)
        nbytes = next(iter(held.values())).nbytes
        self.result_dtype = self.result_dtype or DTYPES[next(iter(held.values())).dtype]
        replay = self.replays.pop(task.id, None)
        if replay is not None:
            self.directory.record(replay, holder, nbytes, _digests(held))
            self.recovering.difference_update(replay.results())
            self.tasks.blocked = self.blocked if self.recovering else None
            self._let_go()
            return []
        self.evaluations += 1
        self.core_steps[task.core] = max(self.core_steps.get(task.core, -1), task.step)
        self.finished.add((task.core, task.step))
        recorded = self.directory.record(Lineage.of(task), holder, nbytes, _digests(held))
        named = dict(zip(task.targets, recorded))
        hits = self.plan.complete(task.id, named, checked=True)  # by ``check_held``
        self._pull(hits)
        return hits

    def dispatchable(self) -> int:
        """How many queued tasks may go out now: all of them, except that a task more than
        ``RUN_AHEAD_ROUNDS`` past the frontier waits while the session is over its budget."""
        head = self.tasks.head()  # the task that would go out next
        if head is None or self.plan is None:
            return 0
        queued = self.tasks.runnable()  # (tasks waiting for a recomputed input excluded)
        if queued == 0:
            return 0
        if self.budget_bytes is None or not self.tasks.in_flight:
            return queued  # nothing runs: the queue holds the frontier
        if head.round <= self.tasks.frontier() + RUN_AHEAD_ROUNDS:
            return queued
        return queued if self.held_bytes() <= self.budget_bytes else 0

    def current(self, task_id: int, attempt: int) -> Task | None:
        """The task this answer is for, or None if it is stale (``TaskBook.current``)."""
        return None if self.plan is None else self.tasks.current(task_id, attempt)

    def check(self, task: Task, results: Mapping[int, torch.Tensor]) -> None:
        """Raise ``BadResult`` unless ``results`` are what ``task`` asked for: one tensor per
        target, the latent's shape, one dtype for the whole request (the first result's: the
        model's and the solver's, which may differ from the initial latent's), finite."""
        try:
            check_results(task, results)
        except PlanProtocolError as exc:
            raise BadResult("malformed", str(exc)) from None
        wanted = self.result_dtype or next(iter(results.values())).dtype
        for target, tensor in results.items():
            if tensor.dtype != wanted:
                raise BadResult(
                    "dtype",
                    f"task {task.id}: result for step {target} is {tensor.dtype}, the request's "
                    f"latents are {wanted}",
                )
            if not all_finite(tensor):
                raise BadResult(
                    "non_finite", f"task {task.id}: result for step {target} has NaN or Inf"
                )

    def complete(self, task: Task, results: Mapping[int, torch.Tensor]) -> list[Hit]:
        """Feed one checked result to the plan; returns the hits it released."""
        assert self.plan is not None
        self.tasks.answered(task.id)
        self.evaluations += 1
        self.result_dtype = self.result_dtype or next(iter(results.values())).dtype
        self.core_steps[task.core] = max(self.core_steps.get(task.core, -1), task.step)
        self.finished.add((task.core, task.step))
        if self.by_name:
            named = self.results.put(task.id, results)
            hits = self.plan.complete(task.id, named, checked=True)  # by ``check``
            hits = [dataclasses.replace(h, latent=self.results.evaluate(h.latent)) for h in hits]
        else:
            hits = self.plan.complete(task.id, results, checked=True)
        self._pull()
        return hits

    def worker_lost(self, identity: bytes) -> None:
        """The worker will not answer: its tasks run again (next attempt), its decodes go to
        another worker, and if it was asked for the initial latent, another is asked."""
        if self.x0_from == identity and self.plan is None:
            self.x0_from = None
        self.media.worker_lost(identity)
        self.tasks.worker_lost(identity)
        self.holder_gone(identity)

    # -- memory and reports ----------------------------------------------------------------------

    def held_bytes(self) -> int:
        """Bytes of latent memory this request holds: the plan's (stores, handed-out tasks), or
        the results it names and the inputs of the tasks it handed out, and the hits waiting for
        media. A tensor that several hold counts once."""
        tensors = self.plan.held_tensors() if self.plan is not None else []
        if self.by_name:
            tensors += self.results.tensors() + self.tasks.tensors()
        tensors += self.media.tensors() + self.verifying.tensors()  # (results held, off it)
        held = distinct_bytes(tensors)
        self.peak_bytes = max(self.peak_bytes, held)
        return held

    def progress(self) -> dict[str, Any]:
        return {
            "evaluations": self.evaluations,
            "hits": self.hits_sent,
            "cores": [[core, step] for core, step in sorted(self.core_steps.items())],
        }

    def stats(self) -> dict[str, Any]:
        returned = self.plan.returned if self.plan is not None else None
        self.held_bytes()
        return {
            "evaluations": self.evaluations,
            "retries": self.retries,
            "abandoned": self.abandoned,
            "hits": self.hits_sent,
            "wall_s": round(self.elapsed(), 6),
            "compute_s": round(self.compute_s, 6),
            "forwards": self.forwards,
            "peak_bytes": self.peak_bytes,
            "broker_latent_bytes": self.broker_latent_bytes,
            "latent_bytes": self.latent_bytes,
            "replays": self.directory.replays,
            "chained": self.chained,
            "pushes": self.pushes_asked,
            "pushed_inputs": self.pushed_inputs,
            "hit_parts": self.parts_sent,
            "verify_evaluations": self.verifying.evaluations,
            "returned": None
            if returned is None
            else {"core": returned.core, "round": returned.round},
        }

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model": self.model,
            "method": self.spec.method,
            "steps": self.spec.steps,
            "evaluations": self.evaluations,
            "hits": self.hits_sent,
            "queued": len(self.tasks),
            "in_flight": len(self.in_flight),
            "workers": len(self.prepared),
            "held_bytes": self.held_bytes(),
            "broker_latent_bytes": self.broker_latent_bytes,
            "elapsed_s": round(self.elapsed(), 3),
        }


def _digests(held: Mapping[int, HeldResult]) -> dict[int, str | None]:
    """The digest a worker reported of each target's result it kept."""
    return {target: meta.digest for target, meta in held.items()}
