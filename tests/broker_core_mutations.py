# ruff: noqa: E501  (the mutations are exact source lines)
"""Mutation check of tests/test_broker_core.py: remove one failure-policy branch of the broker
at a time and see which test catches it.

    python -m tests.broker_core_mutations [NAME ...]   # every mutation, or those named

Each mutation edits one source file in place, runs the broker-core tests (or the test files its
optional fifth element names), and restores the file (also on Ctrl-C). A mutation that no test
catches prints NOT CAUGHT. Not collected by pytest.
"""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE_TESTS = ("tests/test_broker_core.py",)
# The broker's directory of results and recovery by lineage (their own unit tests).
LINEAGE_TESTS = ("tests/test_directory.py", "tests/test_lineage.py")
# The workers' data endpoints in HELLO, STATUS, WELCOME and POOL.
DATA_TESTS = ("tests/test_broker_data_endpoints.py",)
# The data plane wired (--data-plane): latents by name, drops, hits by DECODE, recovery.
PLANE_TESTS = ("tests/test_broker_dataplane.py",)
# Verification by redundancy (issue 26): replicas, digests, the majority, strikes, recomputation.
VERIFY_TESTS = ("tests/test_broker_verify.py",)
# Verification across device classes: COMPARE/COMPARED, the tolerance per model and dtype.
CROSS_TESTS = ("tests/test_broker_verify_cross.py",)
# A deadline on every job kind (issue 26): PREPARE and DECODE.
DEADLINE_TESTS = ("tests/test_broker_deadlines.py",)
# Sizes and dtypes that PREPARED declares, checked before any tensor (issue 26).
DECLARED_TESTS = ("tests/test_broker_declared.py",)
# Placement that counts the links (issue 25 item 4): hosts, learnt bandwidth, transfers in EFT.
LINK_TESTS = ("tests/test_links.py",)
# A fetcher checks the digest of what it fetched (issue 26): FAILED corrupt_input strikes its holder
# once fetchers of two principals said so.
FETCH_TESTS = ("tests/test_fetch_check.py",)
# Verification off the data plane (--no-data-plane, ParaDIGMS): the broker digests, holds, compares.
OFFPLANE_TESTS = ("tests/test_broker_verify_offplane.py",)
MUTATIONS: list[tuple[str, ...]] = [
    # -- the failure policy (broker/failures.py) and the handlers that call it -----------------
    ("stale attempt", "broker/handlers.py", "            or job.attempt != message.attempt\n", ""),
    (
        "wrong epoch",
        "broker/handlers.py",
        "        if worker is None or message.epoch != self.core.epoch:\n            return None\n",
        "        if worker is None:\n            return None\n",
    ),
    (
        "worker_error up to max_task_retries",
        "broker/failures.py",
        "        return failures > self.config.max_task_retries",
        "        return False",
    ),
    (
        "not_prepared",
        "broker/failures.py",
        "        (W.UNPREPARED,),",
        "        (W.NONE,),",
    ),
    (
        "a lost decode",
        "broker/session.py",
        "    def worker_lost(self, identity: bytes) -> None:\n        for pending in self.pending:\n            if pending.worker == identity:\n                pending.worker = None\n",
        "    def worker_lost(self, identity: bytes) -> None:\n        pass\n",
    ),
    (
        "a failed decode",
        "broker/failures.py",
        "            elif job.kind is Kind.DECODE and job.decode is not None:\n                session.media.failed(job.decode.decode_id)\n",
        "",
    ),
    (
        "a bad PREPARED",
        "broker/failures.py",
        "        J.PREPARE_ANOTHER,\n        (W.EXCLUDE,),",
        "        J.PREPARE_ANOTHER,\n        (W.UNPREPARED,),",
    ),
    (
        "a worker lost mid-batch",
        "broker/tasks.py",
        "        for task_id in [t for t, (_, _, w) in self.in_flight.items() if w == identity]:\n            self.requeue(task_id)",
        "        for task_id in [t for t, (_, _, w) in self.in_flight.items() if w == identity][:1]:\n            self.requeue(task_id)",
    ),
    (
        "draining",
        "broker/handlers.py",
        '        if core.draining:\n            out.client_error(identity, "draining"',
        '        if False:\n            out.client_error(identity, "draining"',
    ),
    (
        "draining deadline",
        "broker/core.py",
        "            if self.draining and (not self.sessions or now >= self.drain_deadline):",
        "            if self.draining and not self.sessions:",
    ),
    (
        "no_worker",
        "broker/lifecycle.py",
        "        elif now - session.no_worker_since > patience:",
        "        elif False:",
    ),
    (
        "a client gone",
        "broker/core.py",
        "            for session in gone:\n                self.lifecycle.cancel(out, session, tell_client=False)",
        "            for session in gone:\n                pass",
    ),
    (
        "too_large",
        "broker/handlers.py",
        "        if working_set <= config.max_request_bytes:",
        "        if True:",
    ),
    (
        "transfer allowance",
        "broker/registry.py",
        "        return self.timeout_s + pending / self.transfer_floor_bytes_s",
        "        return self.timeout_s",
    ),
    (
        "result checks",
        "broker/handlers.py",
        "            session.check(task, entry.results)\n",
        "",
    ),
    (
        "byte budget",
        "broker/session.py",
        "        return queued if self.held_bytes() <= self.budget_bytes else 0",
        "        return queued",
    ),
    (
        "x0 asked of one worker",
        "broker/dispatch.py",
        "                initial = session.plan is None and session.x0_from is None",
        "                initial = session.plan is None",
    ),
    (
        "HELLO protocol check",
        "broker/handlers.py",
        "        if message.protocol != PROTOCOL_VERSION:",
        "        if False:",
    ),
    (
        "re-HELLO while busy",
        "broker/handlers.py",
        'out, Failure.WORKER_LOST, identity=identity, detail="said HELLO again"',
        'out, Failure.STALE_ANSWER, identity=identity, detail="said HELLO again"',
    ),
    (
        "liveness expiry",
        "broker/core.py",
        "            for worker in self.registry.expired(now):\n",
        "            for worker in []:\n",
    ),
    (
        "invalid_request from a worker",
        "broker/handlers.py",
        '            "invalid_request": Failure.INVALID_REQUEST,\n',
        "",
    ),
    (
        "x0 asked again after its worker is lost",
        "broker/session.py",
        "        if self.plan is None and self.x0_from is None:\n            return True\n",
        "",
    ),
    (
        "a malformed FAILED",
        "chords_mq/wire/messages.py",
        '                raise WireError(f"FAILED: task entry {entry!r} is not [task, attempt]")',
        "                continue",
    ),
    # -- trust --------------------------------------------------------------------------------
    (
        "finiteness check",
        "broker/session.py",
        "            if not all_finite(tensor):",
        "            if False:",
    ),
    (
        "a bad result re-runs elsewhere",
        "broker/failures.py",
        "        J.RERUN,\n        (W.EXCLUDE, W.SUSPECT),",
        "        J.RERUN,\n        (W.SUSPECT,),",
    ),
    (
        "strikes confirmed by a good result",
        "broker/handlers.py",
        "            for suspect in session.suspects.pop(task.id, ()):",
        "            for suspect in ():",
    ),
    (
        "quarantine keeps work away",
        "broker/registry.py",
        "        return [w for w in self.workers.values() if w.job is None and now >= w.quarantined_until]",
        "        return [w for w in self.workers.values() if w.job is None]",
    ),
    (
        "quarantine survives a reconnect",
        "broker/handlers.py",
        "            quarantined_until=quarantined_until,",
        "            quarantined_until=0.0,",
    ),
    (
        "non_finite everywhere fails the request",
        "broker/lifecycle.py",
        "        if serving and session.last_bad:",
        "        if False:",
    ),
    (
        "non-finite x0",
        "broker/handlers.py",
        "    if not all_finite(x0):",
        "    if False:",
    ),
    (
        "x0 digests must agree",
        "broker/handlers.py",
        "        if digest != session.x0_digest:",
        "        if False:",
    ),
    (
        "requests per client",
        "broker/admission.py",
        "        if self.sessions.running_for(peer.principal) >= config.max_client_requests:",
        "        if False:",
    ),
    (
        "sessions limit",
        "broker/admission.py",
        "        if len(self.sessions) >= config.max_sessions:",
        "        if False:",
    ),
    (
        "queued tasks limit",
        "broker/admission.py",
        "        if queued + spec.resolved_cores() > config.max_queued_tasks:",
        "        if False:",
    ),
    (
        "ids namespaced by owner",
        "broker/sessions.py",
        '        ours = self._owned.get((principal, client_id or ""))',
        "        ours = next((k for (_, r), k in self._owned.items() if r == client_id), None)",
    ),
    (
        "STATUS shows a client its own",
        "broker/handlers.py",
        "        sessions = [s for s in core.sessions.values() if admin or s.owner == peer.principal]",
        "        sessions = list(core.sessions.values())",
    ),
    (
        "STATUS pages",
        "broker/handlers.py",
        "        page = slice(offset, offset + STATUS_PAGE)",
        "        page = slice(offset, None)",
    ),
    (
        "a worker's routing id under another key",
        "broker/core.py",
        "            and worker.principal != peer.principal\n",
        "            and False\n",
    ),
    # -- trust bound to an identity (issue 26): insecure, a worker's name and host ------------
    (
        "an insecure worker is its connection",
        "broker/core.py",
        "            principal = claimed_principal(message.worker, host)\n",
        "            principal = None\n",
    ),
    (
        "an insecure worker's host from its data endpoint only",
        "broker/core.py",
        "            host = address or endpoint_host(message.data)\n",
        "            host = endpoint_host(message.data)\n",
    ),
    (
        "an insecure worker's later messages under its connection",
        "broker/core.py",
        "        elif principal is None and worker is not None:\n            principal = worker.principal\n",
        "",
    ),
    (
        "learnt speeds start over on a reconnect",
        "broker/registry.py",
        "        if not info.speed:\n            info.speed = self.learnt(info.principal, info.model, info.device)\n",
        "",
    ),
    (
        "learnt speeds of another model or device",
        "broker/registry.py",
        "        if kept is None or kept[:2] != (model, device):",
        "        if kept is None:",
    ),
    (
        "remembered speeds unbounded",
        "broker/registry.py",
        "        while len(self._speeds) > self.remembered:",
        "        while False:",
    ),
    (
        "log rate limit",
        "broker/peers.py",
        "        if lines < self.burst or now - last >= self.interval_s:",
        "        if True:",
    ),
    (
        "worker limit",
        "broker/handlers.py",
        "        if previous is None and len(core.registry.workers) >= core.config.max_workers:",
        "        if False:",
    ),
    (
        "a slow worker takes the least urgent task",
        "broker/dispatch.py",
        "        taken = session.tasks.take(worker.identity, count, slack=slack, allowed=allowed)",
        "        taken = session.tasks.take(worker.identity, count, allowed=allowed)",
    ),
    (
        "a late attempt stays valid",
        "broker/tasks.py",
        "        if late is not None and late[1] == attempt:\n            return late[0]\n",
        "",
    ),
    (
        "a won late attempt drops its queued copy",
        "broker/tasks.py",
        "            self._queue = [entry for entry in self._queue if entry[2].id != task_id]\n            heapq.heapify(self._queue)\n",
        "            pass\n",
    ),
    (
        "a failed late attempt leaves its copy",
        "broker/tasks.py",
        "        if attempt is not None and self.in_flight.get(task_id, (None, attempt))[1] != attempt:",
        "        if False:",
    ),
    (
        "a lost late worker stops counting",
        "broker/tasks.py",
        "            del self.late[task_id]  # it will not answer",
        "            pass  # it will not answer",
    ),
    (
        "deadlines copy (not only requeue)",
        "broker/failures.py",
        "                session.tasks.speculate(task.id)",
        "                session.tasks.requeue(task.id)",
    ),
    (
        "a slow worker leaves places to fast ones finishing stale work",
        "broker/dispatch.py",
        "                if faster_soon is not None and faster_soon(worker, session, now):",
        "                if False:",
    ),
    (
        "fast ones busy with running requests do not keep a slow one out",
        "broker/dispatch.py",
        "                if w.job is not None and w.job.request not in active",
        "                if w.job is not None",
    ),
    (
        "adaptive cores",
        "broker/admission.py",
        "        return spec.granted(max(1, workers // sharing))",
        "        return spec",
    ),
    (
        "no_worker at once",
        "broker/admission.py",
        '            return ErrorMessage(code="no_worker", message=why, request=request_id)\n',
        "",
    ),
    (
        "a request's own wait for a worker",
        "broker/lifecycle.py",
        "        if session.wait_for_worker_s is not None:\n            return session.wait_for_worker_s\n",
        "",
    ),
    (
        "a worker takes a task planned on a faster class",
        "broker/placement.py",
        "        return slot is None or seconds < slot.budget * SLOWER_RATIO\n",
        "        return True\n",
    ),
    (
        "a fast worker takes a slower class's task from a free worker of it",
        "broker/speeds.py",
        "            return not any(schedule.allows(seconds, node) for seconds in slower)\n",
        "            return True\n",
    ),
    (
        "a changed pool keeps its old schedule",
        "broker/speeds.py",
        "        if current is not None and current.fits({w: s for w, (s, _) in pool.items()}):\n",
        "        if current is not None:\n",
    ),
    (
        "a goal graph too large is planned anyway",
        "broker/session.py",
        "            if graph is not None and len(graph) <= MAX_NODES:\n",
        "            if graph is not None:\n",
    ),
    (
        "tasks no hit needs are run anyway",
        "broker/session.py",
        "            if self.plan.rank(task) < 0:  # none of the request's hits depends on it\n",
        "            if False:\n",
    ),
    # -- first steps ----------------------------------------------------------------------------
    (
        "a lone late worker is not copied",
        "broker/core.py",
        "        if session is not None and not self.deadlines.could_copy(session, worker, now):",
        "        if False:",
    ),
    (
        "a client at the worker port",
        "broker/core.py",
        "        if worker is None and _client_kind(message):",
        "        if False:",
    ),
    (
        "a worker at the client port",
        "broker/core.py",
        "        if handler is None and message.kind in WORKER_SENDS:",
        "        if False:",
    ),
    (
        "the client told it waits for a worker",
        "broker/lifecycle.py",
        "                patience,\n            )\n            self.progress(out, session)",
        "                patience,\n            )",
    ),
    (
        "the client told the wait is over",
        "broker/lifecycle.py",
        "                session.no_worker_since = None\n                self.progress(out, session)",
        "                session.no_worker_since = None",
    ),
    # -- the structure ------------------------------------------------------------------------
    (
        "a late EVAL releases its worker from the request",
        "broker/failures.py",
        "        J.COPY,\n        (W.RELEASE, W.MISSED),",
        "        J.COPY,\n        (W.MISSED,),",
    ),
    (
        "missed deadlines quarantine",
        "broker/trust.py",
        "        if worker.missed < self.config.max_missed_deadlines:",
        "        if True:",
    ),
    (
        "the request states refuse what the table does not allow",
        "broker/states.py",
        "    S.PREPARING: {E.STARTED: S.RUNNING,",
        "    S.PREPARING: {E.STARTED: S.PREPARING,",
    ),
    (
        "results by name are let go once nothing reads them",
        "broker/session.py",
        "        elif self.by_name:\n            self.results.keep_only(self.plan.names())\n",
        "",
    ),
    (
        "a stop rule that reads hits is fed tensors",
        "broker/session.py",
        "        self.by_name = self.spec.rules.by_name and not plan.reads_latents",
        "        self.by_name = self.spec.rules.by_name",
    ),
    (
        "paradigms is fed tensors",
        "chords_mq/methods.py",
        "    by_name = False  # its acceptance test reads the window's values\n",
        "",
    ),
    (
        "a finished request releases its workers",
        "broker/lifecycle.py",
        "        self.bindings.release_session(out, session)\n",
        "",
    ),
    # -- the directory and recovery by lineage (broker/directory.py, broker/lineage.py) --------
    (
        "drop candidates ignore what is needed",
        "broker/directory.py",
        "            if ref not in keep:\n",
        "            if True:\n",
        *LINEAGE_TESTS,
    ),
    (
        "a queued or running task's input is not needed",
        "broker/directory.py",
        "    for value in (*inputs, *hits):\n",
        "    for value in hits:\n",
        *LINEAGE_TESTS,
    ),
    (
        "a lost worker's unneeded results count as lost",
        "broker/directory.py",
        "        return frozenset(ref for ref in held if ref in keep and ref not in self._holders)",
        "        return frozenset(ref for ref in held if ref not in self._holders)",
        *LINEAGE_TESTS,
    ),
    (
        "a result another worker holds counts as lost",
        "broker/directory.py",
        "        return frozenset(ref for ref in held if ref in keep and ref not in self._holders)",
        "        return frozenset(ref for ref in held if ref in keep)",
        *LINEAGE_TESTS,
    ),
    (
        "an exclusive operation leaves its operand listed",
        "broker/directory.py",
        "            self.forget(holder, (value.fine,))",
        "            pass",
        *LINEAGE_TESTS,
    ),
    (
        "replays are not counted",
        "broker/directory.py",
        "            self.replays += 1",
        "            pass",
        *LINEAGE_TESTS,
    ),
    (
        "replays run children first",
        "broker/lineage.py",
        "    return RecoveryPlan(wanted, tuple(order), frozenset(reads))",
        "    return RecoveryPlan(wanted, tuple(reversed(order)), frozenset(reads))",
        *LINEAGE_TESTS,
    ),
    (
        "the recursion goes past held results",
        "broker/lineage.py",
        "    if ref in directory:\n        reads.add(ref)\n        return\n",
        "",
        *LINEAGE_TESTS,
    ),
    (
        "a task is replayed twice",
        "broker/lineage.py",
        "    if record.task in seen:\n        return\n",
        "",
        *LINEAGE_TESTS,
    ),
    (
        "a replay overwrites a held input",
        "broker/lineage.py",
        "record.task, record.core, record.step, record.targets, out_of_place(record.input)",
        "record.task, record.core, record.step, record.targets, record.input",
        *LINEAGE_TESTS,
    ),
    (
        "the recovery bound",
        "broker/lineage.py",
        "            if len(seen) > budget:  # every task entered is replayed\n",
        "            if False:\n",
        *LINEAGE_TESTS,
    ),
    (
        "a recovery past its bound fails at once",
        "broker/failures.py",
        '        fails="recovery_too_large",\n        at_once=True,\n',
        '        fails="recovery_too_large",\n',
        *LINEAGE_TESTS,
    ),
    # -- the workers' data endpoints and the pool's keys (broker/handlers.py, broker/core.py) --
    (
        "a HELLO's data endpoint is not kept",
        "broker/handlers.py",
        "            data=message.data,\n",
        "",
        *DATA_TESTS,
    ),
    (
        "a data endpoint that is not tcp is taken",
        "broker/handlers.py",
        '        elif message.data is not None and not message.data.startswith("tcp://"):',
        "        elif False:",
        *DATA_TESTS,
    ),
    (
        "WELCOME carries no pool keys",
        "broker/handlers.py",
        "heartbeat_ms=int(core.config.heartbeat_s * 1000), pool_keys=core.pool_keys",
        "heartbeat_ms=int(core.config.heartbeat_s * 1000)",
        *DATA_TESTS,
    ),
    (
        "a reloaded allow-list reaches no worker",
        "broker/core.py",
        "                out.to_worker(identity, PoolMessage(pool_keys=found))",
        "                pass",
        *DATA_TESTS,
    ),
    (
        "unchanged keys are sent again",
        "broker/core.py",
        "            if found == self.pool_keys:\n                return\n",
        "",
        *DATA_TESTS,
    ),
    (
        "more keys than a WELCOME carries",
        "broker/core.py",
        "        if found is not None and len(found) > MAX_POOL_KEYS:",
        "        if False:",
        *DATA_TESTS,
    ),
    # -- the data plane wired (broker/session.py, core.py, handlers.py, dispatch.py) ----------
    (
        "a lost worker's results are not recomputed",
        "broker/session.py",
        "        self.tasks.worker_lost(identity)\n        self.holder_gone(identity)\n",
        "        self.tasks.worker_lost(identity)\n",
        *PLANE_TESTS,
    ),
    (
        "a released hit's inputs dropped before its decode",
        "broker/session.py",
        "            self._let_go([hit.latent for hit in hits or ()])",
        "            self._let_go()",
        *PLANE_TESTS,
    ),
    (
        "nothing is dropped",
        "broker/session.py",
        "            self.drops.setdefault(holder, set()).update(refs)",
        "            pass",
        *PLANE_TESTS,
    ),
    (
        "tasks do not wait for a recomputed input",
        "broker/session.py",
        "            self.tasks.push(task)\n        self.tasks.blocked = self.blocked if self.recovering else None\n",
        "            self.tasks.push(task)\n",
        *PLANE_TESTS,
    ),
    (
        "decodes do not wait for a recomputed input",
        "broker/session.py",
        "        if self.recovering and not self.recovering.isdisjoint(refs):\n            return False",
        "        if False:\n            return False",
        *PLANE_TESTS,
    ),
    (
        "a replay's results go back to the plan",
        "broker/session.py",
        "        replay = self.replays.pop(task.id, None)",
        "        replay = None",
        *PLANE_TESTS,
    ),
    (
        "a held result's shape unchecked",
        "broker/session.py",
        "            if meta.shape != self.latent_shape:",
        "            if False:",
        *PLANE_TESTS,
    ),
    (
        "a held result's finiteness unchecked",
        "broker/session.py",
        "            if not meta.finite:",
        "            if False:",
        *PLANE_TESTS,
    ),
    (
        "a recovery past its bound does not fail",
        "broker/core.py",
        "                self.failures.apply(out, failed.failure, session=session, detail=str(failed))",
        "                pass",
        *PLANE_TESTS,
    ),
    (
        "a lost input is not recomputed",
        "broker/handlers.py",
        "            session.input_lost(lost, None if holder is None else holder.identity)",
        "            pass",
        *PLANE_TESTS,
    ),
    (
        "a released worker's results still counted as held",
        "broker/bindings.py",
        "        session.holder_gone(worker.identity)  # its results for the request go with it",
        "",
        *PLANE_TESTS,
    ),
    (
        "a core's chain leaves its idle worker",
        "broker/dispatch.py",
        "        return local if session.tasks.may_take(local) else None",
        "        return None",
        *PLANE_TESTS,
    ),
    # the broker's memory (issue 25): no x0 by name, one hit on its way at a time
    (
        "hits decoded at once",
        "broker/dispatch.py",
        "                serial = session.hits_one_at_a_time\n",
        "                serial = False\n",
        *PLANE_TESTS,
    ),
    (
        "hits decoded at once in the queue",
        "broker/session.py",
        "            if one_at_a_time:\n                return None\n",
        "",
        *PLANE_TESTS,
    ),
    (
        "the broker keeps x0 on the data plane",
        "broker/session.py",
        '            initial = torch.empty_like(x0, device="meta")',
        "            initial = x0",
        *PLANE_TESTS,
    ),
    (
        "a plan that reads its hits starts from a stand-in",
        "broker/session.py",
        "        if initial is not x0 and plan.reads_latents:",
        "        if False:",
        *PLANE_TESTS,
    ),
    (
        "x0 sent to the broker on the data plane",
        "broker/dispatch.py",
        "                values = initial and session.x0_wanted(worker.data is not None)",
        "                values = initial",
        *PLANE_TESTS,
    ),
    (
        "a stop rule that reads the hits gets no x0 at first",
        "broker/session.py",
        "        return stop is not None and stop.reads_latents",
        "        return False",
        *PLANE_TESTS,
    ),
    (
        "a stand-in starts a plan that reads x0",
        "broker/session.py",
        "        if x0.is_meta and (initial is x0 or plan.reads_latents):",
        "        if False:",
        *PLANE_TESTS,
    ),
    (
        "an undeclared PREPARED without x0 starts the plan",
        "broker/handlers.py",
        "        elif declared is None or not digest:",
        "        elif False:",
        *PLANE_TESTS,
    ),
    (
        "a late worker released on the data plane",
        "broker/failures.py",
        "            actions = tuple(a for a in actions if a is not WorkerAction.RELEASE)",
        "            pass",
        *PLANE_TESTS,
    ),
    (
        "the data plane without a data endpoint",
        "broker/handlers.py",
        "            (info := core.registry.get(identity)) is not None and info.data is not None",
        "            (info := core.registry.get(identity)) is not None",
        *PLANE_TESTS,
    ),
    # -- verification by redundancy (issue 26, broker/verify.py) -------------------------
    (
        "verify: a sampled task below rate 1",
        "broker/verify.py",
        "        return rate >= 1.0 or (rate > 0.0 and self.rng.random() < rate)",
        "        return rate >= 1.0",
        *VERIFY_TESTS,
    ),
    (
        "verify: the rate decays with the clean record",
        "broker/verify.py",
        "        return max(config.verify_floor, float(0.5**halvings))",
        "        return 1.0",
        *VERIFY_TESTS,
    ),
    (
        "verify: a strike starts the record again",
        "broker/verify.py",
        "        self.clean.pop(principal, None)",
        "        pass",
        *VERIFY_TESTS,
    ),
    (
        "verify: a new worker's result is held",
        "broker/verify.py",
        "        if self.records.holds(worker.principal):\n            return Outcome()",
        "        if False:\n            return Outcome()",
        *VERIFY_TESTS,
    ),
    (
        "verify: an agreed held result is published",
        "broker/verify.py",
        "            if first is check.answers[0]:",
        "            if False:",
        *VERIFY_TESTS,
    ),
    (
        "verify: a mismatch goes to a third worker",
        "broker/verify.py",
        "            self._replicate(session, check)\n            return Outcome()\n        _, agree",
        "            return Outcome(unsettled=check)\n        _, agree",
        *VERIFY_TESTS,
    ),
    (
        "verify: no majority fails the request",
        "broker/verify.py",
        "                self._end(session, check)\n                return Outcome(unsettled=check)",
        "                self._end(session, check)\n                return Outcome()",
        *VERIFY_TESTS,
    ),
    (
        "verify: a replica on another principal",
        "broker/verify.py",
        "        if worker.principal in self.principals():\n            return False\n",
        "",
        *VERIFY_TESTS,
    ),
    (
        "verify: a replica on the same device class",
        "broker/verify.py",
        "worker.device_class == self.device_class",
        "True",
        *VERIFY_TESTS,
    ),
    (
        "verify: a lone worker's result goes out unverified",
        "broker/verify.py",
        '        if not self._can_replicate(session, check, now):\n            self._count("unverifiable")',
        '        if False:\n            self._count("unverifiable")',
        *VERIFY_TESTS,
    ),
    (
        "verify: a replica nobody is left to run",
        "broker/core.py",
        "            if session.verifying.checks and not self._verifiable(out, session):",
        "            if False:",
        *VERIFY_TESTS,
    ),
    (
        "verify: a held result's worker lost",
        "broker/session.py",
        "        checks_holder_gone(self, identity)  # a result held for verification is gone too\n",
        "",
        *VERIFY_TESTS,
    ),
    (
        "verify: an outvoted worker's strike",
        "broker/failures.py",
        "        (W.EXCLUDE, W.STRIKE),",
        "        (W.EXCLUDE,),",
        *VERIFY_TESTS,
    ),
    (
        "verify: an outvoted worker leaves the request",
        "broker/failures.py",
        "        (W.EXCLUDE, W.STRIKE),",
        "        (W.STRIKE,),",
        *VERIFY_TESTS,
    ),
    (
        "verify: an outvoted worker's results are recomputed",
        "broker/failures.py",
        "        if rule.job is JobAction.RECOMPUTE and worker is not None:  # before it leaves",
        "        if False:",
        *VERIFY_TESTS,
    ),
    (
        "verify: what was made from a wrong result is recomputed",
        "broker/verify.py",
        "    bad_tasks = roots | directory.descendants(roots)",
        "    bad_tasks = roots",
        *VERIFY_TESTS,
    ),
    (
        "verify: a hit waits for the checks of its lineage",
        "broker/session.py",
        "        waiting = audited & self.directory.ancestors(refs)",
        "        waiting: set[int] = set()",
        *VERIFY_TESTS,
    ),
    (
        "verify: a late worker is counted on for a replica",
        "broker/verify.py",
        "            and not worker.quarantined(now)  # (nor late: it may never answer)\n",
        "",
        *VERIFY_TESTS,
    ),
    (
        "verify: a result needs its digest",
        "broker/session.py",
        "            if self.verify and meta.digest is None:  # it could never be verified",
        "            if False:",
        *VERIFY_TESTS,
    ),
    (
        "verify: a request of one core gets a verifier",
        "broker/dispatch.py",
        "                session.wants_worker(worker.identity) or self._verifier(worker, session)",
        "                session.wants_worker(worker.identity)",
        *VERIFY_TESTS,
    ),
    (
        "verify: an outvoted worker's running task runs elsewhere",
        "broker/handlers.py",
        "        session.tasks.worker_lost(identity)  # what it runs for the request runs elsewhere\n",
        "",
        *VERIFY_TESTS,
    ),
    # -- a deadline on every job kind (issue 26): PREPARE and DECODE -----------------------------
    (
        "a PREPARE or DECODE has no deadline",
        "broker/deadlines.py",
        "            return self._job_deadline(worker, job.kind, job.sent_at, job.request)",
        "            return None",
        *DEADLINE_TESTS,
    ),
    (
        "a job deadline without its floor",
        "broker/deadlines.py",
        "            limit = min(max(config.deadline_factor * learnt, config.job_deadline_floor_s), limit)",
        "            limit = min(config.deadline_factor * learnt, limit)",
        *DEADLINE_TESTS,
    ),
    (
        "a job deadline without its ceiling",
        "broker/deadlines.py",
        "            limit = min(max(config.deadline_factor * learnt, config.job_deadline_floor_s), limit)",
        "            limit = max(config.deadline_factor * learnt, config.job_deadline_floor_s)",
        *DEADLINE_TESTS,
    ),
    (
        "a job deadline without the latent's transfer",
        "broker/deadlines.py",
        "        return sent_at + limit + latent / config.transfer_floor_bytes_s",
        "        return sent_at + limit",
        *DEADLINE_TESTS,
    ),
    (
        "a job's learnt time is its model's only",
        "broker/deadlines.py",
        '        return own if own is not None else self.learnt.get((f"model:{worker.model}", kind))',
        '        return self.learnt.get((f"model:{worker.model}", kind))',
        *DEADLINE_TESTS,
    ),
    (
        "a late PREPARE or DECODE runs on",
        "broker/failures.py",
        "        J.RERUN,\n        (W.MISSED,),",
        "        J.RUN_ON,\n        (W.MISSED,),",
        *DEADLINE_TESTS,
    ),
    (
        "a late PREPARE or DECODE is no missed deadline",
        "broker/failures.py",
        "        J.RERUN,\n        (W.MISSED,),",
        "        J.RERUN,\n        (W.NONE,),",
        *DEADLINE_TESTS,
    ),
    (
        "a lone late PREPARE is held against its worker",
        "broker/core.py",
        "        if session is None or not self.deadlines.could_copy(session, worker, now):",
        "        if session is None:",
        *DEADLINE_TESTS,
    ),
    (
        "a PREPARE teaches nothing",
        "broker/handlers.py",
        "        core.deadlines.observe(worker, Kind.PREPARE, core.clock() - job.sent_at)",
        "        pass",
        *DEADLINE_TESTS,
    ),
    (
        "a DECODE teaches nothing",
        "broker/handlers.py",
        "        core.deadlines.observe(worker, Kind.DECODE, core.clock() - job.sent_at)",
        "        pass",
        *DEADLINE_TESTS,
    ),
    # -- declared sizes and dtypes (issue 26): PREPARED declares its latent -------------------
    (
        "a declared latent's size is not checked",
        "broker/handlers.py",
        "        if self._too_large(out, session, declared.nbytes):\n            return False\n",
        "",
        *DECLARED_TESTS,
    ),
    (
        "declarations are not compared",
        "broker/handlers.py",
        "        if declared != session.declared:",
        "        if False:",
        *DECLARED_TESTS,
    ),
    (
        "the declared result dtype is not the request's",
        "broker/handlers.py",
        "                session.result_dtype = declared.result_dtype",
        "                pass",
        *DECLARED_TESTS,
    ),
    (
        "x0 is not held to its declaration",
        "broker/handlers.py",
        "            if declared is not None and shown != (declared.shape, declared.dtype):",
        "            if False:",
        *DECLARED_TESTS,
    ),
    (
        "a malformed declared shape passes",
        "broker/handlers.py",
        "        and all(is_uint(size) and size > 0 for size in shape)",
        "        and True",
        *DECLARED_TESTS,
    ),
    (
        "a declared result dtype of ints passes",
        "broker/handlers.py",
        "        if result is None or not result.is_floating_point:",
        "        if result is None:",
        *DECLARED_TESTS,
    ),
    (
        "a dtype unlike the declared one is no strike",
        "broker/failures.py",
        "                session.declared is not None and session.declared.result_dtype is not None",
        "                False",
        *DECLARED_TESTS,
    ),
    (
        "a PREPARE without the budget's limit",
        "broker/core.py",
        "                    max_latent_bytes=limit,",
        "                    max_latent_bytes=None,",
        *DECLARED_TESTS,
    ),
    (
        "an initial PREPARE's deadline without the declared latent",
        "broker/deadlines.py",
        "            latent = session.latent_bytes or (0 if declared is None else declared.nbytes)",
        "            latent = session.latent_bytes",
        *DECLARED_TESTS,
    ),
    # -- placement that counts the links (broker/links.py, dispatch.py's _nearby) ---------------
    (
        "a task left to a worker finishing it sooner",
        "broker/dispatch.py",
        "            elsewhere = local is not None and not session.tasks.may_take(local)\n",
        "            elsewhere = False\n",
        *LINK_TESTS,
    ),
    (
        "a busy holder on another core starts an EVAL later",
        "broker/dispatch.py",
        "                    start += seconds(other)\n",
        "                    pass\n",
        *LINK_TESTS,
    ),
    (
        "the transfers count in the finish time",
        "broker/dispatch.py",
        "            end = start + self.transfer_s(session, task, other) + away(task, other) + seconds(other)\n",
        "            end = start + away(task, other) + seconds(other)\n",
        *LINK_TESTS,
    ),
    (
        "deferred workers look again in the pass",
        "broker/dispatch.py",
        "        if self._deferred:\n",
        "        if False:\n",
        *LINK_TESTS,
    ),
    (
        "a worker given a job looks no more",
        "broker/dispatch.py",
        "        if worker in self._deferred:  # it left one request's tasks and took another's\n            self._deferred.remove(worker)\n",
        "",
        *LINK_TESTS,
    ),
    (
        "an EVAL's expected time has its fetches",
        "broker/dispatch.py",
        "            expected += sum(self.transfer_s(session, task, worker) for task, _ in taken)\n",
        "            pass\n",
        *LINK_TESTS,
    ),
    (
        "holders named nearest first",
        "broker/core.py",
        "            ordered = self._nearest(ordered, worker, session.latent_bytes)\n",
        "            pass\n",
        *LINK_TESTS,
    ),
    (
        "a RESULT's fetches teach the link",
        "broker/handlers.py",
        "                core.links.learn(host_of(worker.data, worker.identity), message.fetched)\n",
        "                pass\n",
        *LINK_TESTS,
    ),
    (
        "the speed model leaves out the fetches",
        "broker/handlers.py",
        "                own = max(seconds - fetched_s, seconds / 10)\n",
        "                own = seconds\n",
        *LINK_TESTS,
    ),
    (
        "an unmeasured link between hosts is a gigabit",
        "broker/links.py",
        "            rate = None if source == to else self.default_bytes_s\n",
        "            rate = None\n",
        *LINK_TESTS,
    ),
    (
        "links: a core off its host's block costs two crossings",
        "broker/dispatch.py",
        "            return 2 * crossing\n",
        "            return 0.0\n",
        *LINK_TESTS,
    ),
    (
        "links: the init chain's host takes the first block of cores",
        "broker/dispatch.py",
        "            order = sorted(count, key=lambda host: (host != start, host))\n",
        "            order = sorted(count, key=lambda host: (host == start, host))\n",
        *LINK_TESTS,
    ),
    (
        "links: blocks sized by the hosts' workers",
        "broker/dispatch.py",
        "                seen += count[host]\n",
        "                seen += 1 if seen == 0 else count[host]\n",
        *LINK_TESTS,
    ),
    (
        "links: a chain staying on its worker is not off its block",
        "broker/dispatch.py",
        "                if lineage is not None and lineage.core == task.core:\n",
        "                if lineage is not None:\n",
        *LINK_TESTS,
    ),
    (
        "links: no blocks across a link slower than BLOCK_EVALS EVALs",
        "broker/dispatch.py",
        "            if crossing > BLOCK_EVALS * seconds(info):\n",
        "            if False:\n",
        *LINK_TESTS,
    ),
    (
        "links: a worker the schedule allows leaves tasks finishing sooner elsewhere",
        "broker/dispatch.py",
        "                    elif self.links is not None and elsewhere:\n",
        "                    elif False:\n",
        *LINK_TESTS,
    ),
    # -- a fetcher checks what it fetched (issue 26): holders' digests, FAILED corrupt_input -----
    (
        "fetch check: holders named without their digest",
        "broker/core.py",
        "            holders.append(Holder(info.data, key, digest))",
        "            holders.append(Holder(info.data, key))",
        *FETCH_TESTS,
    ),
    (
        "fetch check: the directory keeps no digest",
        "broker/directory.py",
        "            if digest is not None:\n                self._digests[ref, holder] = digest\n",
        "",
        *FETCH_TESTS,
    ),
    (
        "fetch check: corrupt_input taken for worker_error",
        "broker/handlers.py",
        '        by_name = message.code in ("lost_input", "corrupt_input") and session.named',
        '        by_name = message.code == "lost_input" and session.named',
        *FETCH_TESTS,
    ),
    (
        "fetch check: corrupt_input taken for lost_input",
        "broker/handlers.py",
        '            if message.code == "corrupt_input":  # it served other bytes than it reported',
        "            if False:",
        *FETCH_TESTS,
    ),
    (
        "fetch check: the corrupt holder keeps its clean record",
        "broker/handlers.py",
        "                    core.verification.records.outvoted(holder.principal)\n",
        "",
        *FETCH_TESTS,
    ),
    (
        "fetch check: the corrupt holder goes unstruck",
        "broker/failures.py",
        '        (W.STRIKE,),\n        metric="corrupt_input",',
        '        (W.NONE,),\n        metric="corrupt_input",',
        *FETCH_TESTS,
    ),
    (
        "fetch check: one fetcher's claim strikes its holder",
        "broker/handlers.py",
        "                    if core.trust.corrupt_claim(holder.principal, worker.principal):\n",
        "                    if core.trust.corrupt_claim(holder.principal, worker.principal) or True:\n",
        *FETCH_TESTS,
    ),
    (
        "fetch check: an unconfirmed claim strikes",
        "broker/failures.py",
        '        (W.NONE,),\n        metric="corrupt_input",',
        '        (W.STRIKE,),\n        metric="corrupt_input",',
        *FETCH_TESTS,
    ),
    (
        "fetch check: a claim confirms itself",
        "broker/trust.py",
        "            if now - at <= CLAIM_WINDOW_S and who != claimant\n",
        "            if now - at <= CLAIM_WINDOW_S\n",
        *FETCH_TESTS,
    ),
    (
        "fetch check: claims never forgotten",
        "broker/trust.py",
        "            if now - at <= CLAIM_WINDOW_S and who != claimant\n",
        "            if who != claimant\n",
        *FETCH_TESTS,
    ),
    (
        "fetch check: the claims table unbounded",
        "broker/trust.py",
        "        while len(self.claims) > 4 * self.config.max_workers:\n            self.claims.popitem(last=False)\n",
        "",
        *FETCH_TESTS,
    ),
    (
        "fetch check: confirmed claims never strike",
        "broker/trust.py",
        "        confirmed = bool(claims)\n",
        "        confirmed = False\n",
        *FETCH_TESTS,
    ),
    # -- verification across device classes (broker/verify.py, broker/tolerance.py) ----------
    (
        "cross: a replica goes to another class when none of the class can run it",
        "broker/verify.py",
        "        if any(worker.compares for worker in others):\n",
        "        if False:\n",
        *CROSS_TESTS,
    ),
    (
        "cross: within the tolerance agree",
        "broker/verify.py",
        "            self.tolerances.agree(session.model, dtype, max_rel, rms_rel)\n",
        "            False\n",
        *CROSS_TESTS,
    ),
    (
        "cross: beyond the tolerance differ",
        "broker/tolerance.py",
        "        return tolerance is not None and max_rel <= tolerance and rms_rel <= tolerance\n",
        "        return True\n",
        *CROSS_TESTS,
    ),
    (
        "cross: the tolerance is the model's own",
        "broker/tolerance.py",
        "        own = self.by_model.get((model, dtype))\n",
        "        own = None\n",
        *CROSS_TESTS,
    ),
    (
        "cross: a compare that failed is a disagreement",
        "broker/verify.py",
        "        if message.error is not None or len(message.distances) != len(check.answers[0].held):\n",
        "        if False:\n",
        *CROSS_TESTS,
    ),
    (
        "cross: a compare never answered is a disagreement",
        "broker/verify.py",
        '            check.unknown.add(check.comparing)\n            check.comparing = None\n            self._count("uncompared")\n            outcome = self._next',
        '            check.judged[check.comparing] = False\n            check.comparing = None\n            self._count("uncompared")\n            outcome = self._next',
        *CROSS_TESTS,
    ),
    (
        "cross: a pair nobody can compare is a disagreement",
        "broker/verify.py",
        "            check.unknown.add(pair)\n",
        "            check.judged[pair] = False\n",
        *CROSS_TESTS,
    ),
    (
        "cross: a compare never answered stays out",
        "broker/verify.py",
        "                and now - check.compare_since <= self.config.job_deadline_ceiling_s\n",
        "",
        *CROSS_TESTS,
    ),
    (
        "cross: a silent comparer misses no deadline",
        "broker/verify.py",
        "                outcome.late = comparer.identity\n",
        "                pass\n",
        *CROSS_TESTS,
    ),
    (
        "cross: a pair whose compare failed is asked again",
        "broker/verify.py",
        "                    and (earlier, newer) not in self.unknown\n",
        "",
        *CROSS_TESTS,
    ),
    (
        "cross: an unjudged pair is a verdict",
        "broker/verify.py",
        "        return one.device_class == other.device_class or self.judged.get(pair) is False\n",
        "        return True\n",
        *CROSS_TESTS,
    ),
    (
        "cross: an original never judged is settled by the others",
        "broker/verify.py",
        "        if winner is not None and not self._verdict(session, check, winner[1]):\n",
        "        if False:\n",
        *CROSS_TESTS,
    ),
    (
        "cross: a replica whose worker left blocks the verdict",
        "broker/verify.py",
        "            if not self._gone(session, check.answers[index]):\n",
        "            if True:\n",
        *CROSS_TESTS,
    ),
    (
        "cross: a replica's worker still serving the request abstains",
        "broker/verify.py",
        "        return answer.identity not in session.prepared\n",
        "        return True\n",
        *CROSS_TESTS,
    ),
    (
        "cross: a compared result's replica is not dropped early",
        "broker/verify.py",
        "            if not check.cross:\n                session.drop_later(worker.identity, _refs(task))",
        "            if True:\n                session.drop_later(worker.identity, _refs(task))",
        *CROSS_TESTS,
    ),
    # -- verification off the data plane (the results' bytes come through the broker) ------
    (
        "offplane: results off the plane are verified",
        "broker/handlers.py",
        "            if session.named or session.verify:  # (verified: ``broker.verify``)",
        "            if session.named:  # (verified: ``broker.verify``)",
        *OFFPLANE_TESTS,
    ),
    (
        "offplane: a trusted worker's sampled result is held",
        "broker/verify.py",
        "        if self.records.holds(worker.principal) or answer.tensors is not None:",
        "        if self.records.holds(worker.principal):",
        *OFFPLANE_TESTS,
    ),
    (
        "offplane: an unsampled result goes to the plan unreplicated",
        "broker/verify.py",
        "        if tensors is not None and original is None and not self._sample(worker):",
        "        if False:",
        *OFFPLANE_TESTS,
    ),
    (
        "offplane: the broker compares two classes itself",
        "broker/verify.py",
        "        if newer.tensors is not None and earlier.tensors is not None:",
        "        if False:",
        *OFFPLANE_TESTS,
    ),
    (
        "offplane: a replica of another class needs no comparer",
        "broker/verify.py",
        "            self.cross and (worker.compares or self.local)",
        "            self.cross and worker.compares",
        *OFFPLANE_TESTS,
    ),
    (
        "offplane: a check may go across classes without a comparer",
        "broker/verify.py",
        "        if any(worker.compares or check.local for worker in others):",
        "        if any(worker.compares for worker in others):",
        *OFFPLANE_TESTS,
    ),
    (
        "offplane: held results count in the request's bytes",
        "broker/session.py",
        "        tensors += self.media.tensors() + self.verifying.tensors()  # (results held, off it)",
        "        tensors += self.media.tensors()",
        *OFFPLANE_TESTS,
    ),
    (
        "offplane: unchecked results of an outvoted worker fail the request",
        "broker/core.py",
        "                if tainted is not None:",
        "                if False:",
        *OFFPLANE_TESTS,
    ),
    (
        "offplane: a replica nobody may run lets its result out",
        "broker/core.py",
        "                elif session.verifying.checks:\n                    self._verifiable(out, session)",
        "                elif False:\n                    self._verifiable(out, session)",
        *OFFPLANE_TESTS,
    ),
    (
        "decode: a hit's latent has its holders' digest",
        "broker/handlers.py",
        "            if expected is not None and tensor_digest(latent) != expected:  # (not what is held)",
        "            if False:",
        *OFFPLANE_TESTS,
    ),
]


def main() -> None:
    only = sys.argv[1:]  # names (substrings) of the mutations to run; none: every one
    results = []
    for name, rel, old, new, *tests in MUTATIONS:
        if only and not any(part in name for part in only):
            continue
        path = ROOT / rel
        orig = path.read_text()
        if orig.count(old) != 1:
            results.append((name, f"MUTATION NOT APPLICABLE ({orig.count(old)} matches)"))
            continue
        path.write_text(orig.replace(old, new))
        try:
            command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x"]
            command += ["--no-header", *(tests or CORE_TESTS)]
            out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
            failed = re.findall(
                r"(?:FAILED|ERROR) tests/(?:test_broker_core.py::)?(\S+)", out.stdout
            )
            results.append((name, failed[0] if failed else "NOT CAUGHT"))
        finally:
            path.write_text(orig)
    for name, outcome in results:
        print(f"{name:40s} {outcome}")
    sys.exit(1 if any(o == "NOT CAUGHT" for _, o in results) else 0)


if __name__ == "__main__":
    main()
