"""Golden hits: the bits every plan produced on CPU before the engine-core redesign.

Twenty-two fixed requests (``CASES``: sequential, CHORDS, SRDS, Parareal and ParaDIGMS plans on
the synthetic and digits models and on tiny SD, Flux, CogVideoX and Wan pipelines) are run
in-process, the adapter's own velocity at one torch thread as the test suite runs; for every hit
``tests/data/golden_hits.json`` holds its core, round, dtype, shape and the SHA-256 of its bytes.
``tests/test_golden_hits.py`` recomputes every case with today's code and requires the same
hits, bit for bit.

The bits come from the recording commit (``RECORDING_COMMIT``: landed main ``RECORDED_AT``, from
before solver steps moved to the workers, plus the script that recorded), never from today's
code. Because torch's CPU kernels round differently from one machine to the next (the vector
ISA, AMX, AVX512-FP16, oneDNN's choices), the hits are kept per machine, keyed by the machine's
kernel fingerprint (``tests/kernel_fingerprint.py``: digests of the ops the cases use)::

    {"recorded_at": RECORDED_AT, "recording_commit": RECORDING_COMMIT,
     "machines": {fingerprint_id: {"fingerprint": {op: sha256}, "torch", "cpu_capability",
                                   "cpu", "cpu_flags", "recorded_on", ..., "cases": {...}}},
     "unkeyed": {"note", ..., "cases": {...}}}

A machine whose fingerprint is recorded compares every case; any other machine skips, naming
the ops whose digests differ from the nearest recorded machine (``select_machine``). The hits of
the first recording (an AVX512 machine whose fingerprint was never taken) are kept under
``unkeyed`` and never compared.

``python -m tests.golden_hits --record-machine`` (through ``deploy/dev.sh``) records this
machine: it checks out the recording commit in a temporary git worktree, runs that commit's own
``python -m tests.golden_hits`` there (its ``chords_mq``, ``broker``, ``workers`` and ``tests``
shadow this checkout's, which the child checks), and files the hits it wrote under this
machine's fingerprint in this checkout's ``tests/data/golden_hits.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from chords_mq.local import run_tasks
from chords_mq.request import RequestSpec
from tests.kernel_fingerprint import (
    cpu_flags,
    cpu_model,
    digest,
    fingerprint_id,
    kernel_fingerprint,
    nearest,
)

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "data" / "golden_hits.json"
# Landed main before the engine-core redesign: the code every recorded hit comes from.
RECORDED_AT = "5c854de7e1206491505f295d5133c9b69edebdf7"
# RECORDED_AT plus the recording script (tests/golden_hits.py) and its first data: only those
# three files differ, which record_machine checks before it runs the script.
RECORDING_COMMIT = "234dc4856394b69a73b317f1f33e90efbb60bd07"
RECORDING_FILES = {
    "tests/data/golden_hits.json",
    "tests/golden_hits.py",
    "tests/test_golden_hits.py",
}
RECORD_COMMAND = "deploy/dev.sh python -m tests.golden_hits --record-machine"

SYNTHETIC_F32 = {"shape": [4, 16, 16], "dtype": "float32"}
SYNTHETIC_BF16 = {"shape": [2, 8, 8], "dtype": "bfloat16"}
SYNTHETIC_F64 = {"shape": [64], "dtype": "float64"}
PROMPT = "a photo of a cat"

# (case name, model, request fields). Pipeline models name a tiny_pipelines family.
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("seq-f32", "synthetic", {"method": "sequential", "steps": 20, "params": SYNTHETIC_F32}),
    ("chords-k4-f32", "synthetic", {"cores": 4, "steps": 50, "params": SYNTHETIC_F32}),
    ("chords-k8-f32", "synthetic", {"cores": 8, "steps": 50, "params": SYNTHETIC_F32, "seed": 3}),
    ("chords-k6-n25-f32", "synthetic", {"cores": 6, "steps": 25, "params": SYNTHETIC_F32}),
    (
        "chords-gaps1-f32",
        "synthetic",
        {"init_sequence": [0, 1, 2, 3], "steps": 10, "params": SYNTHETIC_F32},
    ),
    (
        "chords-k8-stop-f64",
        "synthetic",
        {"cores": 8, "steps": 50, "stop": "residual:1e-3", "params": SYNTHETIC_F64},
    ),
    ("chords-k4-bf16", "synthetic", {"cores": 4, "steps": 20, "params": SYNTHETIC_BF16}),
    (
        "srds-k4-f32",
        "synthetic",
        {"method": "srds", "cores": 4, "steps": 49, "params": SYNTHETIC_F32},
    ),
    (
        "parareal-k4-f32",
        "synthetic",
        {"method": "srds-parareal", "cores": 4, "steps": 50, "params": SYNTHETIC_F32},
    ),
    (
        "parareal-k3-bf16",
        "synthetic",
        {"method": "srds-parareal", "cores": 3, "steps": 16, "params": SYNTHETIC_BF16},
    ),
    (
        "paradigms-k4-f32",
        "synthetic",
        {"method": "paradigms", "cores": 4, "steps": 50, "params": SYNTHETIC_F32},
    ),
    (
        "paradigms-k8-tol0-f32",
        "synthetic",
        {"method": "paradigms", "cores": 8, "steps": 30, "tolerance": 0.0, "params": SYNTHETIC_F32},
    ),
    (
        "paradigms-k4-bf16",
        "synthetic",
        {"method": "paradigms", "cores": 4, "steps": 20, "params": SYNTHETIC_BF16},
    ),
    ("digits-chords-k4", "digits", {"cores": 4, "steps": 50, "params": {"prompt": "7"}}),
    (
        "digits-paradigms-k4",
        "digits",
        {"method": "paradigms", "cores": 4, "steps": 50, "params": {"prompt": "3"}},
    ),
    ("sd-chords-k4", "stable-diffusion", {"cores": 4, "steps": 12, "seed": 3}),
    (
        "sd-paradigms-k4",
        "stable-diffusion",
        {"method": "paradigms", "cores": 4, "steps": 12, "seed": 3},
    ),
    ("sd-bf16-chords-k4", "stable-diffusion:bfloat16", {"cores": 4, "steps": 12, "seed": 3}),
    ("flux-chords-k4", "flux", {"cores": 4, "steps": 12, "seed": 3}),
    ("flux-parareal-k3", "flux", {"method": "srds-parareal", "cores": 3, "steps": 9, "seed": 3}),
    ("cogvideox-chords-k4", "cogvideox", {"cores": 4, "steps": 12, "seed": 3}),
    ("wan-bf16-chords-k4", "wan:bfloat16", {"cores": 4, "steps": 12, "seed": 3}),
]


def describe(hits: list[Any]) -> list[dict[str, Any]]:
    return [
        {
            "core": h.core,
            "round": h.round,
            "dtype": str(h.latent.dtype).removeprefix("torch."),
            "shape": list(h.latent.shape),
            "sha256": digest(h.latent),
        }
        for h in hits
    ]


def family_call_kwargs(family: str) -> dict[str, Any]:
    from tests import tiny_pipelines as tiny

    return {
        "flux": tiny.FLUX_CALL_KWARGS,
        "stable-diffusion": tiny.SD_CALL_KWARGS,
        "cogvideox": tiny.COGVIDEOX_CALL_KWARGS,
        "wan": tiny.WAN_CALL_KWARGS,
    }[family]


def load_model(model: str, folders: dict[str, Path]) -> Any:
    """The adapter for a case's model name (pipelines are saved once per family)."""
    from chords_mq.workers.models import load_adapter
    from tests import tiny_pipelines as tiny

    if model in ("synthetic", "digits"):
        return load_adapter(model, "cpu")
    family, _, dtype = model.partition(":")
    builders: dict[str, Callable[[], Any]] = {
        "flux": tiny.build_tiny_flux,
        "stable-diffusion": tiny.build_tiny_sd,
        "cogvideox": tiny.build_tiny_cogvideox,
        "wan": tiny.build_tiny_wan,
    }
    if family not in folders:
        folders[family] = tiny.save_tiny(builders[family](), folders["root"] / family)
    return load_adapter(str(folders[family]), "cpu", dtype=getattr(torch, dtype) if dtype else None)


def spec_for(model: str, fields: dict[str, Any]) -> RequestSpec:
    fields = dict(fields)
    family = model.partition(":")[0]
    if family not in ("synthetic", "digits"):
        fields["params"] = {"prompt": PROMPT, **family_call_kwargs(family)}
    return RequestSpec(model=family, **fields)


def run_case(adapter: Any, spec: RequestSpec) -> list[Any]:
    """The case's hits in-process, each task evaluated as a worker evaluates it.

    (Landed main, which recorded the file, ran ``simulate(plan, velocity)`` with the solver in
    the plan; the tasks now carry targets and the solver runs next to the model.)
    """
    from chords_mq.workers.models.base import in_process

    prepared = adapter.prepare(spec)
    plan = spec.build_plan(prepared.x0, prepared.solver)
    return list(run_tasks(plan, in_process(adapter, prepared)).hits)


def select_machine(
    recorded: dict[str, Any], fingerprint: dict[str, str]
) -> tuple[dict[str, Any] | None, str]:
    """The recorded machine whose kernels are this fingerprint's, or None and why not.

    ``recorded`` is the golden file's content. A machine is selected when its key and its
    fingerprint are this one's; all its cases are then compared (a case missing from it fails,
    it does not skip). Otherwise the reason names the recorded machine with the fewest ops
    differing from this fingerprint, those ops, and the command that records this machine.
    """
    machines: dict[str, dict[str, Any]] = recorded.get("machines", {})
    key = fingerprint_id(fingerprint)
    entry = machines.get(key)
    if entry is not None and entry.get("fingerprint") == fingerprint:
        return entry, (
            f"kernel fingerprint {key} is recorded ({entry.get('cpu')}, "
            f"{entry.get('cpu_capability')}, torch {entry.get('torch')})"
        )
    close = nearest(fingerprint, {k: m.get("fingerprint", {}) for k, m in machines.items()})
    if close is None:
        where = "no machine is recorded"
    else:
        other, ops = close
        shown = ", ".join(ops[:10]) + (f" and {len(ops) - 10} more" if len(ops) > 10 else "")
        m = machines[other]
        where = (
            f"the nearest recorded machine, {other} ({m.get('cpu')}, {m.get('cpu_capability')}, "
            f"torch {m.get('torch')}), differs in {len(ops)} of {len(fingerprint)} ops: {shown}"
        )
    return None, (
        f"kernel fingerprint {key} of this machine is not recorded in {GOLDEN.name}: {where}; "
        f"record this machine's hits from the recording commit with: {RECORD_COMMAND}"
    )


def git(*args: str, cwd: Path = REPO) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


# Run in the recording commit's worktree: its packages must be the ones imported, not this
# checkout's (installed editable into the virtualenv); then its own recording script.
CHILD = """
import runpy, sys
from pathlib import Path
root = Path.cwd().resolve()
import broker, chords_mq, tests, workers
for module in (chords_mq, broker, workers, tests):
    where = Path(module.__file__).resolve()
    if root not in where.parents:
        sys.exit(f"{module.__name__} was imported from {where}, not from the tree of {root}")
    print(f"recording with {module.__name__} from {where.parent}", file=sys.stderr, flush=True)
runpy.run_module("tests.golden_hits", run_name="__main__", alter_sys=True)
"""


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def record_machine() -> str:
    """Record this machine's hits from the recording commit; return its fingerprint id."""
    started = time.monotonic()
    golden = json.loads(GOLDEN.read_text())
    if "machines" not in golden:
        raise SystemExit(f"{GOLDEN} is not keyed by machine (no 'machines')")
    git("cat-file", "-e", f"{RECORDING_COMMIT}^{{commit}}")
    changed = set(git("diff", "--name-only", RECORDED_AT, RECORDING_COMMIT).splitlines())
    if not changed <= RECORDING_FILES:
        raise SystemExit(f"{RECORDING_COMMIT} changes more than the recording script: {changed}")
    fingerprint = kernel_fingerprint()
    key = fingerprint_id(fingerprint)
    print(f"kernel fingerprint of this machine: {key} ({len(fingerprint)} ops)", file=sys.stderr)

    scratch = Path(tempfile.mkdtemp(prefix="golden-record-"))
    tree = scratch / "tree"
    try:
        git("worktree", "add", "--detach", str(tree), RECORDING_COMMIT)
        print(f"recording commit {RECORDING_COMMIT[:12]} checked out in {tree}", file=sys.stderr)
        env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
        done = subprocess.run([sys.executable, "-c", CHILD], cwd=tree, env=env, check=False)
        if done.returncode != 0:
            raise SystemExit(f"the recording commit's script failed (exit {done.returncode})")
        written = json.loads((tree / "tests" / "data" / "golden_hits.json").read_text())
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=False)
        subprocess.run(["git", "worktree", "prune"], cwd=REPO, check=False)
        shutil.rmtree(scratch, ignore_errors=True)

    mine = (written.get("recorded_at"), written.get("torch"), written.get("cpu_capability"))
    expected = (RECORDING_COMMIT, torch.__version__, torch.backends.cpu.get_cpu_capability())
    if mine != expected:
        raise SystemExit(f"the script recorded (commit, torch, capability) {mine}, not {expected}")
    cases = written["cases"]
    if sorted(cases) != sorted(name for name, _, _ in CASES):
        raise SystemExit(f"the recording commit's cases {sorted(cases)} are not today's")

    golden = json.loads(GOLDEN.read_text())  # again: another machine may have been filed since
    previous = golden["machines"].get(key)
    golden["recorded_at"] = RECORDED_AT
    golden["recording_commit"] = RECORDING_COMMIT
    golden["machines"][key] = {
        "fingerprint": fingerprint,
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "diffusers": package_version("diffusers"),
        "transformers": package_version("transformers"),
        "recorded_on": datetime.date.today().isoformat(),
        "cases": cases,
    }
    golden["machines"] = dict(sorted(golden["machines"].items()))
    GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")

    hits = sum(len(case["hits"]) for case in cases.values())
    print(f"machine {key}: {len(cases)} cases, {hits} hits filed in {GOLDEN}", file=sys.stderr)
    if previous is not None:
        same = sum(previous["cases"].get(name) == case for name, case in cases.items())
        print(
            f"  replaced its earlier record: {same} of {len(cases)} cases unchanged",
            file=sys.stderr,
        )
    unkeyed = golden.get("unkeyed", {}).get("cases", {})
    if unkeyed:
        same = sorted(name for name, case in cases.items() if unkeyed.get(name) == case)
        print(
            f"  {len(same)} of {len(cases)} cases equal the unkeyed first recording"
            f" ({golden['unkeyed'].get('cpu_capability')}): {', '.join(same) or 'none'}",
            file=sys.stderr,
        )
    print(f"done in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return key


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.golden_hits",
        description=(
            "Record this machine's golden hits from the recording commit "
            f"{RECORDING_COMMIT[:12]}, keyed by its kernel fingerprint. Today's code is "
            "never the source of recorded bits: tests/test_golden_hits.py compares it."
        ),
    )
    parser.add_argument(
        "--record-machine",
        action="store_true",
        help="run the recording commit's script in a temporary worktree and file its hits",
    )
    args = parser.parse_args(argv)
    if not args.record_machine:
        parser.print_help(sys.stderr)
        raise SystemExit(2)
    record_machine()


if __name__ == "__main__":
    main()
