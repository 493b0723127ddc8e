"""Train the shipped demo model: class-conditional rectified flow on scikit-learn's digits.

    python -m chords_mq.workers.models.digits_train [--steps 600] \
        [--out workers/models/digits_model]

Data: ``sklearn.datasets.load_digits`` (1,797 real 8x8 scans, bundled with scikit-learn),
stratified 75/25 split with seed 0; training uses the 1,347 training digits scaled to [-1, 1].
Model: a diffusers ``UNet2DModel`` with 11 class embeddings (10 digits + a null class, 10% label
dropout for optional classifier-free guidance). Objective (diffusers' flow-matching convention):
``x_s = (1 - s) x + s e`` with logit-normal ``s``, timestep ``1000 s``, target ``e - x``, so that
``FlowMatchEulerDiscreteScheduler(shift=1)`` samples it. AdamW, batch 128, EMA of the weights.
Training runs a fixed number of steps on one torch thread, so the same seed gives the same
weights bit for bit (checked by a test). It writes the weights (``save_pretrained``), the
scheduler config, and a model card whose metrics come from
``chords_mq.workers.models.digits_metrics``.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel

MODEL_DIR = Path(__file__).resolve().parent / "digits_model"
NULL_CLASS = 10


def load_split(seed: int = 0) -> dict[str, Any]:
    """The real digits as tensors in [-1, 1], shape (n, 1, 8, 8), with a fixed 75/25 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.25, random_state=seed, stratify=labels
    )

    def to_tensor(array: Any) -> torch.Tensor:
        return torch.tensor(array, dtype=torch.float32).reshape(-1, 1, 8, 8) / 8.0 - 1.0

    return {
        "x_train": to_tensor(x_train),
        "y_train": torch.tensor(y_train),
        "x_test": to_tensor(x_test),
        "y_test": torch.tensor(y_test),
    }


def build_unet() -> UNet2DModel:
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=NULL_CLASS + 1,
        norm_num_groups=8,
    )


def train(steps: int, seed: int = 0, batch: int = 128, log_every: int = 100) -> UNet2DModel:
    """Train for ``steps`` optimiser steps; returns the EMA of the weights."""
    torch.manual_seed(seed)
    data = load_split()
    x_all, y_all = data["x_train"], data["y_train"]
    model = build_unet().train()
    ema = copy.deepcopy(model).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for step in range(1, steps + 1):
        index = torch.randint(0, len(x_all), (batch,), generator=generator)
        x, labels = x_all[index], y_all[index].clone()
        labels[torch.rand(batch, generator=generator) < 0.1] = NULL_CLASS
        noise = torch.randn(x.shape, generator=generator)
        sigma = torch.sigmoid(torch.randn(batch, generator=generator))
        s = sigma.view(-1, 1, 1, 1)
        noisy = (1 - s) * x + s * noise
        prediction = model(noisy, sigma * 1000, class_labels=labels).sample
        loss = torch.nn.functional.mse_loss(prediction, noise - x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        decay = min(0.995, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema_p, p in zip(ema.parameters(), model.parameters()):
                ema_p.lerp_(p, 1 - decay)
        if step % log_every == 0:
            print(f"step {step:5d}  {time.perf_counter() - started:5.1f}s  loss {loss.item():.4f}")
    print(f"trained {steps} steps in {time.perf_counter() - started:.1f}s")
    return ema


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the chords-mq digits demo model.")
    parser.add_argument("--steps", type=int, default=600, help="Optimiser steps.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=MODEL_DIR)
    parser.add_argument(
        "--samples-per-class",
        type=int,
        default=50,
        help="Samples per class for the model card's metrics.",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread: the same seed gives the same weights
    started = time.perf_counter()
    model = train(args.steps, args.seed)
    training_s = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    FlowMatchEulerDiscreteScheduler(shift=1.0).save_pretrained(args.out)

    from chords_mq.workers.models.digits_metrics import write_model_card

    write_model_card(
        args.out,
        training_s=training_s,
        training_steps=args.steps,
        seed=args.seed,
        samples_per_class=args.samples_per_class,
    )


if __name__ == "__main__":
    main()
