"""``ChordsPipeline`` without daemons: importing chords_mq stays light, a call's diffusers
arguments become the request they mean, and bad arguments are refused before anything starts.
(tests/integration/test_chords_pipeline.py runs it with real daemons.)"""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

from chords_mq.apps.pipeline import ChordsPipeline
from chords_mq.apps.pipeline_call import DEFAULT_STEPS, FALLBACK_STEPS, CallDefaults
from chords_mq.errors import InvalidPipelineConfig, ModelPathError
from chords_mq.request import InvalidRequest
from chords_mq.workers.models import PIPELINE_FAMILIES


def test_importing_chords_mq_loads_neither_the_applications_nor_torch():
    code = (
        "import sys, chords_mq; "
        "print(sorted(m for m in sys.modules if m.startswith('chords_mq') or m == 'torch')); "
        "from chords_mq import ChordsPipeline; print(ChordsPipeline.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["['chords_mq']", "chords_mq.apps.pipeline"]


@pytest.mark.parametrize("pipeline", sorted(PIPELINE_FAMILIES))
def test_the_default_steps_are_the_diffusers_pipelines_own(pipeline):
    import diffusers

    signature = inspect.signature(getattr(diffusers, pipeline).__call__)
    expected = signature.parameters["num_inference_steps"].default
    assert DEFAULT_STEPS.get(pipeline, FALLBACK_STEPS) == expected


def test_the_diffusers_arguments_become_the_models_params():
    defaults = CallDefaults("tiny-sd", steps=50, cores=4)
    spec = defaults.spec(
        "a red fox", negative_prompt="blurry", guidance_scale=5.0, height=32, width=48, seed=7
    )
    assert spec.params == {
        "prompt": "a red fox",
        "negative_prompt": "blurry",
        "guidance_scale": 5.0,
        "height": 32,
        "width": 48,
    }  # what was not given stays out: the family's own default, as in diffusers
    assert (spec.model, spec.steps, spec.cores, spec.seed) == ("tiny-sd", 50, 4, 7)
    assert (spec.method, spec.stop, spec.output) == ("chords", None, "media")
    video = defaults.spec("a wave", num_frames=9, num_inference_steps=12, max_sequence_length=32)
    assert video.params == {"prompt": "a wave", "num_frames": 9, "max_sequence_length": 32}
    assert video.steps == 12
    assert defaults.spec("x", output_type="latent").output == "latent"
    assert defaults.spec("x", with_latents=True).output == "both"
    assert defaults.spec("x", cores=2, stop="core-index:1").resolved_cores() == 2
    assert defaults.spec("x", method="sequential").cores is None  # takes no cores
    digits = CallDefaults("digits", steps=50, cores=4, names={"guidance_scale": "guidance"})
    assert digits.spec("a 7", guidance_scale=2.0).params == {"prompt": "a 7", "guidance": 2.0}


@pytest.mark.parametrize(
    "arguments, reason",
    [
        ({"generator": object()}, "generator is not supported: pass seed=S"),
        ({"num_images_per_prompt": 2}, "one image per call"),
        ({"prompt_embeds": [0.0]}, "pass the prompt"),
        ({"output_type": "np"}, "output_type must be one of ('pil', 'latent')"),
        ({"method": "magic"}, "method"),
        ({"num_inference_steps": 0}, "steps must be in 1..10000"),
    ],
)
def test_a_call_argument_the_request_cannot_carry_is_refused(arguments, reason):
    with pytest.raises(InvalidRequest) as refused:
        CallDefaults("tiny-sd", steps=50, cores=4).spec("a red fox", **arguments)
    assert reason in str(refused.value)


def test_one_prompt_per_call():
    with pytest.raises(InvalidRequest, match="one prompt per call"):
        CallDefaults("tiny-sd", steps=50, cores=4).spec(["a", "b"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "arguments, reason",
    [
        ({"devices": "cuda:0"}, "devices must be a list of devices, one worker each"),
        ({"devices": []}, "devices must be a non-empty list"),
        ({"cores": 0}, "cores must be an integer >= 1"),
        ({"torch_dtype": "int8"}, "torch_dtype must be float32, bfloat16 or float16"),
    ],
)
def test_bad_pipeline_arguments_are_refused_before_any_daemon_starts(arguments, reason):
    with pytest.raises(InvalidPipelineConfig) as refused:
        ChordsPipeline.from_pretrained("synthetic", **arguments)
    assert reason in str(refused.value)


def test_a_path_that_is_no_pipeline_folder_is_refused_at_once(tmp_path):
    with pytest.raises(ModelPathError, match="no such directory"):
        ChordsPipeline.from_pretrained(tmp_path / "nothing")
