"""``chords-calibrate``: measure how far one evaluation's result on one device (or CPU kernel
setting) is from another's, per model and dtype, and turn that into the tolerance the broker
compares results of workers of different device classes with (``broker.tolerance``).

The model loads exactly as ``chords-worker --model`` loads it (``workers.models.load_model``).
A sequential solve runs on the reference side; at every step i the other side evaluates the
reference's own input x_i (``workers.models.base.evaluate``, as a worker runs a task), so each
distance (``algorithms.distance``) is one evaluation's, never an accumulated drift. For each
dtype the table gives the max and p99 (nearest rank) of max_rel and rms_rel over the
evaluations, and the tolerance to pass: ``safety x`` the measured max, at least ``floor``, and
strictly below the smallest distance at which a ``--fault scale:F`` worker (its model outputs
times F; also a result times F) differs from the reference at any step, so such a worker is
caught at every evaluation. Where the noise leaves no such tolerance, none is suggested for
that dtype and the output says why.

A side is ``DEVICE[:SETTING...]``: DEVICE ``cpu``, ``cuda[:N]`` or ``mps``; SETTING
``threads=N`` (``torch.set_num_threads``), ``mkldnn=off`` (oneDNN off: other convolution
kernels) or, on ``--against cpu`` only, ``capability=NAME`` (``ATEN_CPU_CAPABILITY``: other
vector kernels, as on another CPU; torch reads it at start-up, so that side's evaluations run
in a child process, its tensors passed through files read with ``weights_only``). Measured
here (2-core AVX512 CPU, torch 2.13.0+cpu, 20 steps; ``benchmarks/calibrate_cpu.sh``):
tests/tiny_pipelines.py's Stable Diffusion differs under all three in float32 (max_rel
4.3e-7 threads=1, 3.3e-7 mkldnn=off, 3.1e-7 capability=default) and under the last two in
bfloat16 (5.7e-3, 8.9e-3); the digits model only under another capability (1.0e-7 against
capability=default): its tiny convolutions give the same bits at any thread count and without
oneDNN.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import torch

from chords_mq import __version__
from chords_mq.algorithms.distance import distance
from chords_mq.apps.options import parse_params
from chords_mq.broker.tolerance import (
    CALIBRATION_FORMAT,
    DEFAULT_TOLERANCES,
    Tolerances,
    calibration_entries,
)
from chords_mq.errors import ChordsError
from chords_mq.request import RequestSpec
from chords_mq.workers.faults import ScaledOutputs
from chords_mq.workers.models import ModelAdapter, load_model, source_options
from chords_mq.workers.models.base import Prepared, evaluate

DTYPES = ("float32", "bfloat16", "float16")
MAX_STEPS = 1000
_DEVICE = re.compile(r"^(cpu|mps|cuda(:[0-9]{1,3})?)$")
_CAPABILITY = re.compile(r"^[a-z0-9_]{1,16}$")  # torch's: default, avx2, avx512, ...
CHILD_TIMEOUT_S = 3600  # a capability=NAME side's process, at most


class CalibrationError(ChordsError, ValueError):
    """A bad ``--device``/``--against``, a dtype the model does not give, a failed evaluation."""


@dataclass(frozen=True)
class Side:
    """One side of a calibration: a torch device and the CPU kernel settings it runs with."""

    device: str
    threads: int | None = None
    mkldnn: bool | None = None
    capability: str | None = None  # ATEN_CPU_CAPABILITY: evaluated in a child process

    @property
    def label(self) -> str:
        parts = [self.device]
        if self.threads is not None:
            parts.append(f"threads={self.threads}")
        if self.mkldnn is not None:
            parts.append(f"mkldnn={'on' if self.mkldnn else 'off'}")
        if self.capability is not None:
            parts.append(f"capability={self.capability}")
        return ":".join(parts)


def parse_side(text: str) -> Side:
    """``DEVICE[:threads=N][:mkldnn=on|off][:capability=NAME]`` as a Side; CalibrationError
    otherwise."""
    parts = text.strip().split(":")
    device_parts = [part for part in parts if "=" not in part]
    settings = [part for part in parts if "=" in part]
    device = ":".join(device_parts)
    usage = (
        f"{text!r}: expected DEVICE[:threads=N][:mkldnn=on|off][:capability=NAME], DEVICE cpu, "
        "cuda[:N] or mps"
    )
    if not _DEVICE.match(device):
        raise CalibrationError(usage)
    threads: int | None = None
    mkldnn: bool | None = None
    capability: str | None = None
    for setting in settings:
        key, _, value = setting.partition("=")
        if key == "threads" and value.isdigit() and 1 <= int(value) <= 1024:
            threads = int(value)
        elif key == "mkldnn" and value in ("on", "off"):
            mkldnn = value == "on"
        elif key == "capability" and device == "cpu" and _CAPABILITY.match(value):
            capability = value
        else:
            raise CalibrationError(f"{usage}; {setting!r} is not one")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CalibrationError(f"{text!r}: CUDA is not available on this machine")
    if device == "mps" and not torch.backends.mps.is_available():
        raise CalibrationError(f"{text!r}: MPS is not available on this machine")
    return Side(device, threads, mkldnn, capability)


@contextlib.contextmanager
def applied(side: Side) -> Iterator[None]:
    """Run the block with ``side``'s CPU settings, the process's own restored after."""
    threads = torch.get_num_threads()
    try:
        with contextlib.ExitStack() as stack:
            if side.threads is not None:
                torch.set_num_threads(side.threads)
            if side.mkldnn is not None:
                stack.enter_context(torch.backends.mkldnn.flags(enabled=side.mkldnn))
            yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class DtypeReport:
    """One dtype's measurement: per evaluation (max_rel, rms_rel) against the other side, and
    the distance a scale:F fault would give there; then the suggested tolerance or why none."""

    dtype: str
    distances: list[tuple[float, float]] = field(default_factory=list)
    fault: list[float] = field(default_factory=list)
    tolerance: float | None = None
    refused: str | None = None
    ceiling_at: float = math.inf  # what suggest() held the tolerance below

    @property
    def noise(self) -> float:
        """The largest distance measured (max over evaluations of max_rel and rms_rel)."""
        return max((max(pair) for pair in self.distances), default=0.0)

    def catches(self, tolerance: float) -> int:
        """At how many evaluations a scale:F fault is beyond ``tolerance`` (caught)."""
        return sum(fault > tolerance for fault in self.fault)

    def ceiling(self, catch_at: float) -> float:
        """The distance a tolerance must stay below for a scale:F fault to be caught at
        ``catch_at`` of the evaluations or more: the fault's k-th smallest distance, k the
        evaluations it may escape at plus one."""
        ordered = sorted(self.fault)
        if not ordered:
            return math.inf
        escape = len(ordered) - math.ceil(catch_at * len(ordered))
        return ordered[escape]

    def summary(self) -> dict[str, Any]:
        max_rel = [pair[0] for pair in self.distances]
        rms_rel = [pair[1] for pair in self.distances]
        return {
            "evaluations": len(self.distances),
            "max_rel": {"max": max(max_rel), "p99": p99(max_rel)},
            "rms_rel": {"max": max(rms_rel), "p99": p99(rms_rel)},
            "fault": {"min": min(self.fault), "median": statistics.median(self.fault)},
            "default": DEFAULT_TOLERANCES.get(self.dtype),
            "default_catches": self.catches(DEFAULT_TOLERANCES.get(self.dtype, math.inf)),
            "tolerance": self.tolerance,
            "refused": self.refused,
            "per_evaluation": [[a, b, f] for (a, b), f in zip(self.distances, self.fault)],
        }


def p99(values: Sequence[float]) -> float:
    """The 99th percentile, nearest rank (the max below 100 values)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def floor_of(dtype: str) -> float:
    """The default least tolerance: 4 units in the last place of ``dtype`` at 1."""
    return 4 * float(torch.finfo(getattr(torch, dtype)).eps)


def suggest(
    report: DtypeReport, safety: float, floor: float, catch: float, catch_at: float
) -> None:
    """Set ``report.tolerance`` (safety x noise, at least floor, below the ceiling that
    catches scale:``catch`` at ``catch_at`` of the evaluations) or ``report.refused``."""
    noise, ceiling = report.noise, report.ceiling(catch_at)
    report.ceiling_at = ceiling
    where = f"at {catch_at:.0%} of the evaluations"
    if ceiling == 0:
        report.refused = (
            f"scale:{catch} gives the same {report.dtype} results as the reference at more "
            f"than {1 - catch_at:.0%} of the evaluations ({catch} may round to 1 in "
            f"{report.dtype}): no tolerance catches it {where}"
        )
        return
    if not all(math.isfinite(value) for pair in report.distances for value in pair):
        report.refused = "a distance is not finite (NaN, Inf or a shape that differs)"
        return
    if noise >= ceiling:
        report.refused = (
            f"the measured noise {noise:.3g} is too large to catch scale:{catch} {where} "
            f"(it differs by {ceiling:.3g} or less at the others)"
        )
        return
    rel = max(safety * noise, floor)
    if rel >= ceiling:
        report.refused = (
            f"{safety:g} x the noise {noise:.3g} (or the floor {floor:.3g}) reaches "
            f"{ceiling:.3g}: a tolerance there would let scale:{catch} pass at more than "
            f"{1 - catch_at:.0%} of the evaluations"
        )
        return
    report.tolerance = float(f"{rel:.3g}")


def _request(
    model: str, name: str, dtype: str, steps: int, seed: int, params: dict[str, Any]
) -> RequestSpec:
    extra = {"dtype": dtype} if model == "synthetic" else {}
    try:
        return RequestSpec(
            model=name, method="sequential", steps=steps, seed=seed, params={**params, **extra}
        )
    except ValueError as exc:
        raise CalibrationError(str(exc)) from None


def _step(adapter: ModelAdapter, prepared: Prepared, x: torch.Tensor, i: int) -> torch.Tensor:
    return evaluate(adapter, prepared.context, prepared.solver, [x], [i], [(i + 1,)])[0][i + 1]


def calibrate(
    adapter: ModelAdapter,
    load: Callable[[str], ModelAdapter],
    request: RequestSpec,
    reference: Side,
    against: Side,
    dtype: str,
    catch: float,
    elsewhere: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
) -> DtypeReport:
    """Measure one dtype: ``adapter`` (on the reference's device) solves ``request``
    sequentially, and the other side (the same adapter, else ``load(device)``'s, else
    ``elsewhere``: another process) evaluates each step from the reference's input."""
    report = DtypeReport(dtype)
    inputs, results = [], []
    with applied(reference):
        prepared = adapter.prepare(request)
        faulty = ScaledOutputs(adapter, catch)
        x = prepared.x0
        for i in range(request.steps):
            result = _step(adapter, prepared, x, i)
            if str(result.dtype).removeprefix("torch.") != dtype:
                raise CalibrationError(
                    f"{request.model} gives {str(result.dtype).removeprefix('torch.')} results, "
                    f"not {dtype} (digits is float32 only; a pipeline loads in the dtype asked)"
                )
            scaled_out = _step(faulty, prepared, x, i)
            scaled_result = result * torch.tensor(catch, dtype=result.dtype)
            report.fault.append(
                min(max(distance(result, scaled_out)), max(distance(result, scaled_result)))
            )
            inputs.append(x)
            results.append(result)
            x = result
    if elsewhere is not None:
        outputs = elsewhere(inputs)
        report.distances = [distance(a, b) for a, b in zip(results, outputs)]
        return report
    if against.device != reference.device:
        del adapter, prepared, faulty
        adapter = load(against.device)
    with applied(against):
        if against.device != reference.device:
            prepared = adapter.prepare(request)
        for i, (x, result) in enumerate(zip(inputs, results)):
            report.distances.append(distance(result, _step(adapter, prepared, x, i)))
    return report


def _local(side: Side) -> Side:
    """``side`` without its capability: what its child process runs in-process."""
    return Side(side.device, side.threads, side.mkldnn)


def _in_child(
    argv: list[str], capability: str
) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """The other side's evaluations in a child ``chords-calibrate --evaluate-inputs`` under
    ``ATEN_CPU_CAPABILITY=capability`` (torch reads it once, at start-up); tensors go through
    files that ``torch.load(weights_only=True)`` reads (no pickled objects)."""

    def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        with tempfile.TemporaryDirectory(prefix="chords-calibrate-") as folder:
            given, back = Path(folder) / "inputs.pt", Path(folder) / "outputs.pt"
            torch.save(inputs, given)
            command = [sys.executable, "-m", "chords_mq.apps.calibrate", *argv]
            command += ["--evaluate-inputs", str(given), "--out", str(back)]
            env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
            try:
                done = subprocess.run(
                    command, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S
                )
            except subprocess.TimeoutExpired:
                raise CalibrationError(
                    f"capability={capability}: the child ran past {CHILD_TIMEOUT_S} s"
                ) from None
            if done.returncode != 0:
                tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
                raise CalibrationError(f"capability={capability}: the child failed: {tail[0]}")
            answer = torch.load(back, weights_only=True)
        ran = str(answer.get("capability", "")).lower()
        if ran != capability.lower():
            raise CalibrationError(
                f"capability={capability}: torch ran {ran or 'an unknown capability'} instead "
                "(this CPU or torch build lacks it)"
            )
        outputs = answer.get("outputs")
        if not isinstance(outputs, list) or len(outputs) != len(inputs):
            raise CalibrationError(f"capability={capability}: the child gave no outputs")
        return outputs

    return run


def _evaluate_inputs(
    model: str,
    name: str | None,
    family: str | None,
    registry: str | None,
    scheduler: str | None,
    dtype: str,
    side: Side,
    steps: int,
    seed: int,
    params: dict[str, Any],
    inputs_file: str,
    out: str | None,
) -> None:
    """The child's part: load the model as the parent did, evaluate input i at step i."""
    if out is None:
        raise click.UsageError("--evaluate-inputs needs --out")
    try:
        _entry, adapter = load_model(
            model,
            side.device,
            registry=registry,
            dtype=None if model == "synthetic" else dtype,
            family=family,
            scheduler=scheduler,
        )
        request = _request(model, name or model, dtype, steps, seed, params)
        inputs = torch.load(inputs_file, weights_only=True)
        if not isinstance(inputs, list) or len(inputs) > steps:
            raise CalibrationError(f"{inputs_file}: not a list of at most {steps} latents")
        with applied(side):
            prepared = adapter.prepare(request)
            outputs = [_step(adapter, prepared, x, i) for i, x in enumerate(inputs)]
    except (ValueError, OSError, AttributeError) as exc:
        raise click.UsageError(str(exc)) from None
    capability = torch.backends.cpu.get_cpu_capability()
    torch.save({"outputs": outputs, "capability": capability}, out)


def _table(reports: Sequence[DtypeReport]) -> str:
    head = (
        "dtype",
        "evals",
        "max_rel max",
        "max_rel p99",
        "rms_rel max",
        "rms_rel p99",
        "ceiling",
        "tolerance",
    )
    rows = [head]
    for report in reports:
        s = report.summary()
        rows.append(
            (
                report.dtype,
                str(s["evaluations"]),
                f"{s['max_rel']['max']:.3g}",
                f"{s['max_rel']['p99']:.3g}",
                f"{s['rms_rel']['max']:.3g}",
                f"{s['rms_rel']['p99']:.3g}",
                f"{report.ceiling_at:.3g}",
                "refused" if report.tolerance is None else f"{report.tolerance:.3g}",
            )
        )
    widths = [max(len(row[col]) for row in rows) for col in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--model",
    default="digits",
    show_default=True,
    help="synthetic, digits[:PATH], or a local diffusers pipeline folder (as chords-worker).",
)
@click.option("--name", default=None, help="The model's served name (default: as the worker's).")
@source_options
@click.option(
    "--scheduler",
    default=None,
    metavar="NAME",
    help="A diffusers scheduler class instead of the folder's (as chords-worker).",
)
@click.option(
    "--dtype",
    "dtypes",
    type=click.Choice(DTYPES),
    multiple=True,
    help="A dtype to calibrate (repeat; default float32).",
)
@click.option(
    "--device",
    "device",
    default="cpu",
    show_default=True,
    help="The reference side: DEVICE[:threads=N][:mkldnn=on|off], DEVICE cpu, cuda[:N] or mps.",
)
@click.option(
    "--against",
    default="cpu:threads=1",
    show_default=True,
    help="The other side, the same form (e.g. cpu against cuda; on a CPU-only "
    "machine another kernel setting).",
)
@click.option(
    "--steps",
    type=click.IntRange(1, MAX_STEPS),
    default=20,
    show_default=True,
    help="Steps of the sequential solve: one evaluation each.",
)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--param",
    "-p",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="A model parameter of the request (repeat), e.g. prompt='a cat'.",
)
@click.option(
    "--safety",
    type=click.FloatRange(min=1),
    default=10.0,
    show_default=True,
    help="The tolerance is this many times the largest distance measured.",
)
@click.option(
    "--floor",
    type=click.FloatRange(min=0),
    default=None,
    help="The least tolerance (default: 4 units in the last place of the dtype at 1).",
)
@click.option(
    "--catch",
    type=click.FloatRange(min=1, min_open=True),
    default=1.001,
    show_default=True,
    help="The tolerance must catch a worker whose outputs are scaled by this.",
)
@click.option(
    "--catch-at",
    type=click.FloatRange(0.5, 1),
    default=0.75,
    show_default=True,
    help="...at this fraction of the evaluations or more (a few steps, e.g. the last, barely "
    "move with the output).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the measurement as JSON (chords-broker --verify-tolerance @FILE).",
)
@click.option("--evaluate-inputs", type=click.Path(dir_okay=False), default=None, hidden=True)
@click.version_option(__version__, prog_name="chords-calibrate")
def main(
    model: str,
    name: str | None,
    family: str | None,
    registry: str | None,
    scheduler: str | None,
    dtypes: tuple[str, ...],
    device: str,
    against: str,
    steps: int,
    seed: int,
    params: tuple[str, ...],
    safety: float,
    floor: float | None,
    catch: float,
    catch_at: float,
    out: str | None,
    evaluate_inputs: str | None,
) -> None:
    """Measure one evaluation's distance between two devices (or CPU settings) for a model,
    per dtype, and print the --verify-tolerance value for chords-broker."""
    try:
        reference, other = parse_side(device), parse_side(against)
    except CalibrationError as exc:
        raise click.UsageError(str(exc)) from None
    if reference.capability is not None:
        raise click.UsageError("capability=NAME applies to --against only (a child process)")
    if evaluate_inputs is not None:  # the child of a capability=NAME side
        loading = (model, name, family, registry, scheduler, (dtypes or ("float32",))[0])
        request_of = (reference, steps, seed, parse_params(params))
        _evaluate_inputs(*loading, *request_of, evaluate_inputs, out)
        return
    if reference == other:
        raise click.UsageError(f"--device and --against are the same ({reference.label})")
    request_params = parse_params(params)
    reports = []
    served = name
    for dtype in dtypes or ("float32",):

        def load(where: str, dtype: str = dtype) -> ModelAdapter:
            nonlocal served
            try:
                entry, adapter = load_model(
                    model,
                    where,
                    registry=registry,
                    dtype=None if model == "synthetic" else dtype,
                    family=family,
                    scheduler=scheduler,
                )
            except (ValueError, OSError, AttributeError) as exc:
                raise click.UsageError(str(exc)) from None
            served = served or entry.name
            return adapter

        try:
            adapter = load(reference.device)
            request = _request(model, served or model, dtype, steps, seed, request_params)
            elsewhere = None
            if other.capability is not None:
                argv = ["--model", model, "--name", request.model, "--steps", str(steps)]
                argv += ["--seed", str(seed), "--dtype", dtype, "--device", _local(other).label]
                for option, given in (("--family", family), ("--registry", registry)):
                    argv += [option, given] if given is not None else []
                argv += ["--scheduler", scheduler] if scheduler is not None else []
                argv += [arg for param in params for arg in ("-p", param)]
                elsewhere = _in_child(argv, other.capability)
            report = calibrate(adapter, load, request, reference, other, dtype, catch, elsewhere)
            del adapter
        except (CalibrationError, ValueError) as exc:
            raise click.UsageError(str(exc)) from None
        suggest(report, safety, floor_of(dtype) if floor is None else floor, catch, catch_at)
        reports.append(report)
    assert served is not None
    tolerances = {r.dtype: r.tolerance for r in reports if r.tolerance is not None}
    value = ",".join(f"{served}:{dtype}={rel!r}" for dtype, rel in tolerances.items())
    click.echo(
        f"{served}: one evaluation on {reference.label} against {other.label}, "
        f"{steps} steps, seed {seed}"
    )
    click.echo(_table(reports))
    for report in reports:
        if report.refused:
            click.echo(f"{report.dtype}: no tolerance suggested: {report.refused}")
        default = DEFAULT_TOLERANCES.get(report.dtype)
        if default is not None:
            click.echo(
                f"{report.dtype}: the default tolerance {default:g} catches scale:{catch} at "
                f"{report.catches(default)} of {len(report.fault)} evaluations"
            )
    if value:
        Tolerances.parse(value)  # what the broker will parse
        click.echo(f"chords-broker --verify-tolerance {value}")
    if out is not None:
        data = {
            "format": CALIBRATION_FORMAT,
            "model": served,
            "reference": reference.label,
            "against": other.label,
            "steps": steps,
            "seed": seed,
            "params": request_params,
            "safety": safety,
            "floor": {r.dtype: floor_of(r.dtype) if floor is None else floor for r in reports},
            "catch": catch,
            "catch_at": catch_at,
            "torch": torch.__version__,
            "dtypes": {r.dtype: r.summary() for r in reports},
            "tolerances": tolerances,
            "refused": {r.dtype: r.refused for r in reports if r.refused},
            "verify_tolerance": value,
        }
        text = json.dumps(data, indent=1, default=str)
        if tolerances:
            calibration_entries(text.encode(), out)  # the broker reads it back
        try:
            Path(out).write_text(text + "\n")
        except OSError as exc:
            raise click.ClickException(f"--out {out}: {exc.strerror or exc}") from None
        click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
