"""Folders as published: each family's tiny pipeline saved with the scheduler config its
published folder ships, served by a real worker process with no re-saving.

For each, core 1 of CHORDS K=4 through a real broker equals ``pipe()`` bit for bit, in float32
on the CPU at torch's default thread count (the worker left at its default, the reference run
at the default in this process), with the scheduler ``docs/models.md`` names: the shipped one,
or its first-order member swapped in. STATUS says what each worker runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from chords_mq.apps.cluster import LocalCluster
from chords_mq.client import AsyncClient
from chords_mq.workers.models import served_name
from tests import tiny_pipelines as tiny
from tests.conftest import default_threads
from tests.test_pipeline_adapters import FAMILIES, euler_on_the_same_sigmas, load_pipe

# The scheduler_config.json of the published folders (their keys as saved; the tiny pipelines
# are built from configs, and each is given its family's published scheduler).
BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
SD1_PNDM = {  # runwayml/stable-diffusion-v1-5
    **BETAS,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SD2_EULER = {  # stabilityai/stable-diffusion-2-1 (768, v-prediction)
    **BETAS,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "interpolation_type": "linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
    "trained_betas": None,
}
SDXL_EULER = {**SD2_EULER, "prediction_type": "epsilon"}  # stable-diffusion-xl-base-1.0
FLUX_DEV = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "base_shift": 0.5,
    "max_shift": 1.15,
}
SD35 = {"num_train_timesteps": 1000, "shift": 3.0}
HUNYUAN = {"num_train_timesteps": 1000, "shift": 7.0}
WAN21_UNIPC = {  # Wan-AI/Wan2.1-T2V-1.3B-Diffusers
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "solver_order": 2,
    "prediction_type": "flow_prediction",
    "predict_x0": True,
    "solver_type": "bh2",
    "lower_order_final": True,
    "disable_corrector": [],
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
    "timestep_spacing": "linspace",
    "final_sigmas_type": "zero",
}
COGVIDEOX5B_DPM = {  # THUDM/CogVideoX-5b
    **BETAS,
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "set_alpha_to_one": True,
    "snr_shift_scale": 1.0,
    "steps_offset": 0,
    "timestep_spacing": "trailing",
}


def _swap(name: str, **overrides: Any) -> Callable[[Any], None]:
    def swap(pipe: Any) -> None:
        import diffusers

        pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **overrides)

    return swap


@dataclass(frozen=True)
class Published:
    id: str
    family: str  # a name in test_pipeline_adapters.FAMILIES
    scheduler: str  # the class the published folder ships
    config: dict[str, Any]
    runs: str  # what the worker says it runs (its log and STATUS)
    reference: Callable[[Any], None] | None = None  # the swap docs/models.md names


FOLDERS = [
    Published("sd1-pndm", "stable-diffusion", "PNDMScheduler", SD1_PNDM,
              "DDIMScheduler (first order of PNDMScheduler)",
              _swap("DDIMScheduler", clip_sample=False)),
    Published("sd2-euler", "stable-diffusion", "EulerDiscreteScheduler", SD2_EULER,
              "EulerDiscreteScheduler"),
    Published("sdxl-euler", "stable-diffusion-xl", "EulerDiscreteScheduler", SDXL_EULER,
              "EulerDiscreteScheduler"),
    Published("flux", "flux", "FlowMatchEulerDiscreteScheduler", FLUX_DEV,
              "FlowMatchEulerDiscreteScheduler"),
    Published("sd35", "sd3", "FlowMatchEulerDiscreteScheduler", SD35,
              "FlowMatchEulerDiscreteScheduler"),
    Published("hunyuan", "hunyuan-video", "FlowMatchEulerDiscreteScheduler", HUNYUAN,
              "FlowMatchEulerDiscreteScheduler"),
    Published("wan21-unipc", "wan", "UniPCMultistepScheduler", WAN21_UNIPC,
              "FlowMatchEulerDiscreteScheduler on its sigmas (first order of "
              "UniPCMultistepScheduler)", euler_on_the_same_sigmas),
    Published("cogvideox5b-dpm", "cogvideox", "CogVideoXDPMScheduler", COGVIDEOX5B_DPM,
              "CogVideoXDDIMScheduler (first order of CogVideoXDPMScheduler)",
              _swap("CogVideoXDDIMScheduler")),
]  # fmt: skip
STEPS, SEED = 12, 3


def family_of(case: Published) -> Any:
    return next(f for f in FAMILIES if f.name == case.family)


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, dict]]:
    """One broker and one worker per published folder (a lone request gets its full K even
    with one worker), each at torch's default thread count; then STATUS."""
    import diffusers

    root = tmp_path_factory.mktemp("published")
    folders = {}
    for case in FOLDERS:
        pipe = family_of(case).build()
        pipe.scheduler = getattr(diffusers, case.scheduler).from_config(case.config)
        folders[case.id] = tiny.save_tiny(pipe, root / f"pub-{case.id}")
    cluster = LocalCluster(workers=0, log_dir=root / "logs", threads=None)
    cluster.start_broker()
    try:
        for case in FOLDERS:
            cluster.start_worker(extra_args=["--model", str(folders[case.id])])
        status = cluster.wait_for_workers(len(FOLDERS), timeout=180)
        yield cluster, {"folders": folders, "status": status}
    finally:
        cluster.stop()


async def core1(address: str, model: str, params: dict[str, Any]) -> Any:
    async with AsyncClient(address) as client:
        stream = client.generate(model, cores=4, steps=STEPS, seed=SEED, params=params, timeout=300)
        hits = [hit async for hit in stream]
    assert sorted(h.core for h in hits) == [0, 1, 2, 3, 4]
    return next(h for h in hits if h.core == 1)


@pytest.mark.parametrize("case", FOLDERS, ids=lambda c: c.id)
def test_a_published_folder_is_served_and_core1_equals_pipe(published, case):
    cluster, state = published
    folder = state["folders"][case.id]
    model = served_name(str(folder))
    (worker,) = [w for w in state["status"]["workers"] if w["model"] == model]
    assert worker["solver"] == case.runs
    family = family_of(case)
    reference = load_pipe(folder, torch.float32)
    assert type(reference.scheduler).__name__ == case.scheduler  # no re-saving
    if case.reference is not None:
        case.reference(reference)
    with default_threads(), torch.no_grad():
        expected = reference(
            "a photo of a cat",
            num_inference_steps=STEPS,
            output_type="latent",
            generator=torch.Generator().manual_seed(SEED),
            **family.call_kwargs,
        )[0]
    hit = asyncio.run(core1(cluster.client_address, model, family.params))
    assert hit.latent.dtype == torch.float32
    assert torch.equal(hit.latent, expected), f"{case.id}: core 1 != pipe() ({case.runs})"


def test_chords_status_says_what_each_worker_runs(published):
    import subprocess
    import sys

    cluster, _ = published
    chords = Path(sys.executable).parent / "chords"
    text = subprocess.run(
        [str(chords), "status", "--broker", cluster.client_address],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    for case in FOLDERS:
        (line,) = [line for line in text.splitlines() if f"pub-{case.id} " in line]
        assert line.endswith(f"solver: {case.runs}"), line


def test_the_docs_table_says_what_this_test_runs():
    """docs/models.md's table of published schedulers: for each folder here, a row with the
    scheduler it ships and, word for word, what its worker says it runs."""
    text = (Path(__file__).parents[2] / "docs" / "models.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    for case in FOLDERS:
        assert any(f"`{case.scheduler}`" in row and f"`{case.runs}`" in row for row in rows), (
            case.id
        )
