"""The kernel fingerprint and the guard that picks a machine's golden hits by it.

The guard (``tests.golden_hits.select_machine``) is a pure function of the golden file's content
and a fingerprint; here it gets synthetic files. The last test checks the real file: every
machine in it is keyed by its own fingerprint, has every case, and has the ops that
``kernel_fingerprint`` computes today (a fingerprint of other ops would silently never match).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.golden_hits import (
    CASES,
    GOLDEN,
    RECORD_COMMAND,
    RECORDED_AT,
    RECORDING_COMMIT,
    select_machine,
)
from tests.kernel_fingerprint import (
    OPS,
    differing_ops,
    fingerprint_id,
    kernel_fingerprint,
    nearest,
    values,
)

NAMES = sorted(name for name, _, _ in CASES)


@pytest.fixture(scope="module")
def fingerprint() -> dict[str, str]:
    return kernel_fingerprint()


def machine(fingerprint: dict[str, str], cases: list[str], cpu: str = "test CPU") -> dict:
    return {
        "fingerprint": fingerprint,
        "torch": torch.__version__,
        "cpu_capability": "TEST",
        "cpu": cpu,
        "cases": {name: {"model": "m", "request": {}, "hits": []} for name in cases},
    }


def golden(*machines: dict) -> dict:
    return {
        "recorded_at": RECORDED_AT,
        "recording_commit": RECORDING_COMMIT,
        "machines": {fingerprint_id(m["fingerprint"]): m for m in machines},
    }


def changed(fingerprint: dict[str, str], *ops: str) -> dict[str, str]:
    return {op: ("0" * 64 if op in ops else digest) for op, digest in fingerprint.items()}


def test_fingerprint_is_deterministic_and_covers_the_cases_ops(fingerprint):
    torch.set_num_threads(2)
    try:
        again = kernel_fingerprint()
        assert torch.get_num_threads() == 2  # computed at one thread, the count restored
    finally:
        torch.set_num_threads(1)
    assert again == fingerprint
    assert fingerprint_id(again) == fingerprint_id(fingerprint)
    assert len(fingerprint_id(fingerprint)) == 16
    for op in (
        "randn",
        "sin",
        "tanh",
        "exp",
        "silu",
        "gelu",
        "matmul-67x129x71",
        "matmul-256x512x256",
        "addmm",
        "linear",
        "conv2d-3x3",
        "softmax",
        "layer_norm",
        "group_norm",
        "sdpa",
    ):
        assert {f"{op}/float32", f"{op}/bfloat16"} <= fingerprint.keys()
    assert "matmul-67x129x71/float64" in fingerprint
    assert len(set(fingerprint.values())) == len(fingerprint)  # no two ops give the same bits


def test_inputs_are_exact_and_fixed():
    x = values((4099,), torch.float64, 0)
    assert torch.equal(x, values((4099,), torch.float64, 0))
    assert torch.equal(values((4099,), torch.float32, 0).double(), x)  # exact in float32
    assert torch.equal(x * 8192, (x * 8192).round())  # 16-bit integers over 2**13
    assert x.min() >= -4 and x.max() < 4 and len(x.unique()) > 4000


def test_fingerprint_changes_when_the_inputs_change(fingerprint):
    moved = kernel_fingerprint(seed=1)
    assert moved.keys() == fingerprint.keys()
    assert differing_ops(fingerprint, moved) == sorted(fingerprint)
    assert fingerprint_id(moved) != fingerprint_id(fingerprint)


def test_differing_ops_and_nearest(fingerprint):
    one = changed(fingerprint, "tanh/float32")
    three = changed(fingerprint, "sdpa/bfloat16", "gelu/float32", "matmul-67x129x71/float32")
    assert differing_ops(fingerprint, fingerprint) == []
    assert differing_ops(fingerprint, one) == ["tanh/float32"]
    fewer = {k: v for k, v in fingerprint.items() if k != "sin/float64"}
    assert differing_ops(fingerprint, fewer) == ["sin/float64"]  # an op only one of them has
    assert nearest(fingerprint, {"a": three, "b": one}) == ("b", ["tanh/float32"])
    assert nearest(fingerprint, {}) is None


def test_an_unrecorded_fingerprint_skips_naming_the_ops_and_the_record_command(fingerprint):
    near = machine(changed(fingerprint, "tanh/float32"), NAMES, cpu="Near CPU")
    far = machine(changed(fingerprint, "sdpa/float32", "softmax/float32"), NAMES, cpu="Far CPU")
    entry, reason = select_machine(golden(far, near), fingerprint)
    assert entry is None
    assert fingerprint_id(fingerprint) in reason
    assert fingerprint_id(near["fingerprint"]) in reason and "Near CPU" in reason
    assert "differs in 1 of" in reason and "tanh/float32" in reason
    assert "sdpa" not in reason and "Far CPU" not in reason
    assert reason.endswith(RECORD_COMMAND)

    entry, reason = select_machine(golden(), fingerprint)
    assert entry is None
    assert "no machine is recorded" in reason and reason.endswith(RECORD_COMMAND)


def test_a_key_whose_fingerprint_differs_is_not_selected(fingerprint):
    forged = machine(changed(fingerprint, "exp/bfloat16"), NAMES)
    recorded = {"machines": {fingerprint_id(fingerprint): forged}}
    entry, reason = select_machine(recorded, fingerprint)
    assert entry is None and "exp/bfloat16" in reason


def test_a_recorded_fingerprint_compares_every_case(fingerprint):
    mine = machine(dict(fingerprint), NAMES)
    other = machine(changed(fingerprint, "tanh/float32"), NAMES[:3])
    entry, reason = select_machine(golden(other, mine), fingerprint)
    assert entry is mine
    assert fingerprint_id(fingerprint) in reason
    assert sorted(entry["cases"]) == NAMES  # test_hits_are_bitwise... reads each case from it

    # A recorded machine that lacks a case is still selected: test_every_case_was_recorded
    # then fails for it, rather than the case being skipped.
    partial = machine(dict(fingerprint), NAMES[1:])
    entry, _ = select_machine(golden(partial), fingerprint)
    assert entry is partial


def test_the_golden_file_is_keyed_by_fingerprints_of_todays_ops():
    recorded = json.loads(GOLDEN.read_text())
    assert recorded["recorded_at"] == RECORDED_AT
    assert recorded["recording_commit"] == RECORDING_COMMIT
    ops = {f"{name}/{dtype}" for name, _, dtypes in OPS for dtype in dtypes}
    for key, entry in recorded["machines"].items():
        assert key == fingerprint_id(entry["fingerprint"])
        assert set(entry["fingerprint"]) == ops, f"{key}: record it again ({RECORD_COMMAND})"
        assert sorted(entry["cases"]) == NAMES
    assert "note" in recorded.get("unkeyed", {"note": ""})
