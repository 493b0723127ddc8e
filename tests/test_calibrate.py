"""``chords-calibrate``: one evaluation's distance between two CPU kernel settings for a tiny
real diffusers pipeline, the tolerance it suggests (an honest pair agrees under it, a result
x1.001 does not), and ``chords-broker --verify-tolerance @FILE`` reading what it wrote."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from chords_mq.algorithms.distance import distance
from chords_mq.apps.calibrate import CalibrationError, applied, main, parse_side
from chords_mq.broker.config import BrokerConfig
from chords_mq.broker.core import BrokerCore
from chords_mq.broker.tolerance import (
    MAX_CALIBRATION_BYTES,
    InvalidCalibrationFile,
    InvalidTolerance,
    Tolerances,
    calibration_entries,
    expand_files,
    read_calibration,
)
from chords_mq.request import RequestSpec
from chords_mq.workers.models import load_model
from chords_mq.workers.models.base import evaluate
from tests import tiny_pipelines as tiny

PARAMS = {"prompt": "a red cube", "height": 32, "width": 32, "guidance_scale": 5.0}


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """tiny-sd calibrated in float32 on cpu against cpu:threads=1 (4 steps): the JSON file."""
    root = tmp_path_factory.mktemp("calibrate")
    folder = tiny.save_tiny(tiny.build_tiny_sd(), root / "tiny-sd")
    out = root / "tiny-sd.json"
    args = ["--model", str(folder), "--against", "cpu:threads=1", "--steps", "4"]
    args += [arg for key, value in PARAMS.items() for arg in ("-p", f"{key}={value}")]
    ran = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert ran.exit_code == 0, ran.output
    return folder, out, ran.output


def test_the_calibration_suggests_a_tolerance_an_honest_pair_passes_and_x1001_fails(calibrated):
    folder, out, output = calibrated
    data = json.loads(out.read_text())
    measured = data["dtypes"]["float32"]
    assert measured["evaluations"] == 4
    pairs = [(a, b) for a, b, _fault in measured["per_evaluation"]]
    assert all(math.isfinite(v) and v >= 0 for pair in pairs for v in pair)
    rel = data["tolerances"]["float32"]
    assert f"--verify-tolerance tiny-sd:float32={rel!r}" in output
    assert rel >= 10 * max(max(pair) for pair in pairs) and rel >= 4 * 2**-23
    tolerances = Tolerances.parse(read_calibration(out))
    assert tolerances.of("tiny-sd", "float32") == rel
    assert all(tolerances.agree("tiny-sd", "float32", *pair) for pair in pairs)
    # Again, outside the command: one honest evaluation on each side, and a result x1.001.
    _entry, adapter = load_model(str(folder), "cpu", dtype="float32")
    request = RequestSpec(model="tiny-sd", method="sequential", steps=4, params=PARAMS)
    prepared = adapter.prepare(request)

    def step() -> torch.Tensor:
        run = evaluate(adapter, prepared.context, prepared.solver, [prepared.x0], [0], [(1,)])
        return run[0][1]

    reference = step()
    with applied(parse_side("cpu:threads=1")):
        other = step()
    assert tolerances.agree("tiny-sd", "float32", *distance(reference, other))
    scaled = reference * torch.tensor(1.001, dtype=reference.dtype)
    assert not tolerances.agree("tiny-sd", "float32", *distance(reference, scaled))


def test_the_broker_takes_the_file(calibrated):
    _folder, out, _output = calibrated
    rel = json.loads(out.read_text())["tolerances"]["float32"]
    text = expand_files(f"bfloat16=0.02, @{out}")
    assert text == f"bfloat16=0.02,tiny-sd:float32={rel!r}"
    core = BrokerCore(BrokerConfig(verify_tolerance=text))
    assert core.verification.tolerances.of("tiny-sd", "float32") == rel
    assert core.verification.tolerances.of("other", "float32") == 1e-4  # the default stays


def _valid() -> dict[str, object]:
    return {"format": "chords-calibration/1", "model": "m", "tolerances": {"float32": 1e-6}}


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda d: d.pop("format"), "not a chords-calibrate"),
        (lambda d: d.update(format="chords-calibration/9"), "not a chords-calibrate"),
        (lambda d: d.update(model="a b"), '"model"'),
        (lambda d: d.update(model=7), '"model"'),
        (lambda d: d.update(tolerances=[1e-6]), '"tolerances"'),
        (lambda d: d.update(tolerances={}, refused={"bfloat16": "noise"}), "no tolerance"),
        (lambda d: d.update(tolerances={"int8": 1.0}), "is not DTYPE"),
        (lambda d: d.update(tolerances={"float32": -1.0}), "is not DTYPE"),
        (lambda d: d.update(tolerances={"float32": "1e-6"}), "is not DTYPE"),
        (lambda d: d.update(tolerances={"float32": True}), "is not DTYPE"),
        (lambda d: d.update(tolerances={"float32": math.inf}), "is not DTYPE"),
    ],
)
def test_bad_calibration_files_are_typed_errors(change, says):
    data = _valid()
    assert calibration_entries(json.dumps(data).encode()) == "m:float32=1e-06"
    change(data)
    with pytest.raises(InvalidCalibrationFile, match=says):
        calibration_entries(json.dumps(data).encode())


def test_unreadable_huge_and_non_json_files_are_typed_errors(tmp_path):
    with pytest.raises(InvalidCalibrationFile, match="cannot read"):
        read_calibration(tmp_path / "missing.json")
    huge = tmp_path / "huge.json"
    huge.write_bytes(b" " * (MAX_CALIBRATION_BYTES + 1))
    with pytest.raises(InvalidCalibrationFile, match="larger than"):
        read_calibration(huge)
    for raw in (b"{", b"\xff\xfe", b"NaN"):
        with pytest.raises(InvalidCalibrationFile):
            calibration_entries(raw)
    with pytest.raises(InvalidTolerance, match="@FILE"):
        Tolerances.parse("@x.json")  # unexpanded: the broker's command expands it


def test_chords_broker_refuses_a_bad_file_before_it_binds(tmp_path):
    from chords_mq.broker.server import main as broker_main

    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    result = CliRunner().invoke(broker_main, ["--verify-tolerance", f"@{bad}"])
    assert result.exit_code == 2 and "not a chords-calibrate --out file" in result.output


@pytest.mark.parametrize(
    "text",
    ["gpu", "cpu:threads=0", "cpu:fast=1", "cuda:x", "cpu:mkldnn", "cpu:capability=AVX 2"],
)
def test_bad_sides_are_typed_errors(text):
    with pytest.raises(CalibrationError):
        parse_side(text)


def test_sides_parse_and_settings_are_restored():
    assert parse_side("cpu:threads=1:mkldnn=off").label == "cpu:threads=1:mkldnn=off"
    threads = torch.get_num_threads()
    with applied(parse_side("cpu:threads=1:mkldnn=off")):
        assert torch.get_num_threads() == 1 and not torch.backends.mkldnn.enabled
    assert torch.get_num_threads() == threads and torch.backends.mkldnn.enabled


def test_the_same_side_twice_and_a_dtype_the_model_lacks_are_usage_errors():
    same = CliRunner().invoke(main, ["--model", "digits", "--against", "cpu"])
    assert same.exit_code == 2 and "the same" in same.output
    digits = CliRunner().invoke(main, ["--model", "digits", "--dtype", "bfloat16", "--steps", "1"])
    assert digits.exit_code == 2 and "float32 only" in digits.output


def test_help_names_both_sides_and_the_output():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert all(option in result.output for option in ("--device", "--against", "--out"))


def test_a_capability_side_is_evaluated_by_a_child_from_the_same_inputs(tmp_path):
    """The child's part of ``--against cpu:capability=NAME`` (``--evaluate-inputs``), run
    in-process here (the process and its ATEN_CPU_CAPABILITY are benchmarks/calibrate_cpu.sh's):
    each input evaluated at its own step, bitwise as a worker's task, and the capability torch
    ran reported."""
    assert parse_side("cpu:capability=default").label == "cpu:capability=default"
    _entry, adapter = load_model("digits", "cpu")
    prepared = adapter.prepare(RequestSpec(model="digits", method="sequential", steps=3))
    inputs = [prepared.x0, prepared.x0 * 0.5, prepared.x0 * 0.25]
    given, back = tmp_path / "in.pt", tmp_path / "out.pt"
    torch.save(inputs, given)
    args = [
        "--model",
        "digits",
        "--steps",
        "3",
        "--evaluate-inputs",
        str(given),
        "--out",
        str(back),
    ]
    ran = CliRunner().invoke(main, args)
    assert ran.exit_code == 0, ran.output
    answer = torch.load(back, weights_only=True)
    assert answer["capability"] == torch.backends.cpu.get_cpu_capability()
    for i, (x, output) in enumerate(zip(inputs, answer["outputs"], strict=True)):
        run = evaluate(adapter, prepared.context, prepared.solver, [x], [i], [(i + 1,)])
        assert torch.equal(output, run[0][i + 1])
    bad = CliRunner().invoke(main, ["--device", "cpu:capability=default", "--model", "digits"])
    assert bad.exit_code == 2 and "--against only" in bad.output
