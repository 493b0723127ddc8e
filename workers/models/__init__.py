"""Model adapters: each wraps one model family behind prepare / denoise / decode."""

from __future__ import annotations

import importlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import torch

from chords_mq.errors import ModelPathError
from chords_mq.logs import adopt_third_party_logs
from chords_mq.options import F
from chords_mq.workers.models.base import ModelAdapter, Prepared

__all__ = [
    "ModelAdapter",
    "ModelEntry",
    "ModelPathError",
    "Prepared",
    "load_adapter",
    "resolve",
    "served_name",
]

# model_index.json "_class_name" -> (module, adapter class), for --model PATH
PIPELINE_FAMILIES = {
    "FluxPipeline": ("chords_mq.workers.models.flux", "FluxAdapter"),
    "StableDiffusionPipeline": (
        "chords_mq.workers.models.stable_diffusion",
        "StableDiffusionAdapter",
    ),
    "StableDiffusionXLPipeline": (
        "chords_mq.workers.models.stable_diffusion",
        "StableDiffusionXLAdapter",
    ),
    "StableDiffusion3Pipeline": ("chords_mq.workers.models.sd3", "SD3Adapter"),
    "HunyuanVideoPipeline": ("chords_mq.workers.models.hunyuan_video", "HunyuanVideoAdapter"),
    "CogVideoXPipeline": ("chords_mq.workers.models.cogvideox", "CogVideoXAdapter"),
    "WanPipeline": ("chords_mq.workers.models.wan", "WanAdapter"),
}


# --family short names
FAMILY_NAMES = {
    "flux": "FluxPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "stable-diffusion": "StableDiffusionPipeline",
    "stable-diffusion-xl": "StableDiffusionXLPipeline",
    "hunyuan-video": "HunyuanVideoPipeline",
    "wan": "WanPipeline",
    "cogvideox": "CogVideoXPipeline",
}


@dataclass(frozen=True)
class ModelEntry:
    """Where a served model comes from: a spec or folder, and optionally its family and dtype."""

    name: str
    source: str
    family: str | None = None
    dtype: str | None = None
    scheduler: str | None = None  # a diffusers scheduler class to use instead of the folder's


def read_registry(path: str | Path) -> dict[str, ModelEntry]:
    """A JSON registry ``{"flux-dev": {"path": "/models/FLUX.1-dev", "family": "flux",
    "dtype": "bfloat16", "scheduler": ...}, ...}``; bad files raise ValueError with the
    reason."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"model registry {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"model registry {path}: expected a JSON object of models")
    entries = {}
    for name, entry in data.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise ValueError(f'model registry {path}: {name!r} needs a "path"')
        family = entry.get("family")
        if family is not None and family not in FAMILY_NAMES:
            raise ValueError(f"model registry {path}: {name!r} has unknown family {family!r}")
        scheduler = entry.get("scheduler")
        if scheduler is not None and not isinstance(scheduler, str):
            raise ValueError(f'model registry {path}: {name!r} has a non-string "scheduler"')
        entries[name] = ModelEntry(name, entry["path"], family, entry.get("dtype"), scheduler)
    return entries


def resolve(model: str, registry: str | Path | None = None) -> ModelEntry:
    """``model`` as a registry name (when a registry is given and lists it) or as a spec/folder.

    A plain name (no ``/``) that the registry does not list and that is no spec or existing
    path raises ModelPathError naming the registry; paths are checked by ``load_adapter``."""
    if registry is not None:
        entries = read_registry(registry)
        if model in entries:
            return entries[model]
        if not _is_spec(model) and "/" not in model and not Path(model).exists():
            listed = ", ".join(sorted(entries)) or "no models"
            raise ModelPathError(
                f"unknown model {model!r}: not in the model registry {registry} (it lists "
                f"{listed}), and no folder {model} exists"
            )
    return ModelEntry(served_name(model), model)


def served_name(model: str) -> str:
    """The name a worker serves ``model`` under by default: a folder's base name, else the spec."""
    path = Path(model)
    if (path / "model_index.json").exists():
        return path.resolve().name
    return model


def load_adapter(
    model: str,
    device: str = "cpu",
    *,
    dtype: torch.dtype | None = None,
    family: str | None = None,
    scheduler: str | None = None,
    **options: Any,
) -> ModelAdapter:
    """The adapter for ``synthetic``, ``digits[:PATH]`` or a local diffusers pipeline folder.

    What is no spec and no pipeline folder an adapter serves raises ModelPathError (a
    ValueError) with the reason in one line: no such directory (or a hub id), a file, a folder
    without ``model_index.json``, a pipeline class no family serves.
    """
    if scheduler is not None and _is_spec(model):
        raise ValueError(f"--scheduler applies to diffusers pipeline folders, not to {model}")
    if model == "synthetic":
        from chords_mq.workers.models.synthetic import SyntheticAdapter

        return SyntheticAdapter(device=device, **options)
    if model == "digits" or model.startswith("digits:"):
        adopt_third_party_logs(load=True)  # a daemon's log level decides their bars, warnings
        from chords_mq.workers.models.digits import DigitsAdapter

        path = model.partition(":")[2] or None  # digits:/path/to/retrained/model
        return DigitsAdapter(device=device, path=path, **options)
    folder = Path(model)
    index = pipeline_index(model)
    if family is not None and family not in FAMILY_NAMES:
        raise ValueError(f"unknown family {family!r} (one of {', '.join(FAMILY_NAMES)})")
    pipeline = FAMILY_NAMES[family] if family is not None else pipeline_class(index)
    if pipeline not in PIPELINE_FAMILIES:
        served = ", ".join(f"{name} ({cls})" for name, cls in FAMILY_NAMES.items())
        raise ModelPathError(
            f"{folder}: no adapter serves the pipeline class {pipeline} (families served: "
            f"{served}; pass --family NAME to load the folder as one of them)"
        )
    module, name = PIPELINE_FAMILIES[pipeline]
    adopt_third_party_logs(load=True)
    adapter_class = getattr(importlib.import_module(module), name)
    kwargs = {} if scheduler is None else {"scheduler": scheduler}
    adapter: ModelAdapter = adapter_class(folder, device=device, dtype=dtype, **kwargs)
    return adapter


def source_options(func: F) -> F:
    """``--family`` and ``--registry``: what ``load_model`` takes beside the model to find and
    load it, declared once for chords-worker and chords-calibrate."""
    func = click.option(
        "--registry",
        type=click.Path(dir_okay=False),
        envvar="CHORDS_MODELS",
        default=None,
        help="JSON file mapping model names to folders ($CHORDS_MODELS).",
    )(func)
    return click.option(
        "--family",
        type=click.Choice(sorted(FAMILY_NAMES)),
        default=None,
        help="Pipeline family, if model_index.json should not decide.",
    )(func)


def load_model(
    model: str,
    device: str = "cpu",
    *,
    registry: str | Path | None = None,
    dtype: str | None = None,
    family: str | None = None,
    scheduler: str | None = None,
    **options: Any,
) -> tuple[ModelEntry, ModelAdapter]:
    """What ``chords-worker --model MODEL`` loads (``chords-calibrate`` loads the same): MODEL
    resolved through ``registry``, the entry's dtype, family and scheduler unless given, and its
    adapter on ``device``. Bad paths and specs raise ValueError (ModelPathError) or OSError."""
    entry = resolve(model, registry)
    wanted = dtype or entry.dtype
    torch_dtype = None if wanted is None else getattr(torch, wanted)
    adapter = load_adapter(
        entry.source,
        device,
        dtype=torch_dtype,
        family=family or entry.family,
        scheduler=scheduler or entry.scheduler,
        **options,
    )
    return entry, adapter


def _is_spec(model: str) -> bool:
    return model in ("synthetic", "digits") or model.startswith("digits:")


# org/name as the hub spells a repository id
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def pipeline_index(model: str) -> Path:
    """The ``model_index.json`` of the pipeline folder ``model``; ModelPathError with the reason
    (one line) when ``model`` is not such a folder."""
    folder = Path(model)
    if not folder.exists():
        if _HUB_ID.fullmatch(model):
            raise ModelPathError(
                f"no such directory: {model}; hub ids are not supported, models load from local "
                f"folders only (download it with `hf download {model} --local-dir DIR`, then "
                "pass DIR)"
            )
        if "/" not in model and os.sep not in model:
            raise ModelPathError(
                f"unknown model {model!r}: not synthetic, digits[:PATH] or an existing folder "
                "(a registry name needs --registry FILE or $CHORDS_MODELS)"
            )
        raise ModelPathError(
            f"no such directory: {model} (models load from local diffusers pipeline folders only)"
        )
    if not folder.is_dir():
        if folder.name == "model_index.json":
            raise ModelPathError(
                f"{model} is a file, not a folder: pass its folder {folder.parent}"
            )
        raise ModelPathError(
            f"{model} is a file, not a folder: pass a diffusers pipeline folder (the one holding "
            "model_index.json)"
        )
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelPathError(
            f"no model_index.json in {model}: not a diffusers pipeline folder (save one with "
            "pipeline.save_pretrained(...))"
        )
    return index


def pipeline_class(index: Path) -> str:
    """The ``_class_name`` a pipeline folder's ``model_index.json`` names."""
    try:
        data = json.loads(index.read_text())
    except json.JSONDecodeError as exc:
        raise ModelPathError(f"{index}: not valid JSON ({exc})") from None
    name = data.get("_class_name") if isinstance(data, dict) else None
    if not isinstance(name, str) or not name:
        raise ModelPathError(f'{index} names no pipeline class (no "_class_name")')
    return name
