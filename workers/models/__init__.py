"""Model adapters: each wraps one model family behind prepare / denoise / decode."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch

from workers.models.base import ModelAdapter, Prepared

__all__ = ["ModelAdapter", "Prepared", "load_adapter", "served_name"]

# model_index.json "_class_name" -> (module, adapter class), for --model PATH
PIPELINE_FAMILIES = {
    "FluxPipeline": ("workers.models.flux", "FluxAdapter"),
    "StableDiffusionPipeline": ("workers.models.stable_diffusion", "StableDiffusionAdapter"),
    "StableDiffusion3Pipeline": ("workers.models.sd3", "SD3Adapter"),
    "HunyuanVideoPipeline": ("workers.models.hunyuan_video", "HunyuanVideoAdapter"),
    "CogVideoXPipeline": ("workers.models.cogvideox", "CogVideoXAdapter"),
    "WanPipeline": ("workers.models.wan", "WanAdapter"),
}


def served_name(model: str) -> str:
    """The name a worker serves ``model`` under by default: a folder's base name, else the spec."""
    path = Path(model)
    if (path / "model_index.json").exists():
        return path.resolve().name
    return model


def load_adapter(
    model: str, device: str = "cpu", *, dtype: torch.dtype | None = None, **options: Any
) -> ModelAdapter:
    """The adapter for ``synthetic``, ``digits[:PATH]`` or a local diffusers pipeline folder.

    Unknown specs and unsupported pipelines raise ValueError.
    """
    if model == "synthetic":
        from workers.models.synthetic import SyntheticAdapter

        return SyntheticAdapter(device=device, **options)
    if model == "digits" or model.startswith("digits:"):
        from workers.models.digits import DigitsAdapter

        path = model.partition(":")[2] or None  # digits:/path/to/retrained/model
        return DigitsAdapter(device=device, path=path, **options)
    folder = Path(model)
    index = folder / "model_index.json"
    if index.exists():
        family = json.loads(index.read_text()).get("_class_name")
        if family not in PIPELINE_FAMILIES:
            raise ValueError(
                f"{folder}: pipeline {family} has no adapter yet (supported: "
                f"{', '.join(sorted(PIPELINE_FAMILIES))})"
            )
        module, name = PIPELINE_FAMILIES[family]
        adapter_class = getattr(importlib.import_module(module), name)
        adapter: ModelAdapter = adapter_class(folder, device=device, dtype=dtype)
        return adapter
    raise ValueError(
        f"unknown model {model!r}: use synthetic, digits[:PATH] or a diffusers pipeline folder"
    )
