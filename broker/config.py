"""The broker's configuration: every limit, timeout and policy choice, with its default, once.

``chords-broker``'s options, its ``CHORDS_*`` variables and its ``--config`` file all set these
fields; nothing else holds a default of its own. A field with ``option(...)`` metadata is on the
command line (``chords_mq.options.config_options``), with its help text, range and unit there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from chords_mq.broker.tolerance import Tolerances
from chords_mq.options import BYTES, MILLISECONDS, option
from chords_mq.wire import MAX_TASKS

Placement = Literal["eft", "fifo"]
VerifyMode = Literal["off", "sample", "all"]
CoresPolicy = Literal["adaptive", "fixed"]


@dataclass(frozen=True)
class BrokerConfig:
    heartbeat_s: float = field(
        default=0.25, metadata=option(name="heartbeat-ms", unit=MILLISECONDS, min=20)
    )
    liveness: int = field(
        default=3, metadata=option("Missed heartbeats before a worker is declared dead.", min=1)
    )
    worker_timeout_s: float = field(
        default=30.0,
        metadata=option(
            "Seconds a request waits for a capable worker before it fails.",
            name="worker-timeout",
            min=0,
        ),
    )
    drain_timeout_s: float = field(
        default=30.0,
        metadata=option("Seconds SIGTERM waits for running requests.", name="drain-timeout", min=0),
    )
    # Failures of one job (kind, id) before its request fails.
    max_task_retries: int = field(
        default=3,
        metadata=option(
            "Failures of one task (or prepare, or decode) before its request fails.", min=0
        ),
    )
    # A worker that cannot get a task's inputs (FAILED lost_input or corrupt_input) more often
    # than this in one request leaves it: each claim costs a recomputation, and a worker
    # whose link is broken (or that lies) would otherwise spend the request's replays.
    max_lost_inputs: int = field(
        default=3,
        metadata=option(
            "Inputs one worker may fail to get (FAILED lost_input or corrupt_input) in one "
            "request before it leaves that request.",
            min=0,
        ),
    )
    # A request's latent working set must fit in this.
    max_request_bytes: int = field(
        default=8 << 30,
        metadata=option(
            "Refuse (too_large) a request whose latents would hold more than this in the broker.",
            unit=BYTES,
        ),
    )
    transfer_floor_bytes_s: float = 100e6  # slowest transfer rate liveness allows for
    progress_interval_s: float = 0.1
    # Admission: past any of these a SUBMIT (or a HELLO) gets a typed ``busy`` refusal.
    max_sessions: int = field(
        default=1024,
        metadata=option(
            "Requests running or waiting at once; past it a SUBMIT is refused as busy.", min=1
        ),
    )
    max_client_requests: int = field(
        default=64,
        metadata=option(
            "Requests one client (one key, or one connection) may have running.", min=1
        ),
    )
    max_queued_tasks: int = field(
        default=65536,
        metadata=option(
            "Ready tasks waiting for a worker, over all requests, before new ones are busy.",
            min=1,
        ),
    )
    max_workers: int = 1024
    busy_retry_s: float = 1.0  # the retry hint a ``busy`` refusal carries
    # Faulty workers: a worker whose results failed the checks this many times (each time
    # confirmed by another worker's good result for the same task) gets no work for a while.
    quarantine_after: int = field(
        default=2,
        metadata=option(
            "Confirmed bad results (NaN, Inf, wrong shape or dtype) before a worker is "
            "quarantined.",
            min=1,
        ),
    )
    quarantine_s: float = field(
        default=600.0, metadata=option("How long a quarantined worker gets no work.", min=0)
    )
    # Verification by redundancy (``broker.verify``): tasks run again on a second worker of
    # another principal and the same device class, results compared by digest.
    verify: VerifyMode = field(
        default="sample",
        metadata=option(
            "sample: replicate every task of a new or outvoted worker (its results reach the "
            "plan only once a replica agrees) until --verify-trusted-after of its results "
            "agreed, then a fraction halving every --verify-half-life agreements down to "
            "--verify-floor; all: replicate and hold every task; off: verify nothing, and "
            "the pool is trusted: results carry no digest and fetches between workers are "
            "not checked."
        ),
    )
    # 500: a worker wrong once in 100 results rarely passes it unstruck (0.99**500 < 1 %)
    verify_trusted_after: int = field(
        default=500,
        metadata=option(
            "Results of a worker that must agree with another worker's before its tasks are "
            "only sampled.",
            min=0,
        ),
    )
    verify_half_life: int = field(
        default=10,
        metadata=option(
            "Agreements past --verify-trusted-after that halve a worker's replication rate.",
            min=1,
        ),
    )
    verify_floor: float = field(
        default=0.05,
        metadata=option(
            "The lowest fraction of a trusted worker's tasks replicated (never zero).",
            min=0.001,
            max=1.0,
        ),
    )
    verify_seed: int | None = None  # the sampling's random seed (None: from the OS; tests)
    # Across device classes results agree within a tolerance per model and dtype
    # (``broker.tolerance``: its defaults and the figures they come from).
    verify_tolerance: str = field(
        default="",
        metadata=option(
            "Tolerances for comparing results of workers of different device classes, over "
            "the defaults (float32/float64 1e-4, bfloat16/float16 0.05): [MODEL:]DTYPE=REL "
            "entries, comma-separated; REL bounds max|a-b| and rms(a-b), each relative to the "
            "larger result's. An entry @FILE reads a chords-calibrate --out file."
        ),
    )
    # "fifo" is the placement before the speed model (for comparison).
    placement: Placement = field(
        default="eft",
        metadata=option(
            "eft: by learnt speeds (a task goes to the worker that would finish it soonest; on "
            "a pool of mixed speeds a request whose tasks are known ahead is scheduled ahead); "
            "fifo: to any idle worker."
        ),
    )
    # How many cores a CHORDS request gets: "adaptive" grants fewer than asked while other
    # requests share the model's workers (about workers / requests), "fixed" what it asks.
    cores_policy: CoresPolicy = field(
        default="adaptive",
        metadata=option(
            "adaptive: a CHORDS request's cores are the most it wants; while other requests "
            "share the workers it gets about workers / requests (at least 1) unless it asks "
            "for exact_cores. fixed: every request gets the cores it asks for."
        ),
    )
    # Deadlines: an EVAL still running after deadline_factor x its worker's expected time (and
    # at least the floor) is late: its tasks are copied to another worker (the first answer of
    # the two wins), and its worker gets no work until it answers. After max_missed_deadlines
    # in a row the worker is quarantined like a faulty one.
    deadline_factor: float = 2.5
    deadline_floor_s: float = 0.05
    max_missed_deadlines: int = 5
    # A PREPARE or DECODE is late past deadline_factor x what that worker (else its model's
    # workers) took for one, kept between this floor and ceiling; before anything is learnt,
    # at the ceiling. It then runs on another worker, and its worker misses a deadline.
    job_deadline_floor_s: float = 0.5
    job_deadline_ceiling_s: float = 60.0
    # The data plane (issue 25): a request whose plan is fed by name (CHORDS, sequential, SRDS)
    # keeps its results on the workers that computed them; the broker sends names and keeps
    # only who holds what, and recomputes what a lost worker held.
    data_plane: bool = field(
        default=True,
        metadata=option(
            "Keep the latents of CHORDS, sequential and SRDS requests on the workers that "
            "made them (recomputed if one is lost); off, they go through the broker."
        ),
    )
    max_replays: int = 1024  # tasks one request may run again to recompute lost results
    # With eft placement on the data plane: a task goes to the worker that finishes it soonest,
    # its inputs' transfers counted at the bandwidth learnt per pair of hosts (broker.links).
    # False (the comparison): a core's chain stays on its worker while it is idle, and the
    # speed model keeps the fetches in an EVAL's time, as before.
    link_placement: bool = field(
        default=True,
        metadata=option(
            "On the data plane, count each input's transfer from its holder (at the bandwidth "
            "learnt per pair of hosts) in where a task runs; off, a core's chain stays on its "
            "worker while that worker is idle."
        ),
    )
    # Chains without round trips (issue 25, item 6): on the data plane, with --verify off, one
    # EVAL carries a core's next steps too (``Plan.follow``: each reads only the step before),
    # which the worker runs in a row, answering each as it finishes; the next step starts
    # without waiting for the broker. 1: every step is its own EVAL. At most an EVAL's
    # ``MAX_TASKS``: a worker drops a longer EVAL as malformed (the dispatcher caps it too, for
    # a config built without the option's range).
    chain: int = field(
        default=4,
        metadata=option(
            "On the data plane with --verify off: the most consecutive steps of one core an "
            f"EVAL carries (the worker runs them in a row, answering each), at most {MAX_TASKS}"
            "; 1: no chains.",
            min=1,
            max=MAX_TASKS,
        ),
    )
    # Push (issue 25): on the data plane, with the cores bound to workers, a result another
    # core reads goes from its producer to that core's worker on another host as soon as it
    # exists (``FairDispatcher._push_to``). False (the comparison): every reader pulls.
    push: bool = field(
        default=True,
        metadata=option(
            "On the data plane, a result another core reads is pushed by its producer to that "
            "core's worker on another host as soon as it exists; off, the reader pulls it."
        ),
    )
    # Push within a host too (``FairDispatcher._push_to``): a reader's worker on the producer's
    # host gets the result as soon as it exists instead of fetching it when its EVAL arrives.
    # False (the comparison): pushes cross hosts only.
    push_local: bool = field(
        default=True,
        metadata=option(
            "With --push, a result of at most 1 MiB is pushed to its reader's worker on the "
            "same host too (a loopback copy made while the producer computes on, not a fetch "
            "when the reader's EVAL arrives); off, only across hosts."
        ),
    )
    # A big hit's latent sent on to the client in pieces as they arrive (``broker.parts``).
    # False (the comparison): whole, the second hop after the first.
    hit_parts: bool = field(
        default=True,
        metadata=option(
            "On the data plane, a hit's latent of 2 MiB or more comes from its worker in pieces, "
            "each checked and sent on to the client as it arrives (one hop, not two); off, whole."
        ),
    )
    # Logging of bad traffic, per peer: a burst, then one line per interval with a count.
    log_burst: int = 5
    log_interval_s: float = 10.0
    # The endpoints the server bound, named in a ``wrong_port`` refusal ("" if unknown).
    client_endpoint: str = ""
    worker_endpoint: str = ""

    def __post_init__(self) -> None:
        Tolerances.parse(self.verify_tolerance)  # a bad --verify-tolerance: InvalidTolerance
