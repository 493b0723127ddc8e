"""How far apart two workers' results may be and still agree, when the two workers are of
different device classes (``workers.device_class``) and so cannot be compared bitwise
(``broker.verify`` compares digests within one class).

The worker that compares (``algorithms.distance``) reports two distances of its result
``a`` from the other's ``b``, both in float32 and relative to the larger of the two:

- ``max_rel``: max |a - b| / (max(max |a|, max |b|) + eps);
- ``rms_rel``: rms(a - b) / (max(rms(a), rms(b)) + eps).

The two agree when both are at most the tolerance for the request's model and the results'
dtype: ``--verify-tolerance [MODEL:]DTYPE=REL[,...]`` over ``DEFAULT_TOLERANCES``. A dtype
without a tolerance is never compared across classes (its result goes out unverified,
counted, as before). Sans-I/O, but for ``expand_files``/``read_calibration``, which
``chords-broker`` calls to read ``--verify-tolerance @FILE`` entries.

The defaults, against the repository's measured figures (``benchmarks/device_numerics.py``,
``benchmarks/results/device_numerics_h200.json``, docs/benchmarks.md "Diffusers pipelines on
the GPU"): there, CHORDS' final sample on an H200 differs from the same pipeline run on the
same GPU by at most 1.34e-5 in float32 (absolute, after 12 steps; the DDIM families, whose
scheduler arithmetic runs on the CPU) and by at most 0.875 in bfloat16 (Stable Diffusion; 0.625
SDXL, 0.039 CogVideoX, 0.031 Wan, 0 for Flux, SD3, HunyuanVideo). Those are absolute
differences of a whole run, not one evaluation's relative CPU-against-CUDA difference, which the
repository has not measured yet. So: float32 and float64 1e-4, above the float32 figure even
read as relative to a latent of magnitude 1 (x7), yet below a result scaled by 1.001 (about
1e-3 apart); bfloat16 and float16 0.05, about 13 bfloat16 ulps at the largest value (2**-8
each): one evaluation's rounding differences sit well inside it, zeros or a wrong sign do not.

Calibrating: ``chords-calibrate --model MODEL --dtype DTYPE --device cuda --against cpu
--out FILE`` (``chords_mq.apps.calibrate``) loads the model as ``chords-worker`` does, runs a
sequential solve on ``--device`` and evaluates each step's same input on ``--against``, and
prints max and p99 of both distances over the evaluations and the tolerance to pass:
10x the largest distance, at least 4 ulps of the dtype at 1, and below the distance at which
a ``--fault scale:1.001`` worker (model outputs x1.001) differs at 3/4 of the evaluations or
more, else none for that dtype, with why. ``chords-broker --verify-tolerance @FILE`` reads
FILE (``read_calibration``). No GPU has run it yet. On a CPU (2-core AVX512, torch
2.13.0+cpu; ``benchmarks/calibrate_cpu.sh``, ``benchmarks/results/calibrate_*_cpu.json``,
20 steps), against ``cpu:threads=1`` and ``cpu:mkldnn=off``: tests/tiny_pipelines.py's Stable
Diffusion differs by max_rel up to 4.3e-7 and 3.3e-7 in float32 (suggested 4.3e-6, 3.3e-6),
in bfloat16 by 0 and 5.7e-3; against ``cpu:capability=default`` (torch's scalar kernels,
in a child process) by 3.1e-7 and 8.9e-3; the digits model by 0 under the first two and 1.0e-7
under the last (suggested 1.0e-6). The same runs show what the defaults miss: a scale:1.001
worker's results differ from honest ones by 4.5e-7 to 1.2e-4 (tiny SD) and 1.5e-6 to 1.2e-4
(digits) per evaluation, so 1e-4 catches it at 1 and 5 of 20 evaluations, and in bfloat16
1.001 rounds to 1 (no tolerance catches it).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chords_mq.errors import ChordsError

DEFAULT_TOLERANCES: Mapping[str, float] = {
    "float32": 1e-4,
    "float64": 1e-4,
    "bfloat16": 0.05,
    "float16": 0.05,
}
MAX_ENTRIES = 64  # --verify-tolerance entries at most
MAX_CALIBRATION_BYTES = 1 << 20  # a chords-calibrate --out file read by the broker, at most
CALIBRATION_FORMAT = "chords-calibration/1"
_DTYPE = re.compile(r"^(float16|bfloat16|float32|float64)$")
_MODEL = re.compile(r"^[A-Za-z0-9._/-]{1,128}$")


class InvalidTolerance(ChordsError, ValueError):
    """A ``--verify-tolerance`` that does not read ``[MODEL:]DTYPE=REL[,...]``."""


class InvalidCalibrationFile(InvalidTolerance):
    """A ``--verify-tolerance @FILE`` that cannot be read or is no ``chords-calibrate --out``
    file (missing, too large, not JSON, another format, a bad model, dtype or tolerance)."""


@dataclass(frozen=True)
class Tolerances:
    """The tolerance per (model, dtype): a model's own entry, else the dtype's."""

    by_dtype: Mapping[str, float]
    by_model: Mapping[tuple[str, str], float]

    @classmethod
    def parse(cls, text: str) -> Tolerances:
        """``DEFAULT_TOLERANCES`` overridden by ``text``: ``[MODEL:]DTYPE=REL`` entries,
        comma-separated, REL a finite number >= 0 ("" keeps the defaults)."""
        by_dtype = dict(DEFAULT_TOLERANCES)
        by_model: dict[tuple[str, str], float] = {}
        entries = [entry.strip() for entry in text.split(",") if entry.strip()]
        if len(entries) > MAX_ENTRIES:
            raise InvalidTolerance(f"--verify-tolerance: more than {MAX_ENTRIES} entries")
        for entry in entries:
            key, sep, value = entry.partition("=")
            model, colon, dtype = key.strip().rpartition(":")
            if key.startswith("@"):
                raise InvalidTolerance(
                    f"--verify-tolerance: {entry!r}: @FILE entries are read by chords-broker "
                    "(expand_files) before they are parsed"
                )
            if not sep or not _DTYPE.match(dtype) or (colon and not _MODEL.match(model)):
                raise InvalidTolerance(
                    f"--verify-tolerance: {entry!r} is not [MODEL:]DTYPE=REL with DTYPE one of "
                    "float16, bfloat16, float32, float64"
                )
            try:
                rel = float(value)
            except ValueError:
                rel = math.nan
            if not math.isfinite(rel) or rel < 0:
                raise InvalidTolerance(
                    f"--verify-tolerance: {entry!r}: REL must be a finite number >= 0"
                )
            if colon:
                by_model[(model, dtype)] = rel
            else:
                by_dtype[dtype] = rel
        return cls(by_dtype, by_model)

    def of(self, model: str, dtype: str) -> float | None:
        """The tolerance for ``model``'s results of ``dtype``; None: never compared across
        device classes."""
        own = self.by_model.get((model, dtype))
        return own if own is not None else self.by_dtype.get(dtype)

    def agree(self, model: str, dtype: str, max_rel: float, rms_rel: float) -> bool:
        """Do two results ``max_rel`` and ``rms_rel`` apart agree (a NaN distance does not)?"""
        tolerance = self.of(model, dtype)
        return tolerance is not None and max_rel <= tolerance and rms_rel <= tolerance


def expand_files(text: str) -> str:
    """``text`` with each ``@FILE`` entry replaced by the ``MODEL:DTYPE=REL`` entries of the
    calibration file FILE (``chords-calibrate --out``; ``read_calibration``), the other entries
    kept: what ``chords-broker --verify-tolerance`` passes to ``Tolerances.parse``. The only
    I/O of this module; InvalidCalibrationFile for a bad file."""
    entries = [entry.strip() for entry in text.split(",") if entry.strip()]
    if len(entries) > MAX_ENTRIES:
        raise InvalidTolerance(f"--verify-tolerance: more than {MAX_ENTRIES} entries")
    out = []
    for entry in entries:
        out.append(read_calibration(entry[1:]) if entry.startswith("@") else entry)
    return ",".join(out)


def read_calibration(path: str | Path) -> str:
    """The ``MODEL:DTYPE=REL`` entries (comma-separated) of a ``chords-calibrate --out`` file,
    at most ``MAX_CALIBRATION_BYTES`` long: its ``"model"`` and its ``"tolerances"`` (dtype to
    REL; a dtype the calibration refused is absent). InvalidCalibrationFile says what is
    wrong."""
    name = f"--verify-tolerance @{path}"
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_CALIBRATION_BYTES + 1)
    except OSError as exc:
        raise InvalidCalibrationFile(f"{name}: cannot read: {exc.strerror or exc}") from None
    return calibration_entries(raw, name)


def calibration_entries(raw: bytes, name: str = "calibration file") -> str:
    """``read_calibration`` on bytes already read (sans-I/O)."""
    if len(raw) > MAX_CALIBRATION_BYTES:
        raise InvalidCalibrationFile(f"{name}: larger than {MAX_CALIBRATION_BYTES} bytes")
    try:
        data: Any = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidCalibrationFile(f"{name}: not JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT:
        raise InvalidCalibrationFile(
            f'{name}: not a chords-calibrate --out file (no "format": "{CALIBRATION_FORMAT}")'
        )
    model, tolerances = data.get("model"), data.get("tolerances")
    if not isinstance(model, str) or not _MODEL.match(model):
        raise InvalidCalibrationFile(f'{name}: "model" must be a model name, got {model!r}')
    if not isinstance(tolerances, dict) or len(tolerances) > MAX_ENTRIES:
        raise InvalidCalibrationFile(
            f'{name}: "tolerances" must be an object of at most {MAX_ENTRIES} dtypes'
        )
    if not tolerances:
        refused = data.get("refused")
        why = f" (refused: {refused})" if isinstance(refused, dict) and refused else ""
        raise InvalidCalibrationFile(f"{name}: holds no tolerance{why}")
    entries = []
    for dtype, rel in tolerances.items():
        good = isinstance(rel, (int, float)) and not isinstance(rel, bool)
        if not _DTYPE.match(dtype) or not good or not math.isfinite(rel) or rel < 0:
            raise InvalidCalibrationFile(
                f"{name}: tolerance {dtype!r}: {rel!r} is not DTYPE (float16, bfloat16, "
                "float32, float64): a finite number >= 0"
            )
        entries.append(f"{model}:{dtype}={rel!r}")
    return ",".join(entries)
