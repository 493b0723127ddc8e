"""Why a model does not load, in one line: ``resolve`` and ``load_adapter`` on bad ``--model``
values (no such folder, a file, no model_index.json, a pipeline class no family serves, a hub
id, a name no registry lists). The worker turns these into a usage error (exit 2); see
tests/integration/test_model_paths.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chords_mq.errors import ChordsError, ModelPathError
from chords_mq.workers.models import FAMILY_NAMES, load_adapter, resolve


def refused(model: str, **kwargs: object) -> str:
    with pytest.raises(ModelPathError) as caught:
        load_adapter(model, **kwargs)  # type: ignore[arg-type]
    text = str(caught.value)
    assert "\n" not in text and "unknown model" not in text
    return text


def test_the_error_is_a_typed_value_error():
    assert issubclass(ModelPathError, ValueError) and issubclass(ModelPathError, ChordsError)


def test_a_path_that_does_not_exist(tmp_path):
    missing = tmp_path / "nope" / "flux"
    text = refused(str(missing))
    assert text.startswith(f"no such directory: {missing}")
    assert "local" in text and "hub" not in text


def test_a_file_is_not_a_folder(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    assert refused(str(weights)) == (
        f"{weights} is a file, not a folder: pass a diffusers pipeline folder "
        "(the one holding model_index.json)"
    )
    index = tmp_path / "model_index.json"
    index.write_text("{}")
    assert refused(str(index)) == f"{index} is a file, not a folder: pass its folder {tmp_path}"


def test_a_folder_without_model_index_json(tmp_path):
    (tmp_path / "empty").mkdir()
    assert refused(str(tmp_path / "empty")) == (
        f"no model_index.json in {tmp_path / 'empty'}: not a diffusers pipeline folder "
        "(save one with pipeline.save_pretrained(...))"
    )


def test_a_pipeline_class_no_family_serves_names_the_class_the_families_and_family(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    text = refused(str(tmp_path))
    assert text.startswith(f"{tmp_path}: no adapter serves the pipeline class KandinskyPipeline")
    assert all(f"{name} ({cls})" in text for name, cls in FAMILY_NAMES.items())
    assert "--family" in text


def test_a_broken_model_index_json(tmp_path):
    index = tmp_path / "model_index.json"
    index.write_text("{not json")
    assert refused(str(tmp_path)).startswith(f"{index}: not valid JSON (")
    index.write_text(json.dumps({"scheduler": ["diffusers", "DDIMScheduler"]}))
    assert refused(str(tmp_path)) == f'{index} names no pipeline class (no "_class_name")'


@pytest.mark.parametrize("offline", ["1", "0"])
def test_a_hub_id_is_refused_with_how_to_download_it(offline, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)  # no hub is asked either way
    assert refused("black-forest-labs/FLUX.1-dev") == (
        "no such directory: black-forest-labs/FLUX.1-dev; hub ids are not supported, models "
        "load from local folders only (download it with `hf download "
        "black-forest-labs/FLUX.1-dev --local-dir DIR`, then pass DIR)"
    )


def test_a_plain_name_that_is_no_spec_and_no_folder():
    with pytest.raises(ModelPathError) as caught:
        load_adapter("flux-dev")
    assert str(caught.value) == (
        "unknown model 'flux-dev': not synthetic, digits[:PATH] or an existing folder "
        "(a registry name needs --registry FILE or $CHORDS_MODELS)"
    )


def test_a_name_the_registry_does_not_list_names_the_registry(tmp_path):
    registry = tmp_path / "models.json"
    registry.write_text(json.dumps({"sd": {"path": "/p"}, "flux-dev": {"path": "/q"}}))
    with pytest.raises(ModelPathError) as caught:
        resolve("flux-devv", registry)
    assert str(caught.value) == (
        f"unknown model 'flux-devv': not in the model registry {registry} (it lists flux-dev, "
        "sd), and no folder flux-devv exists"
    )
    registry.write_text("{}")
    with pytest.raises(ModelPathError, match=r"it lists no models"):
        resolve("flux-dev", registry)


def test_a_registry_still_passes_specs_and_paths_on(tmp_path):
    registry = tmp_path / "models.json"
    registry.write_text(json.dumps({"flux-dev": {"path": str(tmp_path / "gone")}}))
    assert resolve("synthetic", registry).source == "synthetic"
    assert resolve("digits:/x", registry).source == "digits:/x"
    assert resolve(str(tmp_path), registry).source == str(tmp_path)  # a folder: load_adapter's
    hub = resolve("black-forest-labs/FLUX.1-dev", registry)  # a path or hub id: load_adapter's
    assert hub.source == "black-forest-labs/FLUX.1-dev"
    entry = resolve("flux-dev", registry)  # listed, but its folder is gone
    assert refused(entry.source).startswith(f"no such directory: {tmp_path / 'gone'}")


def test_specs_still_load():
    assert type(load_adapter("synthetic")).__name__ == "SyntheticAdapter"
    assert resolve("synthetic").source == "synthetic"


def test_an_unknown_family_is_still_a_value_error(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="unknown family 'gan'"):
        load_adapter(str(tmp_path), family="gan")


def test_relative_paths_read_as_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("models").mkdir()
    assert refused("./models/flux").startswith("no such directory: ./models/flux (")
    assert refused("models").startswith("no model_index.json in models:")
