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
