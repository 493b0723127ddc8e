"""Folders that ship a multistep scheduler of the exponential-integrator kind (DPM-Solver++
"DPM++ 2M", with or without Karras sigmas, and UniPC without flow sigmas) are served without
re-saving: the worker swaps in the scheduler's first-order form (``solver_order=1``; UniPC with
no corrector), says so, and core 1 of CHORDS K=4 equals ``pipe()`` with that same swap, bit for
bit (in-process on the CPU: Stable Diffusion in float32, SDXL in bfloat16)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from chords_mq.request import RequestSpec
from chords_mq.workers.models import load_adapter, served_name
from tests import tiny_pipelines as tiny
from tests.test_pipeline_adapters import FAMILIES, load_pipe, local_hits, pipeline_output

STEPS = 12


def dpm_solver(config: Any, **overrides: Any) -> Any:
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler.from_config(config, **overrides)


def unipc(config: Any, **overrides: Any) -> Any:
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler.from_config(config, **overrides)


# (how the user re-saved the folder's DDIM config, the first-order swap pipe() gets, the note)
CASES = {
    "dpm++2m": (
        dpm_solver,
        {},
        {"solver_order": 1},
        "DPMSolverMultistepScheduler with solver_order=1 (first order of "
        "DPMSolverMultistepScheduler)",
    ),
    "dpm++2m-karras": (
        dpm_solver,
        {"use_karras_sigmas": True},
        {"solver_order": 1},
        "DPMSolverMultistepScheduler with solver_order=1 (first order of "
        "DPMSolverMultistepScheduler)",
    ),
    "unipc": (
        unipc,
        {},
        {"solver_order": 1, "disable_corrector": list(range(STEPS))},
        "UniPCMultistepScheduler with solver_order=1 and no corrector (first order of "
        "UniPCMultistepScheduler)",
    ),
}


@pytest.mark.parametrize(
    "case, name, dtype_name",
    [
        ("dpm++2m", "stable-diffusion", "float32"),
        ("dpm++2m-karras", "stable-diffusion", "float32"),
        ("dpm++2m-karras", "stable-diffusion-xl", "bfloat16"),
        ("unipc", "stable-diffusion", "float32"),
    ],
)
def test_a_multistep_folder_runs_its_first_order_form_bitwise(case, name, dtype_name, tmp_path):
    make, saved_as, first_order, note = CASES[case]
    dtype = getattr(torch, dtype_name)
    family = next(f for f in FAMILIES if f.name == name)
    pipe = family.build()
    pipe.scheduler = make(pipe.scheduler.config, **saved_as)  # as a user re-saves "DPM++ 2M"
    folder = tiny.save_tiny(pipe, tmp_path / f"tiny-{name}-{case}")
    reference = load_pipe(folder, dtype)
    shipped = reference.scheduler
    assert shipped.config.solver_order == 2  # the folder ships the multistep scheduler
    stock = pipeline_output(reference, family, STEPS, 3, "latent")
    reference.scheduler = make(shipped.config, **first_order)
    expected = pipeline_output(reference, family, STEPS, 3, "latent")
    assert not torch.equal(stock, expected)  # the swap is what the comparison hinges on

    adapter = load_adapter(str(folder), dtype=dtype)
    assert adapter.solver_note == note
    chords = RequestSpec(served_name(str(folder)), cores=4, steps=STEPS, seed=3,
                         params=family.params)  # fmt: skip
    core1 = next(h for h in local_hits(adapter, chords) if h.core == 1)
    assert torch.equal(core1.latent, expected), "CHORDS core 1 != pipe() with the swap"
