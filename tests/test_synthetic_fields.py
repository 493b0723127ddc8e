"""The synthetic adapter's two fields: the analytic one (default) and the cheap linear one that
transport benchmarks use."""

from __future__ import annotations

import pytest
import torch

from chords_mq.request import InvalidRequest, RequestSpec
from chords_mq.workers.models.synthetic import SyntheticAdapter


def _forward(field: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    params: dict[str, object] = {"shape": [3]}
    if field is not None:
        params["field"] = field
    adapter = SyntheticAdapter()
    prepared = adapter.prepare(RequestSpec("synthetic", steps=4, params=params))
    return prepared.x0, adapter.denoise(prepared.context, prepared.x0[None], [1])[0]


def test_the_linear_field_is_sigma_minus_0_3_times_x():
    x0, out = _forward("linear")
    # sigmas are linspace(1, 0, 5): step 1 is sigma 0.75
    assert torch.equal(out, x0 * torch.tensor(0.75 - 0.3))


def test_the_default_field_is_the_analytic_one():
    x0, out = _forward(None)
    expected = torch.tanh(2 * x0) * 0.75 - 0.3 * x0 + 0.1 * torch.sin(3 * x0)
    assert torch.equal(out, expected)
    assert torch.equal(_forward("analytic")[1], out)


def test_an_unknown_field_is_a_typed_refusal_naming_the_fields():
    with pytest.raises(InvalidRequest, match="field must be one of"):
        _forward("cubic")
