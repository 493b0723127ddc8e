"""`chords plan` and the console scripts, end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from chords_mq.apps.cli import main

BIN = Path(sys.executable).parent


def run_cli(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_plan_k8_prints_the_hit_rounds():
    result = subprocess.run(
        [str(BIN / "chords"), "plan", "--steps", "50", "--cores", "8"],
        capture_output=True,
        text=True,
        check=True,
    )
    out = result.stdout
    assert "init sequence: [0, 2, 4, 8, 16, 24, 32, 40]" in out
    hits = [
        line.split()
        for line in out.splitlines()
        if line.startswith("   ") and line.split()[0].isdigit() and "x" in line
    ]
    assert [(int(h[0]), int(h[1])) for h in hits] == [
        (0, 8),
        (8, 17),
        (7, 24),
        (6, 31),
        (5, 38),
        (4, 45),
        (3, 48),
        (2, 49),
        (1, 50),
    ]
    assert "2.941x" in out
    assert "evaluations: 274" in out
    round17 = next(line for line in out.splitlines() if line.strip().startswith("17 "))
    assert round17.split("|")[1].split() == ["16", "17*", "18", "21", "28", "35", "42", "49"]


def test_plan_json_has_the_same_content():
    report = json.loads(run_cli("plan", "--steps", "50", "--cores", "4", "--json").output)
    assert report["init_sequence"] == [0, 8, 16, 32]
    assert [(h["core"], h["round"]) for h in report["hits"]] == [
        (0, 4),
        (4, 21),
        (3, 36),
        (2, 43),
        (1, 50),
    ]
    assert report["hits"][1]["speedup"] == 2.381
    assert report["evaluations"] == 144
    assert report["rounds"][2] == [[2, 1], [9, 2], [16, 3]]
    assert len(report["rounds"]) == 50


def test_plan_with_explicit_init_and_core_index_stop():
    report = json.loads(
        run_cli(
            "plan",
            "--steps",
            "50",
            "--init",
            "0,2,4,8,16,24,32,40",
            "--stop",
            "core-index:2",
            "--json",
        ).output
    )
    assert (report["returned"]["core"], report["returned"]["round"]) == (7, 24)
    assert [h["core"] for h in report["hits"]] == [0, 8, 7]
    assert report["stop"] == "core-index:2"


def test_plan_with_residual_stop_runs_on_the_toy():
    report = json.loads(run_cli("plan", "--cores", "8", "--stop", "residual:1e-2", "--json").output)
    assert report["stop"] == "residual:0.01"
    assert report["returned"]["round"] in {h["round"] for h in report["hits"]}
    assert report["returned"]["core"] != 0


def test_plan_speedup_option_uses_the_rule():
    report = json.loads(run_cli("plan", "--cores", "8", "--speedup", "8", "--json").output)
    assert report["init_sequence"] == [0, 6, 12, 18, 24, 30, 36, 42]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--init", "0,16,8"], "strictly increasing"),
        (["--init", "0,a"], "comma-separated"),
        (["--init", "0,8", "--cores", "3"], "--init has 2 entries"),
        (["--steps", "0"], "0"),
        (["--stop", "fastest"], "bad stop rule"),
        (["--stop", "residual:-1"], "must be > 0"),
        (["--cores", "9", "--steps", "8"], "at least 9 steps"),
    ],
)
def test_plan_bad_input_is_a_usage_error(args, message):
    result = CliRunner().invoke(main, ["plan", *args])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_plan_warns_on_gap_one_cores():
    result = CliRunner().invoke(main, ["plan", "--steps", "25", "--cores", "8"])
    assert result.exit_code == 0
    assert "warning:" in result.stderr and "adds no speed" in result.stderr


@pytest.mark.parametrize("script", ["chords", "chords-broker", "chords-worker", "chords-gateway"])
def test_console_scripts_answer_help(script):
    result = subprocess.run(
        [str(BIN / script), "--help"], capture_output=True, text=True, check=True
    )
    assert "Usage:" in result.stdout


def test_plan_plot_draws_the_schedule(tmp_path):
    from PIL import Image

    path = tmp_path / "plan.png"
    result = CliRunner().invoke(
        main, ["plan", "--steps", "50", "--cores", "8", "--plot", str(path)]
    )
    assert result.exit_code == 0
    image = Image.open(path)
    assert image.size[0] > 500 and image.size[1] > 500
    colours = {colour for _, colour in image.convert("RGB").getcolors(maxcolors=1 << 16)}
    assert len(colours) > 8, "one colour per core, plus axes and text"


def test_keygen_writes_zeromq_certificates_and_refuses_to_overwrite(tmp_path):
    import zmq.auth

    result = run_cli("keygen", str(tmp_path / "keys"), "gpu-1")
    assert result.exit_code == 0, result.output
    public, secret = tmp_path / "keys" / "gpu-1.key", tmp_path / "keys" / "gpu-1.key_secret"
    assert (secret.stat().st_mode & 0o777) == 0o600
    public_key, no_secret = zmq.auth.load_certificate(public)
    same_public, secret_key = zmq.auth.load_certificate(secret)
    assert no_secret is None and secret_key is not None and public_key == same_public
    again = CliRunner().invoke(main, ["keygen", str(tmp_path / "keys"), "gpu-1"])
    assert again.exit_code == 2 and "exists" in again.output
    bad = CliRunner().invoke(main, ["keygen", str(tmp_path / "keys"), "../x"])
    assert bad.exit_code == 2 and "not a usable key name" in bad.output


def test_curve_options_come_in_pairs(tmp_path):
    run_cli("keygen", str(tmp_path), "me")
    half = CliRunner().invoke(main, ["status", "--curve-secret", str(tmp_path / "me.key_secret")])
    assert half.exit_code == 2 and "--broker-key" in half.output
    public = CliRunner().invoke(
        main,
        [
            "status",
            "--curve-secret",
            str(tmp_path / "me.key"),
            "--broker-key",
            str(tmp_path / "me.key"),
        ],
    )
    assert public.exit_code == 2 and "holds no secret key" in public.output
    worker = subprocess.run(
        [str(BIN / "chords-worker"), "--broker-key", str(tmp_path / "me.key")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert worker.returncode == 2 and "--curve-secret" in worker.stderr


def test_the_broker_refuses_a_missing_curve_folder(tmp_path):
    result = subprocess.run(
        [str(BIN / "chords-broker"), "--curve", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "not a folder" in result.stderr


@pytest.mark.parametrize(("cpus", "overlap"), [(2, False), (5, False), (6, True), (16, True)])
def test_chords_run_overlaps_start_up_only_with_a_cpu_for_each_daemon(monkeypatch, cpus, overlap):
    """4 workers and a broker next to the in-process reference: only with a CPU for each of
    them (on 2 vCPUs the overlap measured slower than starting the daemons afterwards)."""
    from chords_mq.apps import runner

    monkeypatch.delenv("CHORDS_OVERLAP_START", raising=False)
    monkeypatch.setattr(runner.os, "sched_getaffinity", lambda pid: set(range(cpus)))
    assert runner.overlap_start(4) is overlap
    monkeypatch.setenv("CHORDS_OVERLAP_START", "0" if overlap else "1")
    assert runner.overlap_start(4) is not overlap


def test_free_ports_come_from_below_the_ephemeral_range():
    """A daemon's port is picked where no outgoing connection takes its local port from (the
    kernel's ephemeral range), and it is free to bind."""
    import socket

    from chords_mq.apps.cluster import _ephemeral_low, free_port

    low = _ephemeral_low()
    ports = {free_port() for _ in range(20)}
    if low > 2048:  # Linux: the range is readable
        assert all(1024 <= port < low for port in ports)
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_chords_generate_says_when_its_request_starts_and_stops_waiting_for_a_worker(capsys):
    from chords_mq.apps.streaming import HitLines

    lines = HitLines()
    waiting = {"for": "worker", "model": "flux", "since_s": 0.0, "fails_in_s": 30.0}
    lines.progress({"evaluations": 3, "hits": 0, "cores": []})
    lines.progress({"evaluations": 3, "hits": 0, "cores": [], "waiting": waiting})
    lines.progress({"evaluations": 3, "hits": 0, "cores": [], "waiting": waiting})
    lines.progress({"evaluations": 4, "hits": 0, "cores": []})
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "waiting for a worker: none serves model 'flux' now; the request fails in 30s unless "
        "one registers",
        "a worker is back: the request goes on",
    ]
