"""Quality metrics for the digits demo model, reproducible in seconds from the bundled data.

* accuracy: an RBF SVC trained on the real training digits (the role CLIP score plays in the
  paper) classifies generated samples; the score is agreement with the requested class.
* frechet: the Frechet distance between Gaussian fits of generated and real held-out digits in
  a fixed 16-dimensional PCA space fitted on the real training digits (the role of FID). It
  catches what accuracy misses: blurry class averages classify well but have the wrong spread.
* std_ratio: within-class pixel spread of generated digits over that of real digits.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chords_mq.algorithms import ChordsPlan, SequentialPlan
from chords_mq.algorithms.base import as_tensor
from chords_mq.local import simulate
from chords_mq.request import RequestSpec
from chords_mq.workers.models.digits import DigitsAdapter
from chords_mq.workers.models.digits_train import load_split


def to_pixels(latents: torch.Tensor) -> np.ndarray:
    """(n, 1, 8, 8) latents in [-1, 1] -> (n, 64) in the data's own 0..16 scale."""
    flat = latents.reshape(len(latents), 64).to(torch.float64).clamp(-1, 1)
    return ((flat + 1) * 8).numpy()


class DigitScorer:
    """Fits the classifier and the feature space once (about a second)."""

    def __init__(self, seed: int = 0) -> None:
        from sklearn.decomposition import PCA
        from sklearn.svm import SVC

        data = load_split(seed)
        self.x_train = to_pixels(data["x_train"])
        self.y_train = data["y_train"].numpy()
        self.x_test = to_pixels(data["x_test"])
        self.y_test = data["y_test"].numpy()
        self.classifier = SVC(kernel="rbf", gamma="scale").fit(self.x_train, self.y_train)
        self.pca = PCA(n_components=16, random_state=seed).fit(self.x_train)
        self.real_features = self.pca.transform(self.x_test)

    def real_accuracy(self) -> float:
        return float((self.classifier.predict(self.x_test) == self.y_test).mean())

    def frechet(self, pixels: np.ndarray) -> float:
        from scipy import linalg

        a, b = self.pca.transform(pixels), self.real_features
        mu_a, mu_b = a.mean(0), b.mean(0)
        cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        root = linalg.sqrtm(cov_a @ cov_b)
        return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root.real))

    def std_ratio(self, pixels: np.ndarray, labels: np.ndarray) -> float:
        ratios = [
            pixels[labels == c].std(0).mean() / self.x_test[self.y_test == c].std(0).mean()
            for c in range(10)
        ]
        return float(np.mean(ratios))

    def score(self, latents: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        pixels, wanted = to_pixels(latents), labels.numpy()
        return {
            "accuracy": float((self.classifier.predict(pixels) == wanted).mean()),
            "frechet": round(self.frechet(pixels), 4),
            "std_ratio": round(self.std_ratio(pixels, wanted), 4),
        }


def batch_problem(
    adapter: DigitsAdapter, labels: torch.Tensor, seeds: list[int], steps: int
) -> tuple[torch.Tensor, Any, Callable[[torch.Tensor, int], torch.Tensor]]:
    """Many requests as one batched problem: x0 per seed exactly as ``prepare`` makes it, the
    shared solver, and a velocity that evaluates every sample at the same step in one forward.
    (Batching changes low bits versus one request at a time; fine for statistics.)"""
    prepared = [
        adapter.prepare(
            RequestSpec(model="digits", steps=steps, seed=seed, params={"prompt": str(int(label))})
        )
        for seed, label in zip(seeds, labels)
    ]
    x0 = torch.cat([p.x0 for p in prepared])
    timesteps = prepared[0].context.timesteps
    label_batch = labels.to(adapter.device)

    @torch.no_grad()
    def velocity(x: torch.Tensor, step: int) -> torch.Tensor:
        t = timesteps[step].expand(len(x)).to(adapter.device)
        out: torch.Tensor = adapter.unet(x.to(adapter.device), t, class_labels=label_batch).sample
        return out.cpu()

    return x0, prepared[0].solver, velocity


def sample_sequential_batch(
    adapter: DigitsAdapter, labels: torch.Tensor, seeds: list[int], steps: int
) -> torch.Tensor:
    x0, solver, velocity = batch_problem(adapter, labels, seeds, steps)
    return as_tensor(simulate(SequentialPlan(x0, steps), velocity, solver).returned.latent)


def sample_chords_batch(
    adapter: DigitsAdapter,
    labels: torch.Tensor,
    seeds: list[int],
    steps: int,
    init: list[int],
) -> list[tuple[int, int, torch.Tensor]]:
    """Every hit of a batched CHORDS run: (core, round, latents)."""
    x0, solver, velocity = batch_problem(adapter, labels, seeds, steps)
    result = simulate(ChordsPlan(x0=x0, steps=steps, init_sequence=init), velocity, solver)
    return [(hit.core, hit.round, as_tensor(hit.latent)) for hit in result.hits]


def write_model_card(
    directory: Path,
    *,
    training_s: float,
    training_steps: int,
    seed: int,
    samples_per_class: int = 50,
    steps: int = 50,
) -> dict[str, Any]:
    """Sample ``samples_per_class`` digits per class with 50 Euler steps, score them, and write
    README.md next to the weights. Returns the metrics."""
    adapter = DigitsAdapter(path=directory)
    scorer = DigitScorer()
    labels = torch.arange(10).repeat_interleave(samples_per_class)
    seeds = list(range(len(labels)))
    latents = sample_sequential_batch(adapter, labels, seeds, steps)
    metrics = scorer.score(latents, labels)
    real = {
        "accuracy": round(scorer.real_accuracy(), 4),
        "frechet_train_vs_test": round(scorer.frechet(scorer.x_train), 4),
    }
    parameters = sum(p.numel() for p in adapter.unet.parameters())
    size = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
    real_frechet = real["frechet_train_vs_test"]
    card = f"""# chords-mq digits demo model

A class-conditional rectified-flow `UNet2DModel` on 8x8 handwritten digits, shipped so that
`chords run` works on a fresh machine with no download.

* **Data**: scikit-learn's bundled `load_digits` (1,797 real 8x8 scans), stratified 75/25 split
  with seed 0; trained on the 1,347 training digits scaled to [-1, 1].
* **Model**: diffusers `UNet2DModel`, blocks (16, 32), one attention level, 11 class
  embeddings (10 digits + null class for classifier-free guidance); {parameters:,} parameters.
* **Objective**: `x_s = (1 - s) x + s e`, logit-normal `s`, timestep `1000 s`, target `e - x`;
  sample with `FlowMatchEulerDiscreteScheduler(shift=1)`.
* **Training**: AdamW lr 2e-3, batch 128, EMA, seed {seed}: {training_steps} steps in
  {training_s:.0f} s on one CPU thread (`python -m chords_mq.workers.models.digits_train`); one
  thread makes it deterministic: the same seed reproduces these weights bit for bit.
* **Files**: `config.json`, `diffusion_pytorch_model.safetensors`, `scheduler_config.json`
  ({size / 1e6:.2f} MB with this card).

## Metrics ({samples_per_class} samples per class, {steps} Euler steps, guidance 1)

Scored by `chords_mq.workers.models.digits_metrics` (an RBF SVC and a 16-dim PCA fitted on the real
training digits):

| samples | classifier accuracy | Frechet distance (PCA-16) | within-class spread ratio |
|---|---|---|---|
| generated | {metrics["accuracy"]:.4f} | {metrics["frechet"]:.4f} | {metrics["std_ratio"]:.4f} |
| real held-out digits | {real["accuracy"]:.4f} | {real_frechet:.4f} (train vs held-out) | 1 |
"""
    (directory / "README.md").write_text(card)
    result = {
        "generated": metrics,
        "real": real,
        "parameters": parameters,
        "training_steps": training_steps,
        "training_s": round(training_s, 1),
    }
    print(result)
    return result
