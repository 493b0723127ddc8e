"""Issue 25's fault tests with real processes: a broker and synthetic workers on loopback, workers
killed with SIGKILL mid-request, every hit compared bit for bit with the same request computed
in-process. They hold with the broker's ``--no-data-plane`` (latents through the broker, a lost
task re-run) and with ``--data-plane`` (latents on the workers, a lost one recomputed from its
lineage): each test runs once per setting.

One worker per core: on the data plane the broker keeps a core's chain on the worker holding its
inputs, so with as many workers as cores each busy worker holds one core's chain (and on today's
path runs one of its tasks). The victims are killed at a moment the broker's STATUS shows every
worker busy, all of them frozen (SIGSTOP) so none can finish meanwhile. The references come from
chords_mq.local, never from the engine's own run.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
from collections.abc import Iterator

import pytest

from chords_mq.apps.cluster import LocalCluster
from chords_mq.client import AsyncClient, ClientHit, RequestFailed
from chords_mq.request import RequestSpec
from tests.integration.conftest import assert_same_hits, local_hits

PLANES = [pytest.param("off", id="data-plane-off"), pytest.param("on", id="data-plane-on")]
# Said explicitly, so each run keeps its setting whatever the broker's default.
PLANE_FLAG = {"off": "--no-data-plane", "on": "--data-plane"}
CORES = 4
LATENCY_MS = 30.0
SPEC = {"model": "synthetic", "cores": CORES, "steps": 30}


class Pool:
    """The module's cluster, with what the tests do to its workers."""

    def __init__(self, cluster: LocalCluster, plane: str) -> None:
        self.cluster = cluster
        self.plane = plane

    async def fill(self, count: int) -> None:
        """Start workers until ``count`` are alive, and wait until the broker lists them all."""
        for _ in range(count - len(self.cluster.alive_workers())):
            self.cluster.start_worker()
        await self.cluster.wait_for_workers_async(len(self.cluster.alive_workers()), 60)

    @staticmethod
    def signal(processes: list[subprocess.Popen[bytes]], number: int) -> None:
        for process in processes:
            os.kill(process.pid, number)

    @staticmethod
    def kill(*processes: subprocess.Popen[bytes]) -> None:
        assert all(p.poll() is None for p in processes), "kill only live workers (pids are reused)"
        for process in processes:  # all signals first: "at once"
            os.kill(process.pid, signal.SIGKILL)
        for process in processes:
            process.wait(10)


@pytest.fixture(scope="module", params=PLANES)
def pool(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pool]:
    """One worker per core on a broker with the data plane on or off; each test starts with
    ``Pool.fill``, replacing the workers an earlier one killed. ``--worker-timeout 1``: a
    request with no capable worker fails after 1 s."""
    cluster = LocalCluster(
        workers=0,
        latency_ms=LATENCY_MS,
        worker_timeout_s=1.0,
        log_dir=tmp_path_factory.mktemp(f"lineage-{request.param}"),
        extra_broker_args=[PLANE_FLAG[request.param], "--max-task-retries", "8"],
    )
    cluster.start()
    try:
        started = Pool(cluster, request.param)
        asyncio.run(started.fill(CORES))
        yield started
    finally:
        cluster.stop()


async def run_with_kills(
    pool: Pool, spec: RequestSpec, victims: int
) -> tuple[list[ClientHit], dict[str, object], list[subprocess.Popen[bytes]]]:
    """Run ``spec``; after its first hit (core 0, round 4 of 30: every core's chain has begun
    and none has finished), SIGKILL ``victims`` workers, each running a task, all at once."""
    killed: list[subprocess.Popen[bytes]] = []
    async with AsyncClient(pool.cluster.client_address) as client:
        stream = client.submit(spec, timeout=120)
        hits = []
        async for hit in stream:
            hits.append(hit)
            if not killed:
                killed = await kill_busy(pool, client, victims, random.Random(spec.seed))
                assert len(hits) < len(spec.expected_hit_rounds()), "killed after the request"
        assert stream.stats is not None
        return hits, stream.stats, killed


async def kill_busy(
    pool: Pool, client: AsyncClient, victims: int, rng: random.Random
) -> list[subprocess.Popen[bytes]]:
    """Freeze every worker (SIGSTOP); if after 50 ms (a result sent just before reaches the
    broker) STATUS lists exactly them and all busy, SIGKILL ``victims`` of them and let the rest
    go on; else let all go on and try again."""
    for _ in range(200):  # a few seconds at most
        alive = pool.cluster.alive_workers()
        pool.signal(alive, signal.SIGSTOP)
        await asyncio.sleep(0.05)
        workers = (await client.status())["workers"]
        if len(workers) == len(alive) and all(w["busy"] for w in workers):
            chosen = rng.sample(alive, victims)
            pool.kill(*chosen)
            pool.signal([p for p in alive if p not in chosen], signal.SIGCONT)
            return chosen
        pool.signal(alive, signal.SIGCONT)
        await asyncio.sleep(0.02)
    raise AssertionError("never every worker busy at once mid-request")


def assert_recovered_on_the_data_plane(pool: Pool, hits: list[ClientHit], stats: dict) -> None:
    """With the data plane on, the latents stayed on the workers (each hit crossed the broker
    once and x0 never: one latent of slack) and what the killed workers held was recomputed
    from its lineage."""
    if pool.plane != "on":
        return
    latent = hits[-1].latent
    assert latent is not None
    assert stats["broker_latent_bytes"] <= (1 + len(hits)) * latent.nbytes, stats
    assert stats["replays"] >= 1, "the killed worker's results must be recomputed"


async def test_killing_the_worker_holding_a_cores_chain_keeps_every_hit_bitwise(pool):
    """Every request with a busy worker killed is bitwise; on the data plane, what it held is
    recomputed. Which busy worker dies is drawn at random, and one that held nothing still
    needed (its input fetched from another worker, its own results already consumed) costs a
    retry but no replay: up to 3 requests, until one kill needed a replay."""
    for seed in (11, 12, 13):  # bounded
        await pool.fill(CORES)
        spec = RequestSpec(**SPEC, seed=seed)
        hits, stats, killed = await run_with_kills(pool, spec, victims=1)
        assert_same_hits(hits, local_hits(spec))
        assert len(killed) == 1 and killed[0].returncode == -signal.SIGKILL
        assert stats["retries"] >= 1, "the killed worker's task must have run again"
        if pool.plane != "on" or stats["replays"] >= 1:
            break
    assert_recovered_on_the_data_plane(pool, hits, stats)


async def test_killing_two_workers_at_once_with_workers_left_keeps_every_hit_bitwise(pool):
    await pool.fill(CORES)
    spec = RequestSpec(**SPEC, seed=12)
    hits, stats, killed = await run_with_kills(pool, spec, victims=2)
    assert_same_hits(hits, local_hits(spec))
    assert len(killed) == 2
    assert stats["retries"] >= 2, "both killed workers' tasks must have run again"
    assert_recovered_on_the_data_plane(pool, hits, stats)


def registered(cluster: LocalCluster) -> list[subprocess.Popen[bytes]]:
    """The live workers that joined the pool (their log says so): one killed while it still
    starts was never in it, and killing those could leave none."""
    assert cluster.log_dir is not None
    return [
        process
        for index, process in enumerate(cluster.workers)
        if process.poll() is None
        and "registered with broker" in (cluster.log_dir / f"worker{index}.log").read_text()
    ]


async def test_chaos_six_kills_over_four_requests_gives_no_wrong_output(pool):
    """Four requests at once (K=4 to 6, N=20, exact: no sharing of cores); a worker of the
    pool killed at a random moment every 0.1 to 0.3 s (6 kills, never the pool's last) and a new
    one started after each, so a capable worker is always left: every hit is bitwise and none
    fails."""
    await pool.fill(CORES)
    specs = [
        RequestSpec("synthetic", cores=cores, steps=20, seed=20 + i, exact_cores=True)
        for i, cores in enumerate([4, 5, 6, 4])
    ]

    async def collect(client: AsyncClient, spec: RequestSpec) -> tuple[list[ClientHit], dict]:
        stream = client.submit(spec, timeout=120)
        hits = [hit async for hit in stream]
        assert stream.stats is not None
        return hits, stream.stats

    cluster, rng, kills = pool.cluster, random.Random(5), 0
    async with AsyncClient(cluster.client_address) as client:
        running = [asyncio.ensure_future(collect(client, spec)) for spec in specs]
        for _ in range(600):  # at most 60 s
            if kills == 6 or all(task.done() for task in running):
                break
            await asyncio.sleep(rng.uniform(0.1, 0.3))
            joined = registered(cluster)
            if len(joined) >= 2:
                pool.kill(rng.choice(joined))
                kills += 1
                cluster.start_worker()
        results = await asyncio.gather(*running, return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    assert not failed, f"a capable worker was always left, yet: {failed}"
    for spec, (hits, _) in zip(specs, results):
        assert_same_hits(hits, local_hits(spec))
    assert kills >= 4, f"only {kills} kills landed while the requests ran"
    if pool.plane == "on":  # some of what the killed workers held was needed again
        assert sum(stats["replays"] for _, stats in results) >= 1


async def test_killing_every_capable_worker_fails_with_no_worker_at_once(pool):
    """Every synthetic worker killed at once mid-request, while a worker serving another model
    stays: no capable worker is left, and the request fails with a typed no_worker after the
    broker's --worker-timeout (1 s), well inside the client's own 30 s."""
    await pool.fill(CORES)
    other = pool.cluster.start_worker(extra_args=["--name", "another-model"])
    await pool.fill(CORES + 1)
    spec = RequestSpec(**SPEC, seed=13)
    async with AsyncClient(pool.cluster.client_address) as client:
        with pytest.raises(RequestFailed) as failure:
            async for _ in client.submit(spec, timeout=30):
                synthetic = [p for p in pool.cluster.alive_workers() if p is not other]
                if synthetic:
                    pool.kill(*synthetic)
        assert failure.value.code == "no_worker", failure.value
        left = (await client.status())["workers"]
    assert [w["model"] for w in left] == ["another-model"]
    pool.kill(other)
