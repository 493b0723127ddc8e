"""Verification across device classes: the distance a worker reports between two results
(``algorithms.distance``) and the tolerance per model and dtype the broker holds it to
(``broker.tolerance``, ``--verify-tolerance``)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from chords_mq.algorithms.base import Ref
from chords_mq.algorithms.distance import CHUNK, distance
from chords_mq.broker.config import BrokerConfig
from chords_mq.broker.tolerance import DEFAULT_TOLERANCES, InvalidTolerance, Tolerances
from chords_mq.wire import CompareMessage, tensor_digest
from chords_mq.wire.named import Holder, NamedInput, NamedRef
from chords_mq.workers.dataplane import DataServer
from chords_mq.workers.store import LatentStore
from chords_mq.workers.worker import Worker


def latent(seed: int = 0, shape: tuple[int, ...] = (1, 4, 8, 8)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_distance_is_zero_for_equal_results_and_symmetric():
    a = latent()
    assert distance(a, a.clone()) == (0.0, 0.0)
    b = a * 1.001
    assert distance(a, b) == distance(b, a)
    max_rel, rms_rel = distance(a, b)
    assert max_rel == pytest.approx(1e-3 / 1.001, rel=1e-3)
    assert rms_rel == pytest.approx(1e-3 / 1.001, rel=1e-3)


def test_distance_of_faults_the_verification_benchmark_injects():
    a = latent()
    assert distance(a, torch.zeros_like(a)) == pytest.approx((1.0, 1.0))  # zeros
    max_rel, rms_rel = distance(a, a.to(torch.bfloat16))  # a bfloat16 cast, read in float32
    assert 0 < max_rel < 2**-8 and 0 < rms_rel < 2**-8
    assert distance(a, a[..., :4]) == (math.inf, math.inf)  # another shape
    nan = a.clone()
    nan[0, 0, 0, 0] = math.nan
    assert distance(a, nan) == (math.inf, math.inf)
    inf = a.clone()
    inf.view(-1)[-1] = math.inf
    assert distance(inf, a) == (math.inf, math.inf)


def test_distance_over_several_chunks_sees_the_last_one():
    a = latent(1, (CHUNK * 2 + 5,))
    b = a.clone()
    b[-1] += 1.0
    max_rel, rms_rel = distance(a, b)
    assert max_rel == pytest.approx(1.0 / float(a.abs().max().clamp(min=b.abs().max())))
    assert 0 < rms_rel < max_rel


def test_defaults_and_overrides_per_model_and_dtype():
    tol = Tolerances.parse("")
    assert tol.of("digits", "float32") == DEFAULT_TOLERANCES["float32"] == 1e-4
    assert tol.of("digits", "bfloat16") == 0.05
    tol = Tolerances.parse("bfloat16=0.1, sdxl:float32=1e-3")
    assert tol.of("digits", "bfloat16") == 0.1
    assert tol.of("sdxl", "float32") == 1e-3
    assert tol.of("digits", "float32") == 1e-4  # another model keeps the dtype's
    assert tol.of("digits", "uint8") is None  # never compared across classes


def test_agree_against_the_tolerance():
    tol = Tolerances.parse("")
    assert tol.agree("m", "float32", 1e-5, 1e-6)
    assert tol.agree("m", "float32", 1e-4, 1e-4)  # at the tolerance: agree
    assert not tol.agree("m", "float32", 1e-3, 1e-6)  # --fault scale:1.001
    assert not tol.agree("m", "float32", 1e-6, 2e-4)  # the RMS alone can disagree
    assert not tol.agree("m", "float32", math.nan, 0.0)
    assert not tol.agree("m", "float32", math.inf, math.inf)
    assert not tol.agree("m", "int8", 0.0, 0.0)  # no tolerance: never agree
    assert tol.agree("m", "bfloat16", 0.01, 0.004)


@pytest.mark.parametrize(
    "text",
    [
        "float32",
        "float32=",
        "float32=x",
        "float32=-1",
        "float32=nan",
        "float32=inf",
        "int8=0.1",
        "bad model:float32=0.1",
        ":float32=0.1",
        ",".join(["float32=0.1"] * 65),
    ],
)
def test_bad_tolerances_are_refused_with_a_typed_error(text):
    with pytest.raises(InvalidTolerance, match="--verify-tolerance"):
        Tolerances.parse(text)
    with pytest.raises(InvalidTolerance):
        BrokerConfig(verify_tolerance=text)


def test_the_broker_cli_refuses_a_bad_tolerance():
    from click.testing import CliRunner

    from chords_mq.broker.server import main

    result = CliRunner().invoke(main, ["--verify-tolerance", "float32=big"])
    assert result.exit_code == 2
    assert "REL must be a finite number" in result.output


def test_a_worker_compares_its_result_with_one_fetched_from_another_worker():
    """The worker's side of COMPARE, over real loopback sockets: it fetches the other result
    from that worker's data endpoint (checking its digest) and answers the distance; a result
    it does not hold, or one nobody serves, is an error, never a distance."""
    ours, theirs = LatentStore(), LatentStore()
    a = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(5))
    ours.put("r", Ref(1 << 61, 3), a * 1.001)
    theirs.put("r", Ref(7, 3), a)
    with DataServer(theirs) as other, DataServer(ours) as mine:
        worker = Worker("tcp://127.0.0.1:9", None, "m", "cpu", data=mine)  # type: ignore[arg-type]
        try:

            def compare(ref: Ref, digest: str | None) -> CompareMessage:
                holder = Holder(other.advertised, None, digest)
                named = NamedInput("ref", (NamedRef(Ref(7, 3), (holder,)),))
                return CompareMessage(
                    mine=(ref,), theirs=(named,), dtype="float32", request="r", task=7
                )

            answer = worker._compare(compare(Ref(1 << 61, 3), tensor_digest(a)))
            assert answer.error is None and answer.task == 7
            ((max_rel, rms_rel),) = answer.distances
            assert max_rel == pytest.approx(1e-3 / 1.001, rel=1e-3)
            assert not Tolerances.parse("").agree("m", "float32", max_rel, rms_rel)
            assert worker._compare(compare(Ref(1 << 61, 4), None)).error  # not held here
            wrong = tensor_digest(torch.zeros(2, 4, 8))  # it serves other bytes than reported
            assert worker._compare(compare(Ref(1 << 61, 3), wrong)).error
        finally:
            if worker._client is not None:
                worker._client.close()
            worker.ctx.term()
            os.close(worker._wake_r)
            os.close(worker._wake_w)
