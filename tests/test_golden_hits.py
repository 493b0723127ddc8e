"""Every plan's hits are the bits landed ``main`` produced before the engine-core redesign.

``tests/data/golden_hits.json`` was written by ``python -m tests.golden_hits`` on landed main
(its ``recorded_at`` commit), when the broker still did the solver arithmetic. Each case is
recomputed here with the current code, in-process, and must give the same cores, rounds,
dtypes, shapes and SHA-256 of every hit's bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.golden_hits import CASES, GOLDEN, describe, load_model, run_case, spec_for

RECORDED = json.loads(GOLDEN.read_text())
# The bits of tanh, sin and GEMM kernels depend on the CPU's vector ISA and on torch's build;
# the golden values are only comparable on the kind of machine that recorded them.
SAME_MACHINE = (
    torch.__version__ == RECORDED["torch"]
    and torch.backends.cpu.get_cpu_capability() == RECORDED["cpu_capability"]
)
pytestmark = pytest.mark.skipif(
    not SAME_MACHINE,
    reason=(
        f"golden hits were recorded with torch {RECORDED['torch']} on "
        f"{RECORDED['cpu_capability']}; this is torch {torch.__version__} on "
        f"{torch.backends.cpu.get_cpu_capability()}, whose kernels may round differently"
    ),
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {"root": tmp_path_factory.mktemp("golden")}


def test_every_case_was_recorded():
    assert sorted(RECORDED["cases"]) == sorted(name for name, _, _ in CASES)


@pytest.mark.parametrize(("name", "model", "fields"), CASES, ids=[c[0] for c in CASES])
def test_hits_are_bitwise_those_of_landed_main(name, model, fields, folders):
    recorded = RECORDED["cases"][name]
    spec = spec_for(model, fields)
    assert spec.to_dict() == recorded["request"]
    hits = run_case(load_model(model, folders), spec)
    assert describe(hits) == recorded["hits"]
