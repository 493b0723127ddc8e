"""The engine end to end: broker and workers as real processes, a real client, real sockets."""

from __future__ import annotations

import asyncio

import pytest
import torch

from chords_mq.client import AsyncClient, RequestFailed
from chords_mq.request import InvalidRequest, RequestSpec
from tests.integration.conftest import assert_same_hits, local_hits


async def collect(address: str, **kwargs):
    async with AsyncClient(address) as client:
        stream = client.generate(timeout=120, **kwargs)
        hits = [hit async for hit in stream]
    return hits, stream


@pytest.mark.parametrize("workers", [1, 2, 4])
@pytest.mark.parametrize("cores", [4, 8])
async def test_chords_hits_equal_local_simulation_bitwise(clusters, workers, cores):
    cluster = clusters[workers]
    spec = RequestSpec(model="synthetic", cores=cores, steps=30, seed=3)
    hits, stream = await collect(
        cluster.client_address, model="synthetic", cores=cores, steps=30, seed=3
    )
    expected = local_hits(spec)
    assert_same_hits(hits, expected)
    rounds = [hit.round for hit in hits]
    assert rounds == sorted(rounds), "hits must arrive in round order"
    assert stream.accepted["hit_rounds"] == [[h.core, h.round] for h in expected]
    assert stream.stats["evaluations"] == sum(30 - i for i in stream.accepted["init_sequence"])
    sequential, _ = await collect(
        cluster.client_address, model="synthetic", method="sequential", steps=30, seed=3
    )
    assert [(h.core, h.round) for h in sequential] == [(1, 30)]
    core1 = next(h for h in hits if h.core == 1)
    assert torch.equal(core1.latent, sequential[0].latent)


async def test_a_big_hit_comes_in_pieces_with_the_local_simulations_bits(clusters):
    """A 4 MiB latent: each hit's latent leaves its decoder in pieces that the broker checks
    and sends on as they arrive (``broker.parts``); the client's hits are bitwise the local
    simulation's."""
    params = {"shape": [4, 512, 512], "dtype": "float32"}
    spec = RequestSpec(model="synthetic", cores=4, steps=12, seed=5, params=params)
    hits, stream = await collect(
        clusters[4].client_address, model="synthetic", cores=4, steps=12, seed=5, params=params
    )
    assert_same_hits(hits, local_hits(spec))
    assert stream.stats["hit_parts"] == 4 * len(hits)  # four 1 MiB pieces a hit


async def test_bfloat16_latents_and_other_shapes(clusters):
    params = {"shape": [2, 3, 5, 7], "dtype": "bfloat16"}
    spec = RequestSpec(model="synthetic", cores=6, steps=25, seed=11, params=params)
    hits, _ = await collect(
        clusters[2].client_address, model="synthetic", cores=6, steps=25, seed=11, params=params
    )
    assert hits[0].latent.dtype == torch.bfloat16
    assert_same_hits(hits, local_hits(spec))


async def test_two_concurrent_requests_both_match(clusters):
    address = clusters[4].client_address
    # each at the K it asks for (the adaptive cores policy has its own tests)
    a = collect(address, model="synthetic", cores=4, steps=40, seed=1, exact_cores=True)
    b = collect(
        address,
        model="synthetic",
        cores=8,
        steps=40,
        seed=2,
        params={"shape": [8, 8], "dtype": "float64"},
        exact_cores=True,
    )
    (hits_a, _), (hits_b, _) = await asyncio.gather(a, b)
    assert_same_hits(hits_a, local_hits(RequestSpec(model="synthetic", cores=4, steps=40, seed=1)))
    assert_same_hits(
        hits_b,
        local_hits(
            RequestSpec(
                model="synthetic",
                cores=8,
                steps=40,
                seed=2,
                params={"shape": [8, 8], "dtype": "float64"},
            )
        ),
    )


async def test_stop_rule_returns_the_fastest_core_only(clusters):
    hits, stream = await collect(
        clusters[4].client_address,
        model="synthetic",
        cores=4,
        steps=30,
        seed=5,
        stop="core-index:1",
    )
    assert [h.core for h in hits] == [0, 4]
    assert stream.stats["returned"]["core"] == 4


async def test_unknown_model_fails_after_the_worker_timeout(clusters):
    with pytest.raises(RequestFailed) as failure:
        await collect(clusters[1].client_address, model="no-such-model", cores=2, steps=10)
    assert failure.value.code == "no_worker"


async def test_bad_params_fail_with_invalid_request(clusters):
    with pytest.raises(RequestFailed) as failure:
        await collect(
            clusters[1].client_address,
            model="synthetic",
            cores=2,
            steps=10,
            params={"shape": "big"},
        )
    assert failure.value.code == "invalid_request"
    assert "shape" in failure.value.message


def test_client_side_validation_raises_before_sending():
    with pytest.raises(InvalidRequest):
        AsyncClient("tcp://127.0.0.1:1").generate("synthetic", init_sequence=[0, 9, 3], steps=10)


async def test_leaving_the_stream_early_cancels_the_request(clusters):
    address = clusters[2].client_address
    async with AsyncClient(address) as client:
        async for hit in client.generate("synthetic", cores=4, steps=200, seed=1):
            assert hit.core == 0
            break
        for _ in range(50):
            status = await client.status()
            if not status["sessions"]:
                break
            await asyncio.sleep(0.05)
        assert status["sessions"] == []


async def test_batch_mode_packs_ready_tasks_into_fewer_forwards(clusters):
    """Opt-in batching: the synthetic field is elementwise, so even batched it stays bitwise."""
    spec = RequestSpec(model="synthetic", cores=8, steps=30, seed=9, batch=8)
    hits, stream = await collect(
        clusters[2].client_address, model="synthetic", cores=8, steps=30, seed=9, batch=8
    )
    assert_same_hits(hits, local_hits(spec))
    assert stream.stats["forwards"] < stream.stats["evaluations"]


@pytest.mark.parametrize("output", ["both", "media"])
async def test_workers_decode_each_hit_and_hits_keep_their_order(clusters, output):
    from chords_mq.workers.models.synthetic import SyntheticAdapter

    spec = RequestSpec(model="synthetic", cores=4, steps=30, seed=12)
    hits, stream = await collect(
        clusters[2].client_address, model="synthetic", cores=4, steps=30, seed=12, output=output
    )
    expected = local_hits(spec)
    assert [(h.core, h.round) for h in hits] == [(h.core, h.round) for h in expected]
    decode = SyntheticAdapter().decode
    for got, want in zip(hits, expected):
        assert torch.equal(got.media, decode(None, want.latent))
        if output == "both":
            assert torch.equal(got.latent, want.latent)
        else:
            assert got.latent is None
    assert stream.stats["hits"] == len(expected)
