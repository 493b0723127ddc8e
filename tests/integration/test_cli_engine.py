"""The engine's command-line tools, run as the user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chords_mq.apps.cluster import free_port
from chords_mq.request import RequestSpec
from tests.integration.conftest import local_hits

BIN = Path(sys.executable).parent


def chords(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "chords"), *args], capture_output=True, text=True, check=check, timeout=180
    )


@pytest.mark.parametrize("method", ["chords", "sequential"])
def test_generate_writes_each_hit_and_a_summary(clusters, tmp_path, method):
    out = tmp_path / "out"
    args = [
        "generate",
        "--broker",
        clusters[2].client_address,
        "--model",
        "synthetic",
        "--method",
        method,
        "--steps",
        "30",
        "--seed",
        "3",
        "--out",
        str(out),
    ]
    if method == "chords":
        args += ["--cores", "4"]
    chords(*args)
    summary = json.loads((out / "summary.json").read_text())
    spec = RequestSpec(
        model="synthetic", method=method, steps=30, seed=3, cores=4 if method == "chords" else None
    )
    expected = local_hits(spec)
    assert [(h["core"], h["round"]) for h in summary["hits"]] == [
        (h.core, h.round) for h in expected
    ]
    assert summary["steps"] == 30
    assert summary["init_sequence"] == (spec.resolved_init_sequence() or [0])
    assert all(set(h) == {"core", "round", "speedup", "elapsed_s"} for h in summary["hits"])
    files = sorted(p.name for p in out.glob("hit-core*.safetensors"))
    assert files == sorted(f"hit-core{h.core}.safetensors" for h in expected)
    for hit in expected:
        saved = load_file(str(out / f"hit-core{hit.core}.safetensors"))
        assert torch.equal(saved["latent"], hit.latent)


def test_status_lists_the_workers(clusters):
    report = json.loads(chords("status", "--broker", clusters[2].client_address, "--json").stdout)
    assert len(report["workers"]) == 2
    assert {w["model"] for w in report["workers"]} == {"synthetic"}
    text = chords("status", "--broker", clusters[2].client_address).stdout
    assert "workers: 2" in text


def test_generate_reports_a_missing_broker_clearly():
    nobody = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    result = chords("generate", "--broker", nobody, "--steps", "5", "--timeout", "1", check=False)
    assert result.returncode == 3  # ExitCode.UNREACHABLE
    assert f"cannot reach a broker at {nobody}" in result.stderr
    assert "refused" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_all_in_one_prints_a_hit_table(tmp_path):
    result = chords(
        "run", "--cores", "4", "--steps", "20", "--seed", "2", "--out", str(tmp_path / "run")
    )
    lines = result.stdout.splitlines()
    table = [line.split() for line in lines if line.strip() and line.split()[0].isdigit()]
    expected = local_hits(RequestSpec(model="synthetic", cores=4, steps=20, seed=2))
    assert [(int(r[0]), int(r[1])) for r in table] == [(h.core, h.round) for h in expected]
    assert "evaluations:" in result.stdout
    assert (tmp_path / "run" / "summary.json").exists()
