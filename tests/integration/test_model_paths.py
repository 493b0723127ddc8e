"""A worker started on a model it cannot load exits 2 with the reason in one ``Error:`` line
and no traceback: no such folder, a file, a folder without model_index.json, a pipeline class
no family serves, a hub id (with the hub reachable or not), a name no registry lists. Real
``chords-worker`` processes; one start per reason."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from chords_mq.apps.cluster import _script, free_port


def worker_error(*args: str, env: dict[str, str] | None = None) -> str:
    """The one ``Error:`` line of a worker that must refuse to start."""
    result = subprocess.run(
        [
            *_script("chords-worker"),
            "--broker",
            f"tcp://127.0.0.1:{free_port()}",  # never reached: the model is checked first
            "--device",
            "cpu",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    return errors[0].removeprefix("Error: ")


def bad_models(root: Path) -> dict[str, tuple[list[str], str]]:
    """reason -> (worker arguments, the start of the error line)."""
    (root / "empty").mkdir()
    (root / "weights.safetensors").write_bytes(b"")
    (root / "kandinsky").mkdir()
    (root / "kandinsky" / "model_index.json").write_text(
        json.dumps({"_class_name": "KandinskyPipeline"})
    )
    registry = root / "models.json"
    registry.write_text(json.dumps({"flux-dev": {"path": str(root / "empty")}}))
    return {
        "missing": (["--model", str(root / "no" / "such")], f"no such directory: {root}/no/such"),
        "file": (
            ["--model", str(root / "weights.safetensors")],
            f"{root}/weights.safetensors is a file, not a folder",
        ),
        "empty": (
            ["--model", str(root / "empty")],
            f"no model_index.json in {root}/empty: not a diffusers pipeline folder "
            "(save one with pipeline.save_pretrained(...))",
        ),
        "unserved": (
            ["--model", str(root / "kandinsky")],
            f"{root}/kandinsky: no adapter serves the pipeline class KandinskyPipeline",
        ),
        "hub": (
            ["--model", "black-forest-labs/FLUX.1-dev"],
            "no such directory: black-forest-labs/FLUX.1-dev; hub ids are not supported",
        ),
        "registry": (
            ["--model", "flux-devv", "--registry", str(registry)],
            f"unknown model 'flux-devv': not in the model registry {registry} (it lists flux-dev)",
        ),
    }


@pytest.mark.parametrize("reason", ["missing", "file", "empty", "unserved", "hub", "registry"])
def test_a_worker_says_why_its_model_does_not_load_in_one_line(reason, tmp_path):
    args, expected = bad_models(tmp_path)[reason]
    # the hub is not asked even where it may be: HF_HUB_OFFLINE=0 (and no network here)
    env = {"HF_HUB_OFFLINE": "0"} if reason == "hub" else None
    line = worker_error(*args, env=env)
    assert line.startswith(expected), line
    if reason == "unserved":
        assert "--family" in line and "flux (FluxPipeline)" in line, line
    if reason == "hub":
        assert "hf download black-forest-labs/FLUX.1-dev --local-dir DIR" in line, line


FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}  # DPM-Solver on flow sigmas
CUSTOM_SIGMAS = (
    "(ValueError: The current scheduler class <class 'diffusers.schedulers.scheduling_dpmsolver_"
    "multistep.DPMSolverMultistepScheduler'>'s `set_timesteps` does not support custom sigmas "
    "schedules."
)
FLOW_MATCH_SWITCH = (
    "FlowMatchEulerDiscreteScheduler: fix scheduler/scheduler_config.json, or switch with "
    "pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config), then "
    "pipe.save_pretrained(FOLDER)"
)


def scheduler_folders(root: Path) -> dict[str, tuple[Path, str]]:
    """reason -> (a tiny pipeline folder whose scheduler CHORDS cannot use, the start of the
    error line after the folder). Built from configs as published folders are saved: Stable
    Diffusion ones, and Flux and HunyuanVideo ones re-saved with a scheduler their pipeline's
    own timestep set-up cannot take (it passes custom sigmas, Flux also ``mu``)."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        KDPM2DiscreteScheduler,
    )

    from tests.tiny_pipelines import (
        build_tiny_flux,
        build_tiny_hunyuan_video,
        build_tiny_sd,
        save_tiny,
    )

    sd, flux, hunyuan = build_tiny_sd(), build_tiny_flux(), build_tiny_hunyuan_video()
    ddim = dict(sd.scheduler.config)
    swaps = {
        "unsupported": (sd, KDPM2DiscreteScheduler.from_config(ddim)),  # no solver yet
        "ancestral": (sd, EulerAncestralDiscreteScheduler.from_config(ddim)),
        "sde": (
            sd,
            DPMSolverMultistepScheduler.from_config(ddim, algorithm_type="sde-dpmsolver++"),
        ),
        "spacing": (sd, DDIMScheduler.from_config(ddim)),  # its config broken below
        "json": (sd, DDIMScheduler.from_config(ddim)),
        "flux-dpm": (flux, DPMSolverMultistepScheduler.from_config(flux.scheduler.config)),
        "flux-dpm-flow": (
            flux,
            DPMSolverMultistepScheduler.from_config(flux.scheduler.config, **FLOW),
        ),
        "hunyuan-dpm-flow": (
            hunyuan,
            DPMSolverMultistepScheduler.from_config(hunyuan.scheduler.config, **FLOW),
        ),
    }
    folders = {}
    for reason, (pipe, scheduler) in swaps.items():
        pipe.scheduler = scheduler
        folders[reason] = save_tiny(pipe, root / reason)
    config = folders["spacing"] / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "timestep_spacing": "odd"}))
    (folders["json"] / "scheduler" / "scheduler_config.json").write_text("{not json")
    expected = {
        "unsupported": "no CHORDS solver for KDPM2DiscreteScheduler yet (supported: DDIMScheduler",
        "ancestral": "EulerAncestralDiscreteScheduler is stochastic (it adds new noise at every "
        "step), which CHORDS cannot sample in parallel; use the deterministic "
        "EulerDiscreteScheduler",
        "sde": "DPMSolverMultistepScheduler with algorithm_type=sde-dpmsolver++ is stochastic, "
        "which CHORDS cannot sample in parallel; use algorithm_type=dpmsolver++",
        "spacing": "its DDIMScheduler cannot run the stable-diffusion pipeline's timestep set-up "
        "(ValueError: odd is not supported",
        "json": "the StableDiffusionPipeline does not load: It looks like the config file at",
        "flux-dpm": "its DPMSolverMultistepScheduler cannot run the flux pipeline's timestep "
        f"set-up {CUSTOM_SIGMAS}",
        # diffusers' bare `assert` (Flux passes mu; no dynamic shifting configured)
        "flux-dpm-flow": "its DPMSolverMultistepScheduler cannot run the flux pipeline's timestep "
        "set-up (AssertionError: assert self.config.use_dynamic_shifting and "
        'self.config.time_shift_type == "exponential" failed in set_timesteps() of '
        "scheduling_dpmsolver_multistep.py); the published flux folders ship "
        f"{FLOW_MATCH_SWITCH}",
        "hunyuan-dpm-flow": "its DPMSolverMultistepScheduler cannot run the hunyuan-video "
        f"pipeline's timestep set-up {CUSTOM_SIGMAS}",
    }
    return {reason: (folders[reason], expected[reason]) for reason in swaps}


@pytest.fixture(scope="module")
def bad_schedulers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    return scheduler_folders(tmp_path_factory.mktemp("schedulers"))


# A worker process per kind of reason (stochastic, broken configuration, unreadable config, a
# scheduler the family's timestep set-up cannot take); the other reasons take the same path and
# are checked in-process (each start costs seconds).
@pytest.mark.parametrize(
    "reason, process",
    [
        ("ancestral", True),
        ("spacing", True),
        ("json", True),
        ("flux-dpm", True),
        ("unsupported", False),
        ("sde", False),
        ("flux-dpm", False),
        ("flux-dpm-flow", False),
        ("hunyuan-dpm-flow", False),
    ],
)
def test_a_scheduler_chords_cannot_use_is_refused_at_start_in_one_line(
    reason, process, bad_schedulers
):
    """A stochastic scheduler names its deterministic alternative, an unsupported one names
    what is supported and how to switch, a broken configuration or one the family's own
    timestep set-up cannot take (checked at load by running that set-up for a default request)
    says what failed and what to do: each as exit 2 and one line naming the folder, before any
    request."""
    from chords_mq.errors import SchedulerError
    from chords_mq.workers.models import load_adapter

    folder, expected = bad_schedulers[reason]
    if process:
        line = worker_error("--model", str(folder))
    else:
        with pytest.raises(SchedulerError) as refused:  # what the worker turns into exit 2
            load_adapter(str(folder))
        line = str(refused.value)
        assert "\n" not in line
    assert line.startswith(f"{folder}: {expected}"), line
    if reason == "unsupported":
        assert "DDIMScheduler.from_config(pipe.scheduler.config)" in line, line
    if reason == "spacing":
        assert line.endswith(
            "the published stable-diffusion folders ship PNDMScheduler (1.x) or "
            "EulerDiscreteScheduler (2.x): fix scheduler/scheduler_config.json, or switch with "
            "pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config), then "
            "pipe.save_pretrained(FOLDER)"
        ), line
    family = {"flux-dpm": "flux", "hunyuan-dpm-flow": "hunyuan-video"}.get(reason)
    if family is not None:
        assert line.endswith(f"; the published {family} folders ship {FLOW_MATCH_SWITCH}"), line
    if reason == "json":
        assert "scheduler/scheduler_config.json" in line and "save_pretrained" in line, line


def test_a_scheduler_the_worker_cannot_make_is_refused_in_one_line(bad_schedulers):
    folder, _ = bad_schedulers["ancestral"]
    line = worker_error("--model", str(folder), "--scheduler", "NoSuchScheduler")
    assert line == (
        f"{folder}: --scheduler NoSuchScheduler: not a diffusers scheduler class (for example "
        "DDIMScheduler, EulerDiscreteScheduler)"
    ), line
    from chords_mq.workers.models import load_adapter

    with pytest.raises(ValueError) as refused:
        load_adapter("synthetic", scheduler="DDIMScheduler")
    assert str(refused.value) == (
        "--scheduler applies to diffusers pipeline folders, not to synthetic"
    )
