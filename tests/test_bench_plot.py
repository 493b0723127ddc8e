"""``chords bench --plot`` (``chords_mq.apps.bench_plot.plot_bench``) on hand-written results.

No daemons: the CLI test replaces the bench run with a fixed result, so it checks the option, the
up-front refusal of a bad path and the writing of the files, not the measurements.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from chords_mq.apps.bench_plot import plot_bench
from chords_mq.apps.cli import main
from chords_mq.apps.cluster import free_port

# The fake bench never connects; the address is still one nothing listens on.
NOWHERE = f"tcp://127.0.0.1:{free_port()}"

# The colours a reader sees for each series, as typed here (they are the plot's fixed palette).
COLOURS = {
    "sequential": (0x00, 0x00, 0x00),
    "paradigms": (0x1F, 0x77, 0xB4),
    "srds": (0xFF, 0x7F, 0x0E),
    "chords": (0xD6, 0x27, 0x28),
}


def row(method: str, cores: int, round_speedup: float, wall: float, rmse: float, quality: Any):
    return {
        "method": method,
        "cores": cores,
        "steps": 50,
        "round": 50 / round_speedup,
        "round_speedup": round_speedup,
        "wall_speedup": wall,
        "wall_s": 1.0 / wall,
        "evaluations": 50.0 * cores,
        "latent_rmse": rmse,
        "quality": quality,
        "samples": 2,
        **({"tolerance": 0.1} if method == "paradigms" else {}),
    }


def result(quality: bool = True) -> dict[str, Any]:
    """A bench at K = 4 and 8 where CHORDS is fastest by rounds and SRDS slowest."""
    q = (lambda v: v) if quality else (lambda v: None)
    return {
        "rows": [
            row("sequential", 1, 1.0, 1.0, 0.0, q(98.0)),
            row("paradigms", 4, 2.0, 1.5, 0.0003, q(97.0)),
            row("srds", 4, 1.3, 1.2, 0.0001, q(98.0)),
            row("chords", 4, 2.4, 1.9, 0.0130, q(95.0)),
            row("paradigms", 8, 3.0, 2.2, 0.0004, q(96.0)),
            row("srds", 8, 2.1, 1.6, 0.0002, q(98.0)),
            row("chords", 8, 3.4, 2.8, 0.0050, q(94.0)),
        ],
        "machine": {
            "platform": "Linux-test",
            "cpus": 2,
            "torch": "2.x",
            "gpu": None,
            "workers": 8,
            "worker_devices": ["cpu"],
        },
        "date": "2026-01-01 00:00:00",
        "command": "chords bench",
        "quality_metric": "digit accuracy %" if quality else None,
        "config": {
            "model": "digits",
            "methods": ["sequential", "chords", "srds", "paradigms"],
            "cores": [4, 8],
            "steps": 50,
            "prompts": ["a handwritten 3", "a handwritten 7"],
            "seeds": [0],
            "tolerances": [0.1],
            "chords_stop": "core-index:1",
            "params": {},
        },
        "samples": [],
    }


def markers(image: Image.Image, box, colour) -> list[tuple[int, int]]:
    """(row, column) of every 5x5 block of exactly ``colour`` inside ``box``, relative to it.

    A marker is a filled shape 12 pixels across; the lines (1 pixel) and the K labels (12-pixel
    text, antialiased) of the same colour hold no such block, so this finds the points only."""
    left, top, right, bottom = (int(v) for v in box)
    pixels = np.asarray(image.convert("RGB").crop((left + 1, top + 1, right, bottom)))
    mask = (pixels == np.array(colour, dtype=pixels.dtype)).all(axis=2)
    height, width = mask.shape
    solid = np.ones((height - 4, width - 4), dtype=bool)
    for dy in range(5):
        for dx in range(5):
            solid &= mask[dy : height - 4 + dy, dx : width - 4 + dx]
    return [(int(r), int(c)) for r, c in zip(*np.nonzero(solid))]


def test_plot_bench_draws_every_method_in_every_panel(tmp_path):
    path = tmp_path / "bench.png"
    areas = plot_bench(result(), path)
    image = Image.open(path)
    assert image.format == "PNG"
    assert 800 <= image.width <= 2000 and 500 <= image.height <= 1400
    assert len(areas) == 4, "quality and latent RMSE, each against round and wall speedup"
    for area in areas:
        for method, colour in COLOURS.items():
            if method != "sequential":  # its marker is a cross, drawn with 3-pixel lines
                assert markers(image, area, colour), (method, area)
    # the points sit where the typed values say: CHORDS (3.4x at K=8) right of SRDS (at most
    # 2.1x) in the round-speedup panel; in the RMSE row CHORDS (0.013) is above SRDS (0.0002)
    round_panel, rmse_panel = areas[0], areas[2]
    chords = markers(image, round_panel, COLOURS["chords"])
    srds = markers(image, round_panel, COLOURS["srds"])
    assert max(c for _, c in chords) > max(c for _, c in srds) + 50
    chords = markers(image, rmse_panel, COLOURS["chords"])
    srds = markers(image, rmse_panel, COLOURS["srds"])
    assert min(r for r, _ in chords) < min(r for r, _ in srds) - 50
    # and in the quality row SRDS (98%) is above CHORDS (95% and 94%)
    chords = markers(image, areas[0], COLOURS["chords"])
    srds = markers(image, areas[0], COLOURS["srds"])
    assert min(r for r, _ in srds) < min(r for r, _ in chords) - 50


def test_plot_bench_without_quality_plots_latent_rmse(tmp_path):
    path = tmp_path / "bench.png"
    areas = plot_bench(result(quality=False), path)
    image = Image.open(path)
    assert len(areas) == 2, "one row: latent RMSE against the two speedups"
    for area in areas:
        for method in ("paradigms", "srds", "chords"):
            assert markers(image, area, COLOURS[method]), method


def test_plot_bench_with_one_quality_everywhere(tmp_path):
    """Every row at 99.0% and one RMSE everywhere: the axes still get a span (no division by 0)."""
    data = result()
    for r in data["rows"]:
        r["quality"] = 99.0
        r["latent_rmse"] = 0.0
    path = tmp_path / "flat.png"
    areas = plot_bench(data, path)
    image = Image.open(path)
    for area in areas:
        assert len(markers(image, area, COLOURS["chords"])) > 0


def test_plot_bench_of_a_saved_bench_json(tmp_path):
    saved = tmp_path / "bench.json"
    saved.write_text(json.dumps(result()))
    plot_bench(json.loads(saved.read_text()), tmp_path / "from-json.png")
    assert Image.open(tmp_path / "from-json.png").format == "PNG"


@pytest.fixture
def fake_bench(monkeypatch):
    """``chords bench --broker ...`` with the run replaced: no broker, no workers."""
    from chords_mq.apps import bench

    calls = []

    def run_bench_sync(address, config, log):
        calls.append((address, config))
        return copy.deepcopy(result())

    monkeypatch.setattr(bench, "run_bench_sync", run_bench_sync)
    return calls


def test_bench_plot_option_writes_the_png(tmp_path, fake_bench):
    out = tmp_path / "out"
    path = tmp_path / "speed.png"
    args = ["bench", "--broker", NOWHERE, "--cores", "4,8", "--out", str(out)]
    ran = CliRunner().invoke(main, [*args, "--plot", str(path)])
    assert ran.exit_code == 0, ran.output
    assert len(fake_bench) == 1
    assert f"wrote {path}" in ran.stderr
    assert Image.open(path).format == "PNG"
    assert (out / "bench.json").exists() and (out / "bench.md").exists()
    # --plot without a path: OUT/bench.png
    ran = CliRunner().invoke(main, [*args, "--plot"])
    assert ran.exit_code == 0, ran.output
    assert f"wrote {Path(out) / 'bench.png'}" in ran.stderr
    assert Image.open(out / "bench.png").format == "PNG"


@pytest.mark.parametrize(
    ("where", "message"),
    [("missing/bench.png", "does not exist"), (".", "is a directory")],
)
def test_bench_refuses_a_bad_plot_path_before_running(tmp_path, fake_bench, where, message):
    ran = CliRunner().invoke(
        main,
        [
            "bench",
            "--broker",
            NOWHERE,
            "--out",
            str(tmp_path / "out"),
            "--plot",
            str(tmp_path / where),
        ],
    )
    assert ran.exit_code == 2
    assert message in ran.output and "'--plot'" in ran.output
    assert "Traceback" not in ran.output
    assert fake_bench == [], "refused before any request"
    assert not (tmp_path / "out").exists()
