"""``ChordsPipeline`` with real daemons: a tiny Stable Diffusion folder served on two CPU
workers returns the images of the stock diffusers ``pipe()`` (what the engine's core 1 equals
bit for bit, decoded by a worker), reuses its workers across calls, and leaves no process
behind after ``close()``, after its ``with`` block, or when the process holding it is killed
with SIGKILL. A worker that cannot serve the folder fails the start-up, named, with its log.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from chords_mq import ChordsPipeline
from chords_mq.errors import ModelPathError, PipelineClosed, PipelineError, PipelineStartError
from chords_mq.request import InvalidRequest
from tests import tiny_pipelines as tiny
from tests.conftest import default_threads

PROMPT, STEPS, SEED = "a photo of a cat", 12, 3
ROOT = Path(__file__).resolve().parents[2]


def running(pid: int) -> bool:
    """Is ``pid`` a live process? A zombie waiting for its reaper counts as gone once all its
    threads have exited (its main thread shows as a zombie while the others still exit)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        threads = len(list(Path(f"/proc/{pid}/task").iterdir()))
    except (FileNotFoundError, ProcessLookupError):
        return False
    return fields[0] not in ("Z", "X") or threads > 1


def gone_within(pids: list[int], seconds: float) -> list[int]:
    """The pids still running after up to ``seconds`` (empty: all gone)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(running(pid) for pid in pids):
            return []
        time.sleep(0.1)
    return [pid for pid in pids if running(pid)]


def children() -> set[int]:
    """This process's child processes, running ones."""
    found: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        text = (task / "children").read_text()
        found |= {int(pid) for pid in text.split()}
    return {pid for pid in found if running(pid)}


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.save_tiny(tiny.build_tiny_sd(), tmp_path_factory.mktemp("pipeline") / "tiny-sd")


def stock_pipe(folder: Path) -> tuple[object, torch.Tensor]:
    """The user's own diffusers ``pipe()`` on the folder, as a user runs it: at torch's
    default thread count. Its picture and its latent."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    out = {}
    with default_threads(), torch.no_grad():
        for output_type in ("pil", "latent"):
            out[output_type] = pipe(
                PROMPT,
                num_inference_steps=STEPS,
                generator=torch.Generator().manual_seed(SEED),
                output_type=output_type,
                **tiny.SD_CALL_KWARGS,
            ).images
    return out["pil"][0], out["latent"]


def test_a_pipeline_returns_pipe_images_and_reuses_its_workers(tiny_sd):
    expected, expected_latent = stock_pipe(tiny_sd)
    # The workers at torch's default thread count too (ChordsPipeline's default), as the
    # user's pipe() ran: then core 1 is that pipe()'s output bit for bit. (Two such workers
    # oversubscribe a 2-core machine, so these calls take seconds; the close and SIGKILL tests
    # below use one thread.)
    with ChordsPipeline.from_pretrained(tiny_sd, devices=["cpu"] * 2, cores=4) as pipe:
        pids = pipe.pids
        assert len(pids) == 3  # a broker and one worker per device
        landed: list = []
        out = pipe(
            PROMPT,
            num_inference_steps=STEPS,
            seed=SEED,
            on_hit=landed.append,
            with_latents=True,
            **tiny.SD_CALL_KWARGS,  # height, width, guidance_scale: diffusers' meaning
        )
        # every core's hit, as it landed (the fastest first), each with its decoded picture
        assert [h.core for h in out.hits] == [h.core for h in landed]
        assert sorted(h.core for h in out.hits) == [0, 1, 2, 3, 4] and out.cores == 4
        assert [h.round for h in out.hits] == sorted(h.round for h in out.hits)
        assert all(h.media is not None and h.media.dtype == torch.uint8 for h in out.hits)
        # the returned hit is core 1: the sequential solve, the user's own pipe() bit for bit
        assert out.returned is not None and out.returned.core == 1
        assert out.returned.speedup == 1.0
        assert torch.equal(out.returned.latent, expected_latent)
        assert np.array_equal(np.asarray(out.images[0]), np.asarray(expected))
        # ... and the image is the engine's own decoding of core 1's hit
        assert np.array_equal(np.asarray(out.images[0]), out.returned.media.numpy())
        assert out.frames is None and out.first_hit_s is not None

        async def again():  # the async form, and a coroutine callback
            seen = []

            async def note(hit):
                seen.append(hit.core)

            result = await pipe.agenerate(
                PROMPT, num_inference_steps=STEPS, seed=SEED, on_hit=note, **tiny.SD_CALL_KWARGS
            )
            return result, seen

        second, seen = asyncio.run(again())
        assert pipe.pids == pids and all(running(pid) for pid in pids.values())  # reused
        assert seen == [h.core for h in second.hits] and second.returned.latent is None
        assert np.array_equal(np.asarray(second.images[0]), np.asarray(expected))
        with pytest.raises(InvalidRequest, match="pass seed="):
            pipe(PROMPT, generator=torch.Generator())
    assert gone_within(list(pids.values()), 30) == []  # the end of the with block stopped them
    with pytest.raises(PipelineClosed, match="from_pretrained"):
        pipe(PROMPT)


def test_close_stops_the_daemons_and_a_call_after_it_is_refused():
    pipe = ChordsPipeline.from_pretrained("synthetic", devices=["cpu"], cores=2, threads=1)
    pids = list(pipe.pids.values())
    out = pipe(num_inference_steps=8, output_type="latent")  # synthetic: no prompt, no decode
    assert out.returned is not None and out.returned.core == 1 and out.images is not None
    os.kill(pipe.pids["broker"], signal.SIGKILL)  # a broker that died under the pipeline
    assert gone_within([pipe.pids["broker"]], 10) == []
    with pytest.raises(PipelineError, match="chords-broker of this pipeline exited with -9"):
        pipe(num_inference_steps=8, output_type="latent")
    assert running(pipe.pids["worker0"])
    pipe.close()
    assert gone_within(pids, 30) == []
    pipe.close()  # again: nothing to do
    with pytest.raises(PipelineClosed):
        pipe(num_inference_steps=8, output_type="latent")


HOLDER = """
import json, sys, threading, time
from chords_mq import ChordsPipeline
made = []
# started from a thread that ends at once: the daemons must outlive it
thread = threading.Thread(
    target=lambda: made.append(ChordsPipeline.from_pretrained("synthetic", devices=["cpu"],
                                                             cores=2, threads=1)))
thread.start()
thread.join()
pipe = made[0]
out = pipe(num_inference_steps=8, output_type="latent")
print(json.dumps({"pids": list(pipe.pids.values()), "cores": [h.core for h in out.hits]}),
      flush=True)
time.sleep(300)
"""


def test_sigkill_of_the_process_holding_a_pipeline_leaves_no_daemon():
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLDER)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        line = holder.stdout.readline()  # bounded: the holder's start-up fails or prints
        assert line, f"the holder exited with {holder.wait(30)}"
        report = json.loads(line)
        assert sorted(report["cores"]) == [0, 1, 2]  # served after its thread ended
        pids = report["pids"]
        assert all(running(pid) for pid in pids)
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        assert gone_within(pids, 30) == []
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)


def test_a_worker_that_cannot_serve_the_folder_fails_the_start_naming_it(tmp_path):
    folder = tmp_path / "kandinsky"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    before = children()
    with pytest.raises(PipelineStartError) as failed:
        ChordsPipeline.from_pretrained(folder, devices=["cpu"], start_timeout=120)
    error = failed.value
    assert error.process == "chords-worker 0 on cpu" and error.returncode == 2
    first = str(error).splitlines()[0]
    assert first.startswith("chords-worker 0 on cpu exited with 2 while the pipeline started: ")
    assert "no adapter serves the pipeline class KandinskyPipeline" in first
    assert "KandinskyPipeline" in error.log_tail
    assert children() - before == set()  # the broker was stopped too
    with pytest.raises(ModelPathError, match=r"no model_index\.json"):  # at once, no daemons
        ChordsPipeline.from_pretrained(tmp_path, devices=["cpu"])


def test_a_start_past_its_timeout_says_so_and_leaves_no_process():
    before = children()
    with pytest.raises(PipelineStartError) as failed:
        ChordsPipeline.from_pretrained("digits", devices=["cpu"], start_timeout=0.2)
    assert str(failed.value).startswith("0 of 1 worker(s) registered in 0.2s (start_timeout=)")
    assert "chords-worker 0 on cpu: " in str(failed.value)
    assert children() - before == set()
