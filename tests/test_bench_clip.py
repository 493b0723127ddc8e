"""``chords_mq.apps.bench.ClipQuality`` on a tiny random CLIP saved to a temporary folder.

The CLIP is built offline from small configs with seeded weights; its tokenizer is the in-memory
character-level one from ``tests.tiny_pipelines``. The score is checked against an independent
computation that loads the same folder with transformers and scores each image and prompt by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from chords_mq.apps.bench import BenchError, ClipQuality, Sample
from tests.tiny_pipelines import CLIP_BOS_ID, CLIP_EOS_ID, CLIP_MAX_LENGTH, _clip_tokenizer

IMAGE_SIZE = 32
PROJECTION_DIM = 16
# A random CLIP maps all images to nearly the same direction, so the sign of the cosine depends
# on the weights rather than the sample: with seed 1 the cosines below are positive (seed 0 gives
# negative ones, which would make both sides of the comparison 0).
MODEL_SEED = 1

PROMPTS = ["a red fox in the snow", "two cats on a sofa", "a bowl of fruit"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIP model and its processor, saved with ``save_pretrained``."""
    tokenizer = _clip_tokenizer()
    tiny = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 37,
    }
    config = CLIPConfig(
        text_config={
            **tiny,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": CLIP_MAX_LENGTH,
            "bos_token_id": CLIP_BOS_ID,
            # eos must match the tokenizer: CLIP pools the text at the first eos token.
            "eos_token_id": CLIP_EOS_ID,
            "pad_token_id": CLIP_EOS_ID,
        },
        vision_config={**tiny, "image_size": IMAGE_SIZE, "patch_size": 8},
        projection_dim=PROJECTION_DIM,
    )
    torch.manual_seed(MODEL_SEED)
    model = CLIPModel(config)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def make_sample(media: torch.Tensor | None, prompt: str | None = "a photo") -> Sample:
    return Sample(
        method="chords",
        cores=2,
        tolerance=None,
        prompt=prompt,
        seed=0,
        round=0,
        returned_core=1,
        evaluations=10,
        wall_s=0.1,
        latent=torch.zeros(4, 4, 4),
        media=media,
    )


def random_media(*shape: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)


def as_tensor(features: torch.Tensor | object) -> torch.Tensor:
    """transformers 4.x returns the projected features; 5.x a ModelOutput holding them."""
    if isinstance(features, torch.Tensor):
        return features
    pooled = features.pooler_output  # type: ignore[attr-defined]
    assert isinstance(pooled, torch.Tensor)
    return pooled


@torch.no_grad()
def reference_cosines(
    folder: Path, images: Sequence[Image.Image], prompts: Sequence[str]
) -> list[float]:
    """``cos(image features, text features)`` per pair, computed without ``chords_mq``."""
    model = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPProcessor.from_pretrained(folder)
    cosines = []
    for image, prompt in zip(images, prompts, strict=True):
        pixels = processor.image_processor(images=image, return_tensors="pt")["pixel_values"]
        assert pixels.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
        tokens = processor.tokenizer([prompt], return_tensors="pt")
        image_emb = as_tensor(model.get_image_features(pixel_values=pixels))
        text_emb = as_tensor(model.get_text_features(**tokens))
        assert image_emb.shape == text_emb.shape == (1, PROJECTION_DIM)
        cosines.append(
            float((image_emb @ text_emb.T).item() / (image_emb.norm() * text_emb.norm()))
        )
    return cosines


def reference_score(cosines: Sequence[float]) -> float:
    """The mean of ``100 * max(cos, 0)``."""
    return sum(100.0 * max(cos, 0.0) for cos in cosines) / len(cosines)


def media_and_images() -> tuple[list[torch.Tensor], list[Image.Image]]:
    """Grayscale, RGB and video media, and the RGB images that should be scored for them."""
    gray = random_media(20, 24, seed=1)  # (H, W)
    rgb = random_media(24, 20, 3, seed=2)  # (H, W, C)
    video = random_media(2, 28, 28, 3, seed=3)  # (F, H, W, C): the first frame is scored
    images = [
        Image.fromarray(gray.numpy(), mode="L").convert("RGB"),
        Image.fromarray(rgb.numpy(), mode="RGB"),
        Image.fromarray(video[0].numpy(), mode="RGB"),
    ]
    return [gray, rgb, video], images


def test_clip_score_matches_an_independent_computation(clip_dir: Path) -> None:
    media, images = media_and_images()
    samples = [make_sample(m, p) for m, p in zip(media, PROMPTS, strict=True)]
    cosines = reference_cosines(clip_dir, images, PROMPTS)
    assert all(cos > 0.01 for cos in cosines), cosines  # else the comparison proves little
    expected = reference_score(cosines)

    score = ClipQuality(str(clip_dir))(samples)

    assert isinstance(score, float)
    assert 0.0 < score <= 100.0
    assert score == pytest.approx(expected, abs=1e-4)
    # Each sample on its own: the mean is over samples, not over a batch.
    for sample, cos in zip(samples, cosines, strict=True):
        assert ClipQuality(str(clip_dir))([sample]) == pytest.approx(100.0 * cos, abs=1e-4)


def test_negative_cosines_score_zero(clip_dir: Path, tmp_path: Path) -> None:
    model = CLIPModel.from_pretrained(clip_dir)
    with torch.no_grad():
        model.text_projection.weight.neg_()  # flips the sign of every cosine
    model.save_pretrained(tmp_path)
    CLIPProcessor.from_pretrained(clip_dir).save_pretrained(tmp_path)
    media, images = media_and_images()
    assert all(cos < -0.01 for cos in reference_cosines(tmp_path, images, PROMPTS))

    samples = [make_sample(m, p) for m, p in zip(media, PROMPTS, strict=True)]
    score = ClipQuality(str(tmp_path))(samples)

    assert score == 0.0


def test_a_folder_without_a_model_is_a_bench_error(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="cannot load a CLIP model from"):
        ClipQuality(str(tmp_path))


@pytest.mark.parametrize(
    ("media", "prompt"),
    [(None, "a photo"), (torch.zeros(8, 8, 3, dtype=torch.uint8), None)],
    ids=["no-media", "no-prompt"],
)
def test_a_sample_without_media_or_prompt_is_a_bench_error(
    clip_dir: Path, media: torch.Tensor | None, prompt: str | None
) -> None:
    quality = ClipQuality(str(clip_dir))
    with pytest.raises(BenchError, match="needs decoded images and prompts"):
        quality([make_sample(media, prompt)])


def test_digit_quality_without_scikit_learn_says_what_to_install(monkeypatch) -> None:
    """The digit metric's classifier is an optional dependency: say which extra brings it."""
    import sys

    from chords_mq.apps.bench import DigitQuality

    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes `import sklearn` fail
    with pytest.raises(BenchError, match=r"chords-mq\[bench\]"):
        DigitQuality()
