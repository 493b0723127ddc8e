"""``chords-worker --fault``: each fault parses, a bad one is a usage error, and each faulty
result is what it says (scaled outputs, another dtype, one bit flipped, reproducibly)."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from chords_mq.request import RequestSpec
from chords_mq.workers.faults import (
    Fault,
    FaultSpecError,
    FaultyResults,
    flip_bit,
    parse_fault,
    with_fault,
)
from chords_mq.workers.models.synthetic import SyntheticAdapter
from chords_mq.workers.worker import main as worker_main


@pytest.mark.parametrize(
    ("spec", "fault"),
    [
        ("zeros", Fault("zeros")),
        ("hang", Fault("hang")),
        ("scale:1.001", Fault("scale", factor=1.001)),
        ("cast:float16", Fault("cast", dtype=torch.float16)),
        ("cast:float64", Fault("cast", dtype=torch.float64)),
        ("bitflip:0.01", Fault("bitflip", probability=0.01)),
        ("bitflip:1:7", Fault("bitflip", probability=1.0, seed=7)),
        ("silent-prepare", Fault("silent-prepare")),
        ("serve:zeros", Fault("serve")),
    ],
)
def test_every_fault_spec_parses(spec, fault):
    assert parse_fault(spec) == fault


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "sometimes",
        "scale",
        "scale:x",
        "scale:inf",
        "cast:int8",
        "bitflip:1.5",
        "nan:2",
        "serve:ones",
    ],
)
def test_a_bad_fault_spec_says_what_is_wrong(spec):
    with pytest.raises(FaultSpecError):
        parse_fault(spec)


def test_a_bad_fault_is_a_usage_error_of_the_worker_cli():
    result = CliRunner().invoke(worker_main, ["--fault", "cast:int8"])
    assert result.exit_code == 2
    assert "Invalid value for '--fault'" in result.output and "float16" in result.output


def test_scale_multiplies_every_model_output():
    adapter = SyntheticAdapter()
    prepared = adapter.prepare(RequestSpec("synthetic", steps=4, params={"shape": [5]}))
    honest = adapter.denoise(prepared.context, prepared.x0[None], [1])
    scaled = with_fault(adapter, parse_fault("scale:1.001")).denoise(
        prepared.context, prepared.x0[None], [1]
    )
    assert torch.equal(scaled, honest * torch.tensor(1.001))
    assert not torch.equal(scaled, honest)


def test_cast_returns_results_in_that_dtype():
    results = {3: torch.randn(4), 5: torch.randn(4)}
    cast = FaultyResults(parse_fault("cast:float64")).apply("r", 1, 0, results)
    assert {t: r.dtype for t, r in cast.items()} == {3: torch.float64, 5: torch.float64}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_flip_bit_changes_exactly_one_bit_and_leaves_the_input_alone(dtype):
    x = torch.randn(9).to(dtype)
    before = x.clone()
    for draw in (0, 8, 9 * 15, 2**40 + 3):
        y = flip_bit(x, draw)
        differ = (x.view(torch.uint8) ^ y.view(torch.uint8)).to(torch.int64)
        assert sum(bin(int(b)).count("1") for b in differ) == 1
    assert torch.equal(x.view(torch.uint8), before.view(torch.uint8))


def test_bitflip_is_reproducible_and_about_p_of_the_results():
    results = {t: torch.randn(16) for t in range(1, 6)}

    def run(seed: int) -> list[bool]:
        faulty = FaultyResults(Fault("bitflip", probability=0.3, seed=seed))
        flips = []
        for task in range(200):
            out = faulty.apply("req", task, 0, results)
            flips += [not torch.equal(out[t], results[t]) for t in results]
        assert faulty.flipped == sum(flips)
        return flips

    first = run(1)
    assert run(1) == first  # the same seed: the same results flipped
    assert run(2) != first
    assert 0.2 < sum(first) / len(first) < 0.4  # 1000 draws at P = 0.3
