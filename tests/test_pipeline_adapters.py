"""Adapters over real diffusers pipelines (tiny, built offline from configs).

For every family: a real broker and two real worker processes run a sequential request and a
CHORDS K=4 request; core 1 must equal the pipeline's own ``pipe(..., output_type="latent")``
bit for bit, in float32 and bfloat16, and every hit must equal ``chords_mq.local.simulate``
with the adapter's velocity run in-process. Decoded pictures must equal the pipeline's own.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from chords_mq.algorithms import init_sequence
from chords_mq.apps.cluster import LocalCluster
from chords_mq.client import AsyncClient
from chords_mq.local import run_tasks
from chords_mq.request import InvalidRequest, RequestSpec
from chords_mq.workers.models import load_adapter, served_name
from chords_mq.workers.models.base import evaluate, in_process, pixels_to_uint8
from tests import tiny_pipelines as tiny


def euler_on_the_same_sigmas(pipe: Any) -> None:
    """Wan's reference: the pipeline with flow-matching Euler on its UniPC sigmas and timesteps
    (what CHORDS integrates), instead of UniPC's multistep update."""
    import copy

    from diffusers import FlowMatchEulerDiscreteScheduler

    unipc = copy.deepcopy(pipe.scheduler)

    class EulerOnTheseSigmas(FlowMatchEulerDiscreteScheduler):
        def set_timesteps(self, num_inference_steps: int, device: Any = None, **_: Any) -> None:
            source = copy.deepcopy(unipc)
            source.set_timesteps(num_inference_steps, device=device)
            self.num_inference_steps = num_inference_steps
            self.timesteps = source.timesteps
            self.sigmas = source.sigmas.to(torch.float32)
            self._step_index = self._begin_index = None

        def step(self, model_output: Any, timestep: Any, sample: Any, **kwargs: Any) -> Any:
            # UniPC's timesteps are integers; the Euler step only uses its step index.
            return super().step(model_output, timestep.float(), sample, **kwargs)

    pipe.scheduler = EulerOnTheseSigmas()


@dataclass(frozen=True)
class Family:
    name: str
    build: Any
    call_kwargs: dict[str, Any]
    reference: Any = None  # adjusts the reference pipeline (Wan: Euler instead of UniPC)

    @property
    def params(self) -> dict[str, Any]:
        return {"prompt": "a photo of a cat", **self.call_kwargs}


FAMILIES = [
    Family("flux", tiny.build_tiny_flux, tiny.FLUX_CALL_KWARGS),
    Family("stable-diffusion", tiny.build_tiny_sd, tiny.SD_CALL_KWARGS),
    Family("stable-diffusion-xl", tiny.build_tiny_sdxl, tiny.SDXL_CALL_KWARGS),
    Family("sd3", tiny.build_tiny_sd3, tiny.SD3_CALL_KWARGS),
    Family("hunyuan-video", tiny.build_tiny_hunyuan_video, tiny.HUNYUAN_CALL_KWARGS),
    Family("cogvideox", tiny.build_tiny_cogvideox, tiny.COGVIDEOX_CALL_KWARGS),
    Family("wan", tiny.build_tiny_wan, tiny.WAN_CALL_KWARGS, euler_on_the_same_sigmas),
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    return {f.name: tiny.save_tiny(f.build(), root / f"tiny-{f.name}") for f in FAMILIES}


def load_pipe(folder: Path, dtype: torch.dtype) -> Any:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_output(pipe: Any, family: Family, steps: int, seed: int, output_type: str) -> Any:
    if family.reference is not None:
        family.reference(pipe)
    with torch.no_grad():
        return pipe(
            "a photo of a cat",
            num_inference_steps=steps,
            output_type=output_type,
            generator=torch.Generator().manual_seed(seed),
            **family.call_kwargs,
        )[0]  # images, or frames for a video pipeline


def local_hits(adapter: Any, spec: RequestSpec) -> list:
    prepared = adapter.prepare(spec)
    plan = spec.build_plan(prepared.x0, prepared.solver)
    return run_tasks(plan, in_process(adapter, prepared)).hits


async def engine_hits(address: str, model: str, spec: RequestSpec) -> list:
    async with AsyncClient(address) as client:
        stream = client.generate(
            model,
            method=spec.method,
            steps=spec.steps,
            cores=spec.cores,
            seed=spec.seed,
            params=spec.params,
            timeout=300,
        )
        return [hit async for hit in stream]


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_engine_core1_equals_the_pipeline_bitwise(saved, family, dtype_name, tmp_path):
    folder, dtype = saved[family.name], DTYPES[dtype_name]
    model = served_name(str(folder))
    steps = 12
    sequential = RequestSpec(
        model=model, method="sequential", steps=steps, seed=3, params=family.params
    )
    chords = RequestSpec(model=model, cores=4, steps=steps, seed=3, params=family.params)
    assert chords.resolved_init_sequence() == init_sequence(4, steps)
    cluster = LocalCluster(
        workers=2,
        model=str(folder),
        log_dir=tmp_path / "logs",
        extra_worker_args=["--dtype", dtype_name],
    ).launch()  # the references are computed here while the daemons start
    try:
        expected = pipeline_output(load_pipe(folder, dtype), family, steps, 3, "latent")
        adapter = load_adapter(str(folder), dtype=dtype)
        local = local_hits(adapter, chords)
        cluster.wait_for_workers(2)
        (seq_hit,) = asyncio.run(engine_hits(cluster.client_address, model, sequential))
        hits = asyncio.run(engine_hits(cluster.client_address, model, chords))
    finally:
        cluster.stop()
    assert seq_hit.latent.dtype == dtype
    assert torch.equal(seq_hit.latent, expected), "sequential != pipeline"
    core1 = next(h for h in hits if h.core == 1)
    assert torch.equal(core1.latent, expected), "CHORDS core 1 != pipeline"
    assert [(h.core, h.round) for h in hits] == [(h.core, h.round) for h in local]
    for got, want in zip(hits, local):
        assert torch.equal(got.latent, want.latent), f"core {got.core} != local simulate"


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_decoded_media_equals_the_pipeline(saved, family):
    folder = saved[family.name]
    adapter = load_adapter(str(folder))
    spec = RequestSpec(model="m", method="sequential", steps=5, seed=1, params=family.params)
    (hit,) = local_hits(adapter, spec)
    ours = adapter.decode(adapter.prepare(spec).context, hit.latent)
    theirs = pixels_to_uint8(
        pipeline_output(load_pipe(folder, torch.float32), family, 5, 1, "np")[0]
    )
    assert ours.dtype == torch.uint8 and ours.shape == theirs.shape
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_family_declares_its_results_dtype(saved, family):
    """PREPARED declares the results' dtype before any task runs (the broker holds every result
    to it): it is the dtype of a task from x0 and of a task from that result, in bfloat16,
    where a family's x0 (Hunyuan's float32) or output (CogVideoX's float32) differ from it."""
    adapter = load_adapter(str(saved[family.name]), dtype=torch.bfloat16)
    spec = RequestSpec(model="m", steps=4, seed=1, params=family.params)
    prepared = adapter.prepare(spec)
    assert prepared.result_dtype is not None
    (first,) = evaluate(adapter, prepared.context, prepared.solver, [prepared.x0], [0], [[1]])
    (second,) = evaluate(adapter, prepared.context, prepared.solver, [first[1]], [1], [[2]])
    assert (first[1].dtype, second[2].dtype) == (prepared.result_dtype,) * 2


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_a_prompt_is_required(saved, family):
    adapter = load_adapter(str(saved[family.name]))
    with pytest.raises(InvalidRequest, match="prompt"):
        adapter.prepare(RequestSpec(model="m", params={}))


def test_flux_true_cfg_matches_the_pipeline(saved):
    folder = saved["flux"]
    family = FAMILIES[0]
    adapter = load_adapter(str(folder))
    params = {**family.params, "negative_prompt": "blurry", "true_cfg_scale": 2.0}
    spec = RequestSpec(model="m", method="sequential", steps=4, seed=1, params=params)
    with torch.no_grad():
        expected = load_pipe(folder, torch.float32)(
            "a photo of a cat",
            negative_prompt="blurry",
            true_cfg_scale=2.0,
            num_inference_steps=4,
            output_type="latent",
            generator=torch.Generator().manual_seed(1),
            **family.call_kwargs,
        )[0]  # images, or frames for a video pipeline
    (hit,) = local_hits(adapter, spec)
    assert torch.equal(hit.latent, expected)


def test_batched_forward_matches_single_forwards_closely(saved):
    adapter = load_adapter(str(saved["stable-diffusion"]))
    prepared = adapter.prepare(RequestSpec(model="m", steps=4, params=FAMILIES[1].params))
    batch = torch.stack([prepared.x0, prepared.x0 * 0.5])
    out = adapter.denoise(prepared.context, batch, [0, 2])
    single = adapter.denoise(prepared.context, batch[1:], [2])
    assert out.shape == batch.shape
    assert torch.allclose(out[1], single[0], atol=1e-5)


def test_folders_without_an_adapter_or_index_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no model_index\.json in"):
        load_adapter(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="unknown model"):
        load_adapter("no-such-model")


def test_generate_cli_with_model_options(saved, tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file

    folder = saved["flux"]
    family = FAMILIES[0]
    cluster = LocalCluster(workers=1, model=str(folder), log_dir=tmp_path / "logs").start()
    try:
        subprocess.run(
            [
                str(Path(sys.executable).parent / "chords"),
                "generate",
                "--broker",
                cluster.client_address,
                "--model",
                "tiny-flux",
                "--method",
                "sequential",
                "--prompt",
                "a photo of a cat",
                "--height",
                "16",
                "--width",
                "16",
                "--guidance-scale",
                "3.5",
                "--param",
                "max_sequence_length=32",
                "--steps",
                "6",
                "--seed",
                "2",
                "--out",
                str(tmp_path / "out"),
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        cluster.stop()
    latent = load_file(str(tmp_path / "out" / "hit-core1.safetensors"))["latent"]
    assert torch.equal(
        latent, pipeline_output(load_pipe(folder, torch.float32), family, 6, 2, "latent")
    )


def test_engine_streams_decoded_pictures_equal_to_the_pipeline(saved, tmp_path):
    folder = saved["flux"]
    family = FAMILIES[0]
    spec = RequestSpec(
        model="tiny-flux", cores=4, steps=12, seed=3, params=family.params, output="both"
    )
    cluster = LocalCluster(workers=2, model=str(folder), log_dir=tmp_path / "logs").start()
    try:

        async def run() -> list:
            async with AsyncClient(cluster.client_address) as client:
                stream = client.generate(
                    "tiny-flux",
                    cores=4,
                    steps=12,
                    seed=3,
                    params=family.params,
                    output="both",
                    timeout=300,
                )
                return [hit async for hit in stream]

        hits = asyncio.run(run())
    finally:
        cluster.stop()
    core1 = next(h for h in hits if h.core == 1)
    picture = pipeline_output(load_pipe(folder, torch.float32), family, 12, 3, "np")[0]
    assert torch.equal(core1.media, pixels_to_uint8(picture))
    assert all(h.media is not None and h.media.dtype == torch.uint8 for h in hits)
    assert spec.output == "both"


def test_a_registry_names_models_and_fixes_their_family(saved, tmp_path):
    import json

    from chords_mq.workers.models import read_registry, resolve

    registry = tmp_path / "models.json"
    registry.write_text(
        json.dumps({"flux-dev": {"path": str(saved["flux"]), "family": "flux", "dtype": "float32"}})
    )
    entry = resolve("flux-dev", registry)
    assert (entry.name, entry.source, entry.family) == ("flux-dev", str(saved["flux"]), "flux")
    assert resolve("synthetic", registry).source == "synthetic"
    adapter = load_adapter(entry.source, family=entry.family)
    assert type(adapter).__name__ == "FluxAdapter"
    with pytest.raises(ValueError):  # a Flux folder forced to another family does not load
        load_adapter(str(saved["flux"]), family="stable-diffusion")
    with pytest.raises(ValueError, match="unknown family"):
        load_adapter(str(saved["flux"]), family="gan")
    registry.write_text(json.dumps({"x": {"path": "/p", "family": "gan"}}))
    with pytest.raises(ValueError, match="unknown family"):
        read_registry(registry)
    registry.write_text("{not json")
    with pytest.raises(ValueError, match="model registry"):
        read_registry(registry)


def test_registry_names_reach_the_engine_and_videos_become_mp4(saved, tmp_path):
    import json
    import subprocess
    import sys

    import imageio.v2 as imageio

    family = next(f for f in FAMILIES if f.name == "hunyuan-video")
    registry = tmp_path / "models.json"
    registry.write_text(json.dumps({"hv": {"path": str(saved["hunyuan-video"])}}))
    cluster = LocalCluster(
        workers=1,
        model="hv",
        log_dir=tmp_path / "logs",
        extra_worker_args=["--registry", str(registry)],
    ).start()
    try:
        params = [f"--param={key}={json.dumps(value)}" for key, value in family.params.items()]
        subprocess.run(
            [
                str(Path(sys.executable).parent / "chords"),
                "generate",
                "--broker",
                cluster.client_address,
                "--model",
                "hv",
                "--method",
                "sequential",
                "--steps",
                "4",
                "--output",
                "both",
                "--out",
                str(tmp_path / "out"),
                *params,
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        cluster.stop()
    frames = imageio.mimread(str(tmp_path / "out" / "hit-core1.mp4"))
    assert len(frames) == family.call_kwargs["num_frames"]
    assert frames[0].shape[:2] == (family.call_kwargs["height"], family.call_kwargs["width"])


# -- folders with Euler discrete, as SDXL's (and some SD 2.x) are published -----------------------

# The scheduler_config.json of the published SDXL base folder.
SDXL_EULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}
EULER_FAMILIES = ["stable-diffusion", "stable-diffusion-xl"]


@pytest.fixture(scope="module")
def euler_saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from diffusers import EulerDiscreteScheduler

    root = tmp_path_factory.mktemp("euler")
    folders = {}
    for family in (f for f in FAMILIES if f.name in EULER_FAMILIES):
        pipe = family.build()
        pipe.scheduler = EulerDiscreteScheduler(**SDXL_EULER)
        folders[family.name] = tiny.save_tiny(pipe, root / f"tiny-{family.name}-euler")
    return folders


@pytest.mark.parametrize(
    "name, dtype_name",
    [
        ("stable-diffusion", "float32"),
        ("stable-diffusion-xl", "float32"),
        ("stable-diffusion-xl", "bfloat16"),
    ],
)
def test_an_euler_discrete_folder_runs_in_eulers_own_form_bitwise(euler_saved, name, dtype_name):
    """Served as published: the solver is Euler discrete's own step (input scaled by
    ``scale_model_input``, initial noise by its ``init_noise_sigma``), so sequential and CHORDS'
    core 1 equal the stock ``pipe()`` with that scheduler, bit for bit."""
    family = next(f for f in FAMILIES if f.name == name)
    folder, dtype = euler_saved[name], DTYPES[dtype_name]
    steps = 12
    expected = pipeline_output(load_pipe(folder, dtype), family, steps, 3, "latent")
    adapter = load_adapter(str(folder), dtype=dtype)
    model = served_name(str(folder))
    sequential = RequestSpec(model, method="sequential", steps=steps, seed=3, params=family.params)
    (seq_hit,) = local_hits(adapter, sequential)
    assert torch.equal(seq_hit.latent, expected), "sequential != pipe()"
    chords = RequestSpec(model, cores=4, steps=steps, seed=3, params=family.params)
    core1 = next(h for h in local_hits(adapter, chords) if h.core == 1)
    assert torch.equal(core1.latent, expected), "CHORDS core 1 != pipe()"


def test_an_euler_discrete_folder_through_the_engine(euler_saved, tmp_path):
    """The Euler solver crosses the wire (PREPARED's solver spec) and runs on real workers:
    every hit equals the in-process run, core 1 the stock pipeline."""
    family = next(f for f in FAMILIES if f.name == "stable-diffusion-xl")
    folder = euler_saved[family.name]
    model = served_name(str(folder))
    chords = RequestSpec(model=model, cores=4, steps=12, seed=3, params=family.params)
    cluster = LocalCluster(workers=2, model=str(folder), log_dir=tmp_path / "logs").launch()
    try:  # the references are computed while the daemons start
        local = local_hits(load_adapter(str(folder)), chords)
        expected = pipeline_output(load_pipe(folder, torch.float32), family, 12, 3, "latent")
        cluster.wait_for_workers(2)
        hits = asyncio.run(engine_hits(cluster.client_address, model, chords))
    finally:
        cluster.stop()
    assert [(h.core, h.round) for h in hits] == [(h.core, h.round) for h in local]
    for got, want in zip(hits, local):
        assert torch.equal(got.latent, want.latent), f"core {got.core} != local simulate"
    assert torch.equal(next(h for h in hits if h.core == 1).latent, expected)


def test_a_family_that_does_not_scale_its_input_refuses_euler_discrete(tmp_path):
    from diffusers import EulerDiscreteScheduler

    from chords_mq.errors import SchedulerError

    pipe = tiny.build_tiny_flux()
    pipe.scheduler = EulerDiscreteScheduler()
    folder = tiny.save_tiny(pipe, tmp_path / "flux-euler")
    with pytest.raises(SchedulerError, match="flux does not scale its network's input as Euler"):
        load_adapter(str(folder))


# -- a multistep scheduler: its first-order member runs (SD 1.x folders ship PNDM) --------------

# The scheduler_config.json of the published Stable Diffusion 1.x folders.
SD1_PNDM = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


@pytest.mark.parametrize("dtype_name", ["float32"])  # DDIM in bfloat16: the family tests
def test_a_pndm_folder_runs_ddim_its_first_order_member_bitwise(dtype_name, tmp_path):
    """An SD 1.x folder as published (PNDM) is served without re-saving: the worker swaps in
    DDIM made from PNDM's config (no clipping, as PNDM never clips), says so, and core 1 equals
    ``pipe()`` with that same DDIM swapped in, bit for bit."""
    from diffusers import DDIMScheduler, PNDMScheduler

    family = next(f for f in FAMILIES if f.name == "stable-diffusion")
    pipe = family.build()
    pipe.scheduler = PNDMScheduler(**SD1_PNDM)
    folder = tiny.save_tiny(pipe, tmp_path / "tiny-sd-pndm")
    dtype = DTYPES[dtype_name]
    reference = load_pipe(folder, dtype)
    assert type(reference.scheduler).__name__ == "PNDMScheduler"
    reference.scheduler = DDIMScheduler.from_config(reference.scheduler.config, clip_sample=False)
    expected = pipeline_output(reference, family, 12, 3, "latent")
    adapter = load_adapter(str(folder), dtype=dtype)
    assert adapter.solver_note == "DDIMScheduler (first order of PNDMScheduler)"
    chords = RequestSpec(served_name(str(folder)), cores=4, steps=12, seed=3, params=family.params)
    core1 = next(h for h in local_hits(adapter, chords) if h.core == 1)
    assert torch.equal(core1.latent, expected), "CHORDS core 1 != pipe() with DDIM swapped in"


def test_a_scheduler_named_by_the_worker_replaces_the_folders(saved):
    """``--scheduler EulerDiscreteScheduler`` on a folder saved with DDIM: the worker makes it
    from the folder's scheduler config and says so; core 1 equals ``pipe()`` with the same
    swap, bit for bit."""
    from diffusers import EulerDiscreteScheduler

    family = next(f for f in FAMILIES if f.name == "stable-diffusion")
    folder = saved[family.name]
    adapter = load_adapter(str(folder), scheduler="EulerDiscreteScheduler")
    assert adapter.solver_note == (
        "EulerDiscreteScheduler, by --scheduler (the folder ships DDIMScheduler)"
    )
    reference = load_pipe(folder, torch.float32)
    reference.scheduler = EulerDiscreteScheduler.from_config(reference.scheduler.config)
    expected = pipeline_output(reference, family, 12, 3, "latent")
    chords = RequestSpec(served_name(str(folder)), cores=4, steps=12, seed=3, params=family.params)
    core1 = next(h for h in local_hits(adapter, chords) if h.core == 1)
    assert torch.equal(core1.latent, expected)
