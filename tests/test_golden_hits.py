"""Every plan's hits are the bits the recording commit gave on this machine, bit for bit.

``tests/data/golden_hits.json`` holds, per machine, the hits that ``python -m tests.golden_hits
--record-machine`` got by running the recording commit's script (landed main before the
engine-core redesign, when the broker still did the solver arithmetic) on that machine. The
machines are keyed by their kernel fingerprint (``tests/kernel_fingerprint.py``: digests of the
torch CPU ops the cases use), because the bits of tanh, GEMM, attention and the rest depend on
the CPU's vector ISA, AMX, AVX512-FP16 and torch's build, not only on what
``get_cpu_capability()`` reports.

On a machine whose fingerprint is recorded, each case is recomputed with the current code,
in-process, and must give the same cores, rounds, dtypes, shapes and SHA-256 of every hit's
bytes, and every case must have been recorded. Any other machine skips, with a reason that names
the ops that differ from the nearest recorded machine and the command that records this one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.golden_hits import (
    CASES,
    GOLDEN,
    describe,
    load_model,
    run_case,
    select_machine,
    spec_for,
)
from tests.kernel_fingerprint import kernel_fingerprint

RECORDED = json.loads(GOLDEN.read_text())
MACHINE, WHY = select_machine(RECORDED, kernel_fingerprint())
pytestmark = pytest.mark.skipif(MACHINE is None, reason=WHY)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {"root": tmp_path_factory.mktemp("golden")}


def test_every_case_was_recorded():
    assert MACHINE is not None
    assert sorted(MACHINE["cases"]) == sorted(name for name, _, _ in CASES)


@pytest.mark.parametrize(("name", "model", "fields"), CASES, ids=[c[0] for c in CASES])
def test_hits_are_bitwise_those_of_the_recording_commit(name, model, fields, folders):
    assert MACHINE is not None
    recorded = MACHINE["cases"][name]
    spec = spec_for(model, fields)
    assert spec.to_dict() == recorded["request"]
    hits = run_case(load_model(model, folders), spec)
    assert describe(hits) == recorded["hits"]
