"""Folders re-saved with a multistep scheduler of the exponential-integrator kind (DPM-Solver++
"DPM++ 2M", with or without Karras sigmas, and UniPC without flow sigmas), made from the
published folder's scheduler config as diffusers' docs show (``pipe.scheduler =
DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)``), are served as they are: the
worker swaps in the scheduler's first-order form (``solver_order=1``; UniPC with no corrector)
and says so, and core 1 of CHORDS K=4 equals ``pipe()`` with that same swap, bit for bit
(in-process on the CPU: Stable Diffusion and Wan in float32, SDXL in bfloat16; and once through
a broker and two real worker processes, the solver crossing the wire). Wan's DPM-Solver++ runs
on flow sigmas ("dpm++", the official Wan sampler besides UniPC), and so does Flux's, made from
FLUX.1-dev's config (dynamic shifting, which Flux's ``mu`` needs).

``RESAVED`` describes each folder as ``tests/integration/test_published_schedulers.Published``
describes a published one, so ``benchmarks/device_numerics.py`` checks them on a GPU too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from chords_mq.request import RequestSpec
from chords_mq.workers.models import load_adapter, served_name
from tests import tiny_pipelines as tiny
from tests.integration.test_published_schedulers import FLUX_DEV
from tests.test_pipeline_adapters import (
    FAMILIES,
    SD1_PNDM,
    SDXL_EULER,
    load_pipe,
    local_hits,
    pipeline_output,
)

STEPS = 12


def first_order(name: str, **overrides: Any) -> Callable[[Any], None]:
    """``pipe()``'s reference: the scheduler ``name`` made from the folder's config with
    ``overrides`` (the first-order form the docs name)."""

    def swap(pipe: Any) -> None:
        import diffusers

        pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **overrides)

    return swap


@dataclass(frozen=True)
class Resaved:
    id: str
    family: str  # a name in test_pipeline_adapters.FAMILIES
    scheduler: str  # the class the folder was re-saved with
    config: dict[str, Any]  # made from this config (the published folder's)
    runs: str  # what the worker says it runs (its log and STATUS)
    reference: Callable[[Any], None]  # the first-order swap pipe() gets
    kind = "re-saved"  # as benchmarks/device_numerics.py labels its rows


DPM_RUNS = (
    "DPMSolverMultistepScheduler with solver_order=1 (first order of DPMSolverMultistepScheduler)"
)
UNIPC_RUNS = (
    "UniPCMultistepScheduler with solver_order=1 and no corrector (first order of "
    "UniPCMultistepScheduler)"
)
# SD 1.x's PNDM config as the loaded scheduler holds it (PNDM's timestep_spacing default is
# "leading", and from_config carries it over).
SD1 = {**SD1_PNDM, "timestep_spacing": "leading"}
# Wan2.1's UniPC config (flow sigmas, flow prediction, shift 3): DPM-Solver++ made from it is
# Wan's "dpm++" sampler.
WAN21_FLOW = {
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
}
# FLUX.1-dev's config (dynamic shifting) on flow sigmas: Flux's timestep set-up passes mu, which
# DPMSolverMultistepScheduler takes only with use_dynamic_shifting (and time_shift_type
# exponential, its default); without it the worker refuses the folder at load.
FLUX_FLOW = {**FLUX_DEV, "prediction_type": "flow_prediction", "use_flow_sigmas": True}
RESAVED = [
    Resaved("sd1-dpm++2m", "stable-diffusion", "DPMSolverMultistepScheduler", SD1, DPM_RUNS,
            first_order("DPMSolverMultistepScheduler", solver_order=1)),
    Resaved("sd1-dpm++2m-karras", "stable-diffusion", "DPMSolverMultistepScheduler",
            {**SD1, "use_karras_sigmas": True}, DPM_RUNS,
            first_order("DPMSolverMultistepScheduler", solver_order=1)),
    Resaved("sdxl-dpm++2m-karras", "stable-diffusion-xl", "DPMSolverMultistepScheduler",
            {**SDXL_EULER, "use_karras_sigmas": True}, DPM_RUNS,
            first_order("DPMSolverMultistepScheduler", solver_order=1)),
    Resaved("sd1-unipc", "stable-diffusion", "UniPCMultistepScheduler", SD1, UNIPC_RUNS,
            first_order("UniPCMultistepScheduler", solver_order=1,
                        disable_corrector=list(range(STEPS)))),
    Resaved("wan-dpm++-flow", "wan", "DPMSolverMultistepScheduler", WAN21_FLOW, DPM_RUNS,
            first_order("DPMSolverMultistepScheduler", solver_order=1)),
    Resaved("flux-dpm++-flow", "flux", "DPMSolverMultistepScheduler", FLUX_FLOW, DPM_RUNS,
            first_order("DPMSolverMultistepScheduler", solver_order=1)),
]  # fmt: skip


@pytest.mark.parametrize(
    "case, dtype_name",
    [
        (RESAVED[0], "float32"),
        (RESAVED[1], "float32"),
        (RESAVED[2], "bfloat16"),
        (RESAVED[3], "float32"),
        (RESAVED[4], "float32"),
        (RESAVED[5], "float32"),
    ],
    ids=lambda value: value.id if isinstance(value, Resaved) else value,
)
def test_a_multistep_folder_runs_its_first_order_form_bitwise(case, dtype_name, tmp_path):
    import diffusers

    family = next(f for f in FAMILIES if f.name == case.family)
    family = dataclasses.replace(family, reference=None)  # the case's swap, not Wan's Euler
    dtype = getattr(torch, dtype_name)
    pipe = family.build()
    pipe.scheduler = getattr(diffusers, case.scheduler).from_config(case.config)
    folder = tiny.save_tiny(pipe, tmp_path / f"tiny-{case.id}")
    reference = load_pipe(folder, dtype)
    assert reference.scheduler.config.solver_order == 2  # the folder ships the multistep one
    stock = pipeline_output(reference, family, STEPS, 3, "latent")
    case.reference(reference)
    expected = pipeline_output(reference, family, STEPS, 3, "latent")
    assert not torch.equal(stock, expected)  # the swap is what the comparison hinges on

    adapter = load_adapter(str(folder), dtype=dtype)
    assert adapter.solver_note == case.runs
    chords = RequestSpec(served_name(str(folder)), cores=4, steps=STEPS, seed=3,
                         params=family.params)  # fmt: skip
    core1 = next(h for h in local_hits(adapter, chords) if h.core == 1)
    assert torch.equal(core1.latent, expected), "CHORDS core 1 != pipe() with the swap"


def test_a_first_order_form_crosses_the_wire_to_real_workers(tmp_path):
    """The DPM-Solver++ first-order solver crosses the wire (PREPARED's solver spec) to a
    second real worker process: every hit of CHORDS K=4 equals the in-process run, and core 1
    equals ``pipe()`` with the swap."""
    import asyncio

    import diffusers

    from chords_mq.apps.cluster import LocalCluster
    from tests.test_pipeline_adapters import engine_hits

    case = RESAVED[1]  # DPM++ 2M Karras
    family = next(f for f in FAMILIES if f.name == case.family)
    pipe = family.build()
    pipe.scheduler = getattr(diffusers, case.scheduler).from_config(case.config)
    folder = tiny.save_tiny(pipe, tmp_path / f"tiny-{case.id}")
    model = served_name(str(folder))
    chords = RequestSpec(model=model, cores=4, steps=STEPS, seed=3, params=family.params)
    cluster = LocalCluster(workers=2, model=str(folder), log_dir=tmp_path / "logs").launch()
    try:  # the references are computed while the daemons start
        local = local_hits(load_adapter(str(folder)), chords)
        reference = load_pipe(folder, torch.float32)
        case.reference(reference)
        expected = pipeline_output(reference, family, STEPS, 3, "latent")
        cluster.wait_for_workers(2)
        hits = asyncio.run(engine_hits(cluster.client_address, model, chords))
    finally:
        cluster.stop()
    assert [(h.core, h.round) for h in hits] == [(h.core, h.round) for h in local]
    for got, want in zip(hits, local):
        assert torch.equal(got.latent, want.latent), f"core {got.core} != local simulate"
    assert torch.equal(next(h for h in hits if h.core == 1).latent, expected)


def test_the_models_doc_lists_each_resaved_folder_and_what_its_worker_runs():
    """docs/models.md's table of re-saved folders: for each case here, a row naming it (its
    test id), the scheduler it was re-saved with and, word for word, what its worker says."""
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "models.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    for case in RESAVED:
        assert any(
            f"(`{case.id}`" in row and f"`{case.scheduler}`" in row and f"`{case.runs}`" in row
            for row in rows
        ), case.id
