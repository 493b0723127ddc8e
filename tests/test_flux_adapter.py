"""The Flux adapter on a tiny offline FluxPipeline: the engine's sequential output and CHORDS'
core 1 equal ``pipe(..., output_type="latent")`` bit for bit, in-process and through a worker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from chords_mq.algorithms import ChordsPlan
from chords_mq.client import AsyncClient
from chords_mq.cluster import LocalCluster
from chords_mq.local import simulate
from chords_mq.request import RequestSpec
from chords_mq.runner import sequential_reference
from tests.tiny_pipelines import FLUX_CALL_KWARGS, build_tiny_flux, build_tiny_sd, save_tiny
from workers.models import load_adapter, served_name

PARAMS = {
    "prompt": "a photo of a cat",
    "height": 16,
    "width": 16,
    "guidance_scale": 3.5,
    "max_sequence_length": 32,
}


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(build_tiny_flux(), tmp_path_factory.mktemp("tiny-flux") / "tiny-flux")


@pytest.fixture(scope="module")
def pipe(flux_dir: Path):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(flux_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_latent(pipe, steps: int, seed: int, **extra) -> torch.Tensor:
    kwargs = {**FLUX_CALL_KWARGS, **{k: v for k, v in PARAMS.items() if k != "prompt"}, **extra}
    with torch.no_grad():
        return pipe(
            PARAMS["prompt"],
            num_inference_steps=steps,
            output_type="latent",
            generator=torch.Generator().manual_seed(seed),
            **kwargs,
        ).images


def test_sequential_equals_the_pipeline_bitwise(flux_dir, pipe):
    adapter = load_adapter(str(flux_dir))
    spec = RequestSpec(model="tiny-flux", method="sequential", steps=6, seed=2, params=PARAMS)
    ours = sequential_reference(adapter, spec)
    assert ours.shape == (1, 64, 4)  # the pipeline's packed layout
    assert torch.equal(ours, pipeline_latent(pipe, 6, 2))


def test_chords_core1_equals_the_pipeline_bitwise(flux_dir, pipe):
    adapter = load_adapter(str(flux_dir))
    spec = RequestSpec(model="tiny-flux", cores=3, steps=12, seed=4, params=PARAMS)
    prepared = adapter.prepare(spec)

    def velocity(x: torch.Tensor, step: int) -> torch.Tensor:
        return adapter.denoise(prepared.context, x.unsqueeze(0), [step])[0]

    plan = ChordsPlan(prepared.x0, 12, spec.resolved_init_sequence(), solver=prepared.solver)
    hits = simulate(plan, velocity).hits
    core1 = next(h for h in hits if h.core == 1)
    assert torch.equal(core1.latent, pipeline_latent(pipe, 12, 4))
    fastest = hits[1]
    assert fastest.core == 3 and not torch.equal(fastest.latent, core1.latent)


def test_true_cfg_with_a_negative_prompt_matches_the_pipeline(flux_dir, pipe):
    adapter = load_adapter(str(flux_dir))
    params = {**PARAMS, "negative_prompt": "blurry", "true_cfg_scale": 2.0}
    spec = RequestSpec(model="tiny-flux", method="sequential", steps=4, seed=1, params=params)
    expected = pipeline_latent(pipe, 4, 1, negative_prompt="blurry", true_cfg_scale=2.0)
    assert torch.equal(sequential_reference(adapter, spec), expected)
    assert not torch.equal(expected, pipeline_latent(pipe, 4, 1))


def test_batched_forward_of_two_steps_runs(flux_dir):
    adapter = load_adapter(str(flux_dir))
    prepared = adapter.prepare(RequestSpec(model="f", steps=4, seed=0, params=PARAMS))
    batch = torch.stack([prepared.x0, prepared.x0 * 0.5])
    out = adapter.denoise(prepared.context, batch, [0, 2])
    single = adapter.denoise(prepared.context, batch[1:], [2])
    assert out.shape == batch.shape
    assert torch.allclose(out[1], single[0], atol=1e-5)


def test_pipelines_without_an_adapter_are_rejected(tmp_path):
    folder = save_tiny(build_tiny_sd(), tmp_path / "tiny-sd")
    with pytest.raises(ValueError, match="StableDiffusionPipeline has no adapter yet"):
        load_adapter(str(folder))


def test_bad_params_are_invalid_requests(flux_dir):
    from chords_mq.request import InvalidRequest

    adapter = load_adapter(str(flux_dir))
    with pytest.raises(InvalidRequest, match="prompt"):
        adapter.prepare(RequestSpec(model="f", params={"height": 16}))
    with pytest.raises(InvalidRequest, match="multiples"):
        adapter.prepare(RequestSpec(model="f", params={**PARAMS, "height": 15}))


def test_a_worker_serves_a_pipeline_folder_under_its_name(flux_dir, pipe, tmp_path):
    assert served_name(str(flux_dir)) == "tiny-flux"
    cluster = LocalCluster(workers=1, model=str(flux_dir), log_dir=tmp_path / "logs").start()
    try:

        async def run() -> list:
            async with AsyncClient(cluster.client_address) as client:
                stream = client.generate(
                    "tiny-flux", method="sequential", steps=5, seed=3, params=PARAMS, timeout=120
                )
                return [hit async for hit in stream]

        (hit,) = asyncio.run(run())
    finally:
        cluster.stop()
    assert torch.equal(hit.latent, pipeline_latent(pipe, 5, 3))
