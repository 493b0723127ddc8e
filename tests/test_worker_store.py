"""The worker's ``LatentStore``: every byte counted, results past the device budget moved to
host memory (oldest first), a hard bound that refuses with ``StoreFull``, drop and release, and
the plan's operations computed over held results with the plan's own bits. On a CPU the host
tier is the same memory, so the tier logic runs here without a GPU."""

from __future__ import annotations

import random

import pytest
import torch

from chords_mq.algorithms import ChordsPlan
from chords_mq.algorithms.base import Parareal, Rectify, Ref, evaluate
from chords_mq.errors import ChordsError
from chords_mq.local import ToyODE, evaluator, simulate
from chords_mq.workers.store import LatentStore, NotHeld, StoreFull, UnknownRequest

LATENT = (2, 4, 8)  # 64 float32 elements: 256 bytes
BYTES = 256


def latent(seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(LATENT, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_put_counts_every_byte_and_release_frees_them():
    store = LatentStore(limit_bytes=10 * BYTES)
    for task in range(3):
        store.put("r1", Ref(task, 5), latent(task))
    store.put("r2", Ref(0, 5), latent(9, torch.bfloat16))
    assert store.held_bytes == 3 * BYTES + BYTES // 2
    assert store.request_bytes("r1") == 3 * BYTES
    assert sorted(store.requests()) == ["r1", "r2"]
    assert store.release("r1") == 3 * BYTES
    assert store.requests() == ["r2"] and store.held_bytes == BYTES // 2
    assert store.release("r1") == 0  # releasing twice is harmless


def test_past_the_device_budget_the_oldest_results_move_to_host():
    store = LatentStore(device="cpu", device_budget_bytes=2 * BYTES, limit_bytes=8 * BYTES)
    tiers = [store.put("r", Ref(task, 1), latent(task)) for task in range(4)]
    assert tiers == ["device"] * 4  # each new result lands on the device ...
    # ... and the oldest ones made room by moving to host memory
    assert [store.tier("r", Ref(task, 1)) for task in range(4)] == [
        "host",
        "host",
        "device",
        "device",
    ]
    assert (store.device_bytes, store.host_bytes) == (2 * BYTES, 2 * BYTES)
    store.drop("r", [Ref(2, 1)])  # device room freed: the next result needs no spill
    assert store.put("r", Ref(4, 1), latent(4)) == "device"
    assert (store.device_bytes, store.host_bytes) == (2 * BYTES, 2 * BYTES)


def test_a_result_larger_than_the_whole_device_budget_goes_to_host():
    store = LatentStore(device_budget_bytes=BYTES // 2, limit_bytes=4 * BYTES)
    assert store.put("r", Ref(0, 1), latent(0)) == "host"
    assert (store.device_bytes, store.host_bytes) == (0, BYTES)


def test_past_the_hard_bound_put_raises_store_full_and_changes_nothing():
    store = LatentStore(device_budget_bytes=BYTES, limit_bytes=2 * BYTES)
    store.put("r", Ref(0, 1), latent(0))
    store.put("r", Ref(1, 1), latent(1))
    with pytest.raises(StoreFull) as caught:
        store.put("r", Ref(2, 1), latent(2))
    assert isinstance(caught.value, ChordsError)
    assert (caught.value.needed, caught.value.held, caught.value.limit) == (
        BYTES,
        2 * BYTES,
        2 * BYTES,
    )
    assert store.held_bytes == 2 * BYTES and not store.holds("r", Ref(2, 1))
    # the same result put again replaces the old one and fits
    assert store.put("r", Ref(1, 1), latent(11)) in ("device", "host")
    assert store.held_bytes == 2 * BYTES
    assert torch.equal(store.get("r", Ref(1, 1)), latent(11))


def test_drop_frees_the_named_results_and_ignores_those_not_held():
    store = LatentStore()
    for task in range(3):
        store.put("r", Ref(task, 2), latent(task))
    assert store.drop("r", [Ref(0, 2), Ref(1, 2), Ref(7, 7)]) == 2 * BYTES
    assert store.refs("r") == [Ref(2, 2)]
    assert store.drop("nobody", [Ref(0, 2)]) == 0
    store.drop("r", [Ref(2, 2)])
    assert store.requests() == [] and store.held_bytes == 0


def test_a_view_is_copied_so_the_store_holds_exactly_its_bytes():
    big = torch.randn(4, *LATENT)
    store = LatentStore()
    store.put("r", Ref(0, 1), big[1])
    held = store.get("r", Ref(0, 1))
    assert torch.equal(held, big[1]) and held.untyped_storage().nbytes() == BYTES
    assert store.held_bytes == BYTES


def test_unknown_requests_and_refs_are_typed_errors():
    store = LatentStore()
    store.put("r", Ref(0, 1), latent(0))
    with pytest.raises(UnknownRequest):
        store.get("other", Ref(0, 1))
    with pytest.raises(NotHeld) as caught:
        store.get_many("r", [Ref(0, 1), Ref(3, 4), Ref(5, 6)])
    assert caught.value.refs == (Ref(3, 4), Ref(5, 6))
    with pytest.raises(NotHeld):
        store.evaluate("r", Rectify(Ref(0, 1), Ref(3, 4), Ref(0, 1), exclusive=False))
    with pytest.raises(ChordsError):
        store.put("r", Ref(1, 1), [1.0, 2.0])  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("operation", [Rectify, Parareal])
@pytest.mark.parametrize("exclusive", [False, True])
def test_evaluate_is_the_plans_arithmetic_bitwise_and_leaves_held_results_alone(
    dtype, operation, exclusive
):
    refs = [Ref(0, 3), Ref(1, 3), Ref(2, 3)]
    tensors = {ref: latent(i, dtype) * 10 ** (i - 1) for i, ref in enumerate(refs)}
    size = tensors[refs[0]].numel() * tensors[refs[0]].element_size()
    store = LatentStore(device_budget_bytes=size)  # one on the device, two on the host
    for ref in refs:
        store.put("r", ref, tensors[ref])
    assert {store.tier("r", ref) for ref in refs} == {"device", "host"}
    originals = {ref: tensor.clone() for ref, tensor in tensors.items()}
    value = operation(*refs, exclusive=exclusive)
    # the plan's own function, on private copies (an exclusive operation works in place)
    expected = evaluate(value, lambda ref: tensors[ref].clone())
    got = store.evaluate("r", value)
    assert got.dtype == dtype and torch.equal(got, expected)
    for ref in refs:  # nothing held was modified, exclusive or not
        assert torch.equal(store.get("r", ref), originals[ref])
    assert torch.equal(store.evaluate("r", refs[1]), originals[refs[1]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_chords_plan_driven_through_the_store_gives_its_hits_bitwise(dtype):
    """CHORDS fed names, its operations computed by a store whose tight device budget keeps
    most results on the host tier, results dropped once the plan no longer names them: the hits
    are the plan's on tensors, bit for bit."""
    steps, init = 12, [0, 2, 4, 8]
    ode = ToyODE(steps=steps, seed=3, dtype=dtype)
    reference = simulate(ChordsPlan(ode.x0.clone(), steps, init), ode.velocity)
    plan = ChordsPlan(ode.x0.clone(), steps, init)
    size = ode.x0.numel() * ode.x0.element_size()
    store = LatentStore(device_budget_bytes=2 * size, limit_bytes=4 * len(init) * size)
    step_of = evaluator(ode.velocity)
    rng = random.Random(0)
    pending, hits, spilled = [], [], 0
    while not plan.done:
        pending += [(task, store.evaluate("q", task.latent)) for task in plan.ready()]
        store.drop("q", [ref for ref in store.refs("q") if ref not in plan.names()])
        task, x = pending.pop(rng.randrange(len(pending)))
        results = step_of(x, task.step, task.targets)
        for target, tensor in results.items():
            store.put("q", Ref(task.id, target), tensor)
        spilled = max(spilled, store.host_bytes)
        named = {target: Ref(task.id, target) for target in results}
        hits += [
            (h.core, h.round, store.evaluate("q", h.latent)) for h in plan.complete(task.id, named)
        ]
    assert spilled > 0  # the host tier was used
    assert [(c, r) for c, r, _ in hits] == [(h.core, h.round) for h in reference.hits]
    for (_, _, got), hit in zip(hits, reference.hits):
        assert torch.equal(got, hit.latent)
