"""The shipped digits demo model: prompts, the adapter, reproducible training, the model card."""

from __future__ import annotations

import re

import pytest
import torch

from chords_mq.request import InvalidRequest, RequestSpec
from chords_mq.workers.models.digits import MODEL_DIR, DigitsAdapter, digit_of, to_image
from chords_mq.workers.models.digits_train import train


@pytest.fixture(scope="module")
def adapter() -> DigitsAdapter:
    return DigitsAdapter()


@pytest.mark.parametrize(
    ("prompt", "digit"),
    [
        ("7", 7),
        ("a handwritten 3", 3),
        ("seven", 7),
        ("Draw a NINE please", 9),
        ("2 or 5", 2),
        ("five, not 8", 5),
    ],
)
def test_prompt_picks_the_class(prompt, digit):
    assert digit_of(prompt) == digit


def test_prompt_without_a_digit_is_an_invalid_request(adapter):
    with pytest.raises(InvalidRequest, match="no digit"):
        adapter.prepare(RequestSpec(model="digits", params={"prompt": "a cat"}))
    with pytest.raises(InvalidRequest, match="unknown params"):
        adapter.prepare(RequestSpec(model="digits", params={"prompt": "1", "size": 3}))


def test_sequential_sample_is_the_schedulers_own_loop(adapter):
    from diffusers import FlowMatchEulerDiscreteScheduler

    spec = RequestSpec(
        model="digits", method="sequential", steps=12, seed=4, params={"prompt": "4"}
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    scheduler.set_timesteps(12)
    x = torch.randn((1, 1, 8, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = adapter.unet(x, t.reshape(1), class_labels=torch.tensor([4])).sample
            x = scheduler.step(out, t, x).prev_sample
    assert torch.equal(adapter.sample_sequential(spec), x)


def test_guidance_runs_cond_and_uncond_in_one_batch(adapter):
    spec = RequestSpec(model="digits", steps=10, params={"prompt": "2", "guidance": 2.0})
    prepared = adapter.prepare(spec)
    out = adapter.denoise(prepared.context, prepared.x0.unsqueeze(0), [0])
    assert out.shape == (1, 1, 1, 8, 8)
    plain = adapter.prepare(RequestSpec(model="digits", steps=10, params={"prompt": "2"}))
    assert not torch.equal(out, adapter.denoise(plain.context, plain.x0.unsqueeze(0), [0]))


def test_decoded_picture_is_scaled_up_uint8():
    image = to_image(torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8))
    assert image.dtype == torch.uint8 and image.shape == (64, 64)
    assert image[0, 0] == 0 and image[-1, -1] == 255


def test_training_is_reproducible_bit_for_bit():
    torch.set_num_threads(1)
    first, second = train(6, seed=3, log_every=10**9), train(6, seed=3, log_every=10**9)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_model_card_numbers_match_the_shipped_weights(adapter):
    from chords_mq.workers.models.digits_metrics import DigitScorer, sample_sequential_batch

    card = (MODEL_DIR / "README.md").read_text()
    row = re.search(r"\| generated \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", card)
    per_class = int(re.search(r"## Metrics \((\d+) samples per class", card).group(1))
    assert row is not None
    labels = torch.arange(10).repeat_interleave(per_class)
    latents = sample_sequential_batch(adapter, labels, list(range(len(labels))), 50)
    metrics = DigitScorer().score(latents, labels)
    assert f"{metrics['accuracy']:.4f}" == row.group(1)
    assert f"{metrics['frechet']:.4f}" == row.group(2)
    assert f"{metrics['std_ratio']:.4f}" == row.group(3)
    assert metrics["accuracy"] >= 0.95, "the demo model must draw recognisable digits"
