"""`chords run`, the README's main job: the demo model end to end, and a clean Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from chords_mq.request import RequestSpec
from chords_mq.workers.models.digits import DigitsAdapter

BIN = Path(sys.executable).parent


def test_chords_run_on_the_demo_model(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [
            str(BIN / "chords"),
            "run",
            "--cores",
            "4",
            "--steps",
            "30",
            "--prompt",
            "a 3",
            "--seed",
            "5",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    summary = json.loads((out / "summary.json").read_text())
    assert [h["core"] for h in summary["hits"]] == [0, 4, 3, 2, 1]
    assert summary["hits"][-1]["rmse_vs_sequential"] == 0.0
    spec = RequestSpec(
        model="digits", method="sequential", steps=30, seed=5, params={"prompt": "a 3"}
    )
    sequential = DigitsAdapter().sample_sequential(spec)
    core1 = load_file(str(out / "hit-core1.safetensors"))["latent"]
    assert torch.equal(core1, sequential), "core 1 must be the sequential sample bit for bit"
    for hit in summary["hits"]:
        assert Image.open(out / f"hit-core{hit['core']}.png").size == (64, 64)
    grid = Image.open(out / "hits.png")
    assert grid.size[0] > 5 * 64
    assert "RMSE vs sequential" in result.stdout


def children_of(pid: int) -> list[int]:
    listing = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True
    ).stdout
    return [int(p) for p in listing.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = subprocess.run(
        ["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True
    ).stdout.strip()
    return bool(state) and not state.startswith("Z")


def interruptible() -> None:
    """In the child: SIGINT as a terminal's Ctrl-C finds it. A shell starts a background job
    with SIGINT ignored and every process under it inherits that (CI launched in the
    background: ``chords run`` then rightly ignored the test's SIGINT and ran on)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_run(tmp_path: Path) -> tuple[subprocess.Popen[str], list[int]]:
    """``chords run`` on a slow synthetic model, once its broker and two workers are up."""
    run = subprocess.Popen(
        [
            str(BIN / "chords"),
            "run",
            "--model",
            "synthetic",
            "--latency-ms",
            "200",
            "--steps",
            "400",
            "--cores",
            "2",
            "--out",
            str(tmp_path / "run"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=interruptible,
    )
    assert run.stdout is not None and run.stderr is not None
    line = run.stdout.readline()  # printed once the broker and workers are up
    assert "chords on synthetic" in line, line + run.stderr.read()
    daemons = children_of(run.pid)
    assert len(daemons) == 3, "a broker and two workers"
    time.sleep(0.5)
    return run, daemons


def assert_gone_within_10s(daemons: list[int]) -> None:
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in daemons) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in daemons if alive(pid)]


@pytest.mark.parametrize(
    ("sig", "code", "said"),
    [
        (signal.SIGINT, 130, "interrupted"),
        (signal.SIGTERM, 143, "SIGTERM"),
        (signal.SIGHUP, 129, "SIGHUP"),
    ],
)
def test_a_signal_stops_chords_run_and_its_daemons_cleanly(tmp_path, sig, code, said):
    run, daemons = start_run(tmp_path)
    run.send_signal(sig)
    assert run.wait(timeout=30) == code
    assert said in run.stderr.read()
    assert_gone_within_10s(daemons)


def test_sigkill_of_chords_run_leaves_no_daemons_behind(tmp_path):
    """SIGKILL runs no handler: the daemons get SIGTERM from the kernel when their parent
    dies (a parent-death signal) and stop."""
    run, daemons = start_run(tmp_path)
    run.kill()
    run.wait(timeout=10)
    assert_gone_within_10s(daemons)
