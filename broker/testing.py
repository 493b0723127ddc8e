"""What the simulator and the broker-core tests share: a fake clock, a velocity, and the answers
an honest worker gives (PREPARED and RESULT, and by name ``HonestPool``: workers that keep their
results), computed in-process without a model.

The core is driven with these exactly as the server drives it, only in fake time; nothing here
opens a socket. ``velocity`` is the one the tests' expected hits are computed with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from chords_mq.algorithms.base import Ref, evaluate
from chords_mq.algorithms.distance import distance
from chords_mq.solvers import solve_targets, solver_spec, unit_euler
from chords_mq.wire import (
    DTYPE_NAMES,
    PROTOCOL_VERSION,
    ComparedMessage,
    CompareMessage,
    DecodedMessage,
    DecodeMessage,
    DropMessage,
    EvalMessage,
    FailedMessage,
    HelloMessage,
    Message,
    PreparedMessage,
    PrepareMessage,
    ReleaseMessage,
    ResultEntry,
    ResultMessage,
    SolverSpec,
    failed_for,
    tensor_digest,
)
from chords_mq.wire.named import X0_REF, HeldResult, NamedInput, NamedRef

X0 = torch.linspace(-1, 1, 4)  # the initial latent an honest fake worker prepares


class FakeClock:
    """A clock the caller moves: ``clock.now += seconds``."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def velocity(x: torch.Tensor, step: int) -> torch.Tensor:
    """The fake model: cheap, nonlinear, different at every step."""
    return torch.tanh(x) * (1 + step) * 0.01 - 0.1 * x


def hello(name: str, model: str, **changes: object) -> HelloMessage:
    """A worker's HELLO (``changes`` override fields): it answers probes (``HonestPool``
    does)."""
    fields: dict[str, object] = {
        "worker": name,
        "model": model,
        "device": "cpu",
        "dtype": "float32",
        "max_batch": 1,
        "version": "test",
        "protocol": PROTOCOL_VERSION,
        "device_class": "cpu:test",
        "capabilities": ["probe"],
    }
    fields.update(changes)
    return HelloMessage(**fields)  # type: ignore[arg-type]


def prepared_for(job: PrepareMessage, x0: torch.Tensor = X0) -> PreparedMessage:
    """An honest PREPARED: the unit Euler solver, x0's declaration and digest, and x0 itself if
    the PREPARE asked for it."""
    fields, tensors = solver_spec(unit_euler)
    reply = PreparedMessage(
        solver=SolverSpec(fields, tensors),
        x0_digest=tensor_digest(x0),
        x0=x0 if job.initial else None,
        shape=list(x0.shape),
        dtype=DTYPE_NAMES[x0.dtype],
    )
    return reply.ids(job)


def result_for(job: EvalMessage) -> ResultMessage:
    """An honest RESULT: each task's solver results under ``velocity``."""
    entries = []
    for entry, latent in zip(job.entries, job.latents):
        out = velocity(latent, entry.step)
        results = solve_targets(unit_euler, latent, out, entry.step, entry.targets)
        entries.append(ResultEntry(entry.task, entry.attempt, results))
    return ResultMessage(entries=tuple(entries), compute_s=0.001).ids(job)


class HonestPool:
    """Honest workers that speak by name (protocol 7): each keeps its results in a dict, as a
    ``LatentStore`` does, under its data endpoint; an input held elsewhere is read from a
    holder's dict (a lost worker's is gone: the answer is FAILED lost_input, as a real worker's
    after its fetches). No sockets: the same arithmetic as ``result_for``. ``faulty``: workers
    (by name) whose every result goes through that function before they keep it and report
    its digest, or off the data plane before they send it (a faulty GPU: wrong but finite)."""

    def __init__(self, x0: torch.Tensor = X0) -> None:
        self.x0 = x0  # the initial latent every worker prepares
        self.stores: dict[str, dict[tuple[str, Ref], torch.Tensor]] = {}
        self.fetched = 0  # inputs read from another worker's store
        self.faulty: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}  # endpoint -> fault
        # endpoint -> what it serves to a fetcher instead of what it keeps (``serve:zeros``)
        self.serving: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        # each of those reads: (the holder's endpoint, the reader's, the tensor's bytes)
        self.transfers: list[tuple[str, str, int]] = []
        # Pushes (an EVAL's ``push``, issue 25): what each worker was pushed, by (request,
        # ref), until an EVAL naming it ``pushed`` reads it; each push made (the producer's
        # endpoint, the reader's, the request, the ref, the bytes) and each copy read (the
        # reader's endpoint, the request, the ref). ``deliver_pushes`` False: pushes are lost
        # (the reader fetches instead).
        self.inbox: dict[str, dict[tuple[str, Ref], torch.Tensor]] = {}
        self.pushes: list[tuple[str, str, str, Ref, int]] = []
        self.used_pushes: list[tuple[str, str, Ref]] = []
        self.deliver_pushes = True

    @staticmethod
    def endpoint(name: str) -> str:
        return f"tcp://{name}:1"

    def lose(self, endpoint: str) -> None:
        """The worker is gone, and everything it held."""
        self.stores.pop(endpoint, None)
        self.inbox.pop(endpoint, None)

    def held(self, endpoint: str) -> set[tuple[str, Ref]]:
        return set(self.stores.get(endpoint, {}))

    def _value(
        self, endpoint: str, request: str, value: NamedInput, pushed: tuple[Ref, ...] = ()
    ) -> torch.Tensor:
        own = self.stores.setdefault(endpoint, {})
        inbox = self.inbox.get(endpoint, {})
        tensors = {}
        for named in value.refs:
            tensor = own.get((request, named.ref))
            if tensor is None and named.ref in pushed:
                tensor = inbox.pop((request, named.ref), None)
                if tensor is not None:
                    self.used_pushes.append((endpoint, request, named.ref))
            if tensor is None:
                tensor = self._fetch(endpoint, request, named)
            tensors[named.ref] = tensor
        return evaluate(value.latent(), tensors.__getitem__)

    def _push(self, job: EvalMessage, endpoint: str) -> None:
        """The pushes ``job`` asks for, once its results are kept: each into its reader's
        inbox (a live worker's), as a worker's ``Pusher`` does."""
        request = job.request or ""
        own = self.stores.get(endpoint, {})
        for push in job.push or ():
            tensor = own.get((request, push.ref))
            if tensor is None:
                continue
            for to in push.to:
                if to.endpoint == endpoint or to.endpoint not in self.stores:
                    continue
                self.pushes.append((endpoint, to.endpoint, request, push.ref, tensor.nbytes))
                if self.deliver_pushes:
                    self.inbox.setdefault(to.endpoint, {})[(request, push.ref)] = tensor

    def _fetch(self, endpoint: str, request: str, named: NamedRef) -> torch.Tensor:
        """``named`` from the first holder that has it with the digest the broker named, as a
        worker's fetch; LookupError(named, the last holder that served other bytes)."""
        corrupt = None
        for holder in named.holders:
            kept = self.stores.get(holder.endpoint, {}).get((request, named.ref))
            if kept is None:
                continue
            serve = self.serving.get(holder.endpoint)
            tensor = kept if serve is None else serve(kept)
            if holder.digest is not None and tensor_digest(tensor) != holder.digest:
                corrupt = holder.endpoint
                continue
            self.fetched += 1
            self.transfers.append((holder.endpoint, endpoint, tensor.nbytes))
            return tensor
        raise LookupError(named, corrupt)

    def _compare(self, job: CompareMessage, endpoint: str) -> ComparedMessage:
        """A worker's COMPARE: each result of ``theirs`` fetched, its distance from ours; a
        probe (no ``mine``): the digest of each as its holder serves it."""
        request = job.request or ""
        if not job.mine:
            try:
                served = [self._fetch(endpoint, request, theirs.refs[0]) for theirs in job.theirs]
            except LookupError:
                return ComparedMessage(error="not fetched").ids(job)
            return ComparedMessage(digests=tuple(map(tensor_digest, served))).ids(job)
        own = self.stores.get(endpoint, {})
        distances = []
        for ref, theirs in zip(job.mine, job.theirs, strict=True):
            mine = own.get((request, ref))
            try:
                if mine is None:
                    raise LookupError(theirs.refs[0], None)
                other = self._fetch(endpoint, request, theirs.refs[0])
            except LookupError:
                return ComparedMessage(error=f"{ref} not compared").ids(job)
            distances.append(distance(mine, other))
        return ComparedMessage(distances=tuple(distances)).ids(job)

    def answer(self, job: Message, endpoint: str) -> Message | None:
        """What the honest worker at ``endpoint`` answers (None: DROP, RELEASE)."""
        request = job.request or ""
        own = self.stores.setdefault(endpoint, {})
        if isinstance(job, PrepareMessage):
            own[(request, X0_REF)] = self.x0.clone()
            return prepared_for(job, self.x0)
        if isinstance(job, CompareMessage):
            return self._compare(job, endpoint)
        if isinstance(job, DropMessage):
            for ref in job.refs:
                own.pop((request, ref), None)
                self.inbox.get(endpoint, {}).pop((request, ref), None)
            return None
        if isinstance(job, ReleaseMessage):
            for kept in (own, self.inbox.get(endpoint, {})):
                for key in [key for key in kept if key[0] == request]:
                    del kept[key]
            return None
        if isinstance(job, DecodeMessage) and job.value is not None:
            try:
                latent = self._value(endpoint, request, job.value)
            except LookupError as exc:
                return _lost(job, exc)
            media = torch.zeros(2, 2, 3, dtype=torch.uint8) if job.media else None
            back = latent.clone() if job.want_latent else None
            return DecodedMessage(media=media, latent=back).ids(job)
        assert isinstance(job, EvalMessage), job.kind
        assert not job.chain, "a chain is answered step by step: EvalMessage.steps()"
        if job.inputs is None:  # off the data plane: the results go back as tensors
            reply = result_for(job)
            fault = self.faulty.get(endpoint)
            if fault is None:
                return reply
            wrong = tuple(
                e._replace(results={t: fault(x) for t, x in e.results.items()})
                for e in reply.entries
            )
            return dataclasses.replace(reply, entries=wrong)
        entries = []
        for entry, value in zip(job.entries, job.inputs):
            try:
                latent = self._value(endpoint, request, value, job.pushed or ())
            except LookupError as exc:
                return _lost(job, exc)
            out = velocity(latent, entry.step)
            results = solve_targets(unit_euler, latent, out, entry.step, entry.targets)
            held = {}
            fault = self.faulty.get(endpoint)
            for target, tensor in results.items():
                if fault is not None:
                    tensor = fault(tensor)
                own[(request, Ref(entry.task, target))] = tensor
                held[target] = HeldResult(
                    DTYPE_NAMES[tensor.dtype],
                    tuple(tensor.shape),
                    tensor.nbytes,
                    True,
                    None if job.digests is False else tensor_digest(tensor),  # as a worker's
                )
            entries.append(ResultEntry(entry.task, entry.attempt, {}, held))
        self._push(job, endpoint)
        return ResultMessage(entries=tuple(entries), compute_s=0.001).ids(job)


def _lost(job: Message, exc: LookupError) -> FailedMessage:
    named, corrupt = exc.args
    last = named.holders[-1].endpoint if named.holders else None
    failed = failed_for(job, "lost_input", f"input {named.ref} held by nobody reachable")
    if corrupt is not None:
        text = f"input {named.ref}: {corrupt} served other bytes than its digest"
        failed, last = failed_for(job, "corrupt_input", text), corrupt
    return dataclasses.replace(
        failed, lost_ref=[named.ref.task, named.ref.target], lost_holder=last
    )


def honest_answer(job: Message) -> Message:
    """What an honest worker answers to a PREPARE or an EVAL."""
    if isinstance(job, PrepareMessage):
        return prepared_for(job)
    assert isinstance(job, EvalMessage), job.kind
    return result_for(job)
