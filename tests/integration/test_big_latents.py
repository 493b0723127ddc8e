"""Video-sized latents through real daemons: the broker only adds, so it stays responsive and
its memory stays within a few latents; requests too large for it are refused at once."""

from __future__ import annotations

import asyncio

import pytest
import torch

from chords_mq.apps.bench import reset_peak, status_bytes
from chords_mq.apps.cluster import LocalCluster
from chords_mq.client import AsyncClient, RequestFailed
from chords_mq.request import RequestSpec
from tests.integration.conftest import hits_and_stats

MIB = 1 << 20
SHAPE = [16, 1024, 1024]  # float32: 64 MiB


def rss_bytes(pid: int, field: str) -> int:
    size = status_bytes(pid, field)
    assert size is not None, f"{field} not in /proc/{pid}/status"
    return size


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    logs = tmp_path_factory.mktemp("big")
    with LocalCluster(
        workers=4, latency_ms=0.0, log_dir=logs, extra_broker_args=["--max-request-bytes", "2GiB"]
    ) as started:
        yield started


def test_a_64_mib_latent_runs_with_no_retries_and_a_few_latents_of_broker_memory(cluster):
    assert cluster.broker is not None
    pid = cluster.broker.pid
    params = {"shape": SHAPE, "dtype": "float32"}
    sequential = RequestSpec("synthetic", method="sequential", steps=16, params=params)
    (seq_hit,), seq_stats = asyncio.run(hits_and_stats(cluster.client_address, sequential, 600))
    assert seq_hit.latent.nbytes == 64 * MIB and seq_stats["retries"] == 0
    idle = rss_bytes(pid, "VmRSS")
    if not reset_peak(pid):
        pytest.skip("this kernel does not let us reset the broker's peak RSS (clear_refs)")
    chords = RequestSpec("synthetic", cores=4, steps=16, params=params)
    hits, stats = asyncio.run(hits_and_stats(cluster.client_address, chords, 600))
    peak = rss_bytes(pid, "VmHWM")
    assert stats["retries"] == 0, "no worker may be declared dead for a slow transfer"
    core1 = next(h for h in hits if h.core == 1)
    assert torch.equal(core1.latent, seq_hit.latent)
    assert [h.core for h in hits] == [0, 4, 3, 2, 1]
    # The request's own accounting, sampled at every result, stays within the bound admission
    # charges it (4K + 2 latents), and so does the whole process, results still arriving from
    # the other workers included. (The broker before the redesign peaked at 19 to 27 latents;
    # benchmarks/big_latents.py reports the measured figures: about 2K held, 10 in RSS.)
    bound = chords.working_set_latents()
    assert bound == 18
    assert stats["peak_bytes"] <= bound * 64 * MIB
    above = (peak - idle) / (64 * MIB)
    assert above <= bound, f"the broker's peak RSS was {above:.1f} latents above idle"


def test_a_request_over_max_request_bytes_is_refused_at_once(cluster):
    params = {"shape": [64, 1024, 1024], "dtype": "float32"}  # 256 MiB x 18 > 2 GiB
    spec = RequestSpec("synthetic", cores=4, steps=16, params=params)

    async def submit() -> None:
        async with AsyncClient(cluster.client_address) as client:
            async for _ in client.submit(spec, timeout=120):
                pass

    with pytest.raises(RequestFailed) as failure:
        asyncio.run(submit())
    assert failure.value.code == "too_large"
    assert "max-request-bytes" in str(failure.value)
