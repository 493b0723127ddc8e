"""Daemon logs carry no third-party noise below ``--log-level DEBUG``: no tqdm bars (diffusers'
"Loading pipeline components...", transformers' "Loading weights"), no transformers warning
("`CLIPImageProcessor` requires torchvision ..."), no foreign Python warnings; at DEBUG they all
show. A real ``chords-worker`` loads a tiny Stable Diffusion folder and registers with a real
broker, then is stopped by SIGTERM.

The torchvision warning comes from importing diffusers' pipeline classes where torchvision is
not installed (StableDiffusionPipeline's module imports transformers' CLIPImageProcessor), not
from a component of the folder: the tiny folder has no feature extractor.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from chords_mq.apps.cluster import LocalCluster, _script
from chords_mq.logs import QUIET_ENVIRONMENT

BARS = ("%|", "it/s]", "Loading pipeline components", "Loading weights")
TORCHVISION_MISSING = importlib.util.find_spec("torchvision") is None


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests import tiny_pipelines as tiny

    return tiny.save_tiny(tiny.build_tiny_sd(), tmp_path_factory.mktemp("quiet") / "tiny-sd")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[LocalCluster]:
    cluster = LocalCluster(workers=0, log_dir=tmp_path / "logs")
    cluster.start_broker()
    yield cluster
    cluster.stop()


def worker_stderr(cluster: LocalCluster, folder: Path, log: Path, *args: str) -> str:
    """Everything a worker on ``folder`` writes to stderr from its start, through loading the
    model and registering, to its stop by SIGTERM."""
    # as an operator's shell has it: none of the variables the worker sets itself
    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENVIRONMENT}
    command = [
        *_script("chords-worker"),
        *("--broker", cluster.worker_address, "--model", str(folder), "--device", "cpu"),
        *("--threads", "1", *args),
    ]
    with open(log, "wb") as stderr:
        worker = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        try:
            cluster.wait_for_workers(1, timeout=240)  # the model is loaded
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
    return log.read_text(errors="replace")


def test_no_bars_or_library_warnings_below_debug(tiny_sd, broker, tmp_path):
    text = worker_stderr(broker, tiny_sd, tmp_path / "worker.log", "--log-format", "json")
    lines = [line for line in text.replace("\r", "\n").splitlines() if line.strip()]
    assert lines, "the worker logged nothing"
    for line in lines:
        assert not any(bar in line for bar in BARS), text
        assert "torchvision" not in line and "[transformers]" not in line, text
        entry = json.loads(line)  # every line is one JSON object: nothing else reached stderr
        assert entry["daemon"] == "chords-worker"
    assert any(json.loads(line)["message"].startswith("registered") for line in lines), text


def test_at_debug_they_show(tiny_sd, broker, tmp_path):
    text = worker_stderr(broker, tiny_sd, tmp_path / "worker.log", "--log-level", "DEBUG")
    assert "Loading pipeline components" in text and "%|" in text, text
    if TORCHVISION_MISSING:
        warning = [line for line in text.splitlines() if "requires torchvision" in line]
        assert warning, text
        # through the daemon's handler and format, not transformers' own "[transformers] ..."
        assert all(" chords-worker WARNING " in line for line in warning), warning


WARN = """
import sys, warnings
from chords_mq.errors import DuplicateCoreWarning
from chords_mq.logs import setup_logging
setup_logging("chords-test", sys.argv[1])
warnings.warn("foreign noise", UserWarning)
warnings.warn("a core repeats", DuplicateCoreWarning)
"""


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_python_warnings_are_log_lines_and_foreign_ones_show_at_debug(level):
    result = subprocess.run(
        [sys.executable, "-c", WARN, level], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    own = [line for line in lines if "DuplicateCoreWarning: a core repeats" in line]
    foreign = [line for line in lines if "UserWarning: foreign noise" in line]
    assert len(own) == 1 and " chords-test WARNING " in own[0], result.stderr
    assert len(foreign) == (1 if level == "DEBUG" else 0), result.stderr
    assert len(lines) == len(own) + len(foreign), result.stderr  # one line each
