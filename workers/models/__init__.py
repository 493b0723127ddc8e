"""Model adapters: each wraps one model family behind prepare / denoise / decode."""

from __future__ import annotations

from typing import Any

from workers.models.base import ModelAdapter, Prepared

__all__ = ["ModelAdapter", "Prepared", "load_adapter"]


def load_adapter(model: str, device: str = "cpu", **options: Any) -> ModelAdapter:
    """The adapter for a model spec such as ``synthetic``. Unknown specs raise ValueError."""
    if model == "synthetic":
        from workers.models.synthetic import SyntheticAdapter

        return SyntheticAdapter(device=device, **options)
    if model == "digits" or model.startswith("digits:"):
        from workers.models.digits import DigitsAdapter

        path = model.partition(":")[2] or None  # digits:/path/to/retrained/model
        return DigitsAdapter(device=device, path=path, **options)
    raise ValueError(f"unknown model {model!r} (available: synthetic, digits[:PATH])")
