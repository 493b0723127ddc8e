"""``chords bench --plot``: round and wall speedup against quality, per method and K.

Drawn with Pillow, as ``chords_mq.media`` draws the schedule, from the dict ``bench.json`` holds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chords_mq.apps.bench import row_label

# plot_bench: one colour and marker per method; a second ParaDIGMS tolerance (or a method not
# listed here) takes the next colour of BENCH_EXTRA_COLOURS that no series uses yet.
BENCH_COLOURS = {
    "sequential": "#000000",
    "paradigms": "#1f77b4",
    "srds": "#ff7f0e",
    "srds-parareal": "#8c564b",
    "chords": "#d62728",
}
BENCH_EXTRA_COLOURS = ["#9467bd", "#17becf", "#2ca02c", "#e377c2", "#bcbd22", "#7f7f7f"]
BENCH_MARKERS = {
    "sequential": "cross",
    "paradigms": "circle",
    "srds": "square",
    "srds-parareal": "diamond",
    "chords": "triangle",
}

Box = tuple[float, float, float, float]


def _font(size: int) -> Any:
    """Pillow's built-in font at ``size`` pixels (a scalable one since Pillow 10.1; the old
    bitmap font, at its one size, where FreeType is missing)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # pragma: no cover - old Pillow, no FreeType
        return ImageFont.load_default()


def _axis_range(
    values: Sequence[float], floor: float | None = 0.0, ceiling: float | None = None
) -> tuple[float, float]:
    """``values``' range padded by 8% each side; one value gets a span of 2% around it (1 around
    0). Data within ``floor`` (or ``ceiling``) go at most 4% of the span past it: no room for
    negative speedups or an accuracy above 100%."""
    lo, hi = min(values), max(values)
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        half = abs(hi) * 0.01 or 0.5
        padded_lo, padded_hi = lo - half, hi + half
    else:
        pad = 0.08 * (hi - lo)
        padded_lo, padded_hi = lo - pad, hi + pad
    if floor is not None and lo >= floor > padded_lo:
        padded_lo = floor - 0.04 * (padded_hi - floor)
    if ceiling is not None and hi <= ceiling < padded_hi:
        padded_hi = ceiling + 0.04 * (ceiling - padded_lo)
    return padded_lo, padded_hi


def _ticks(lo: float, hi: float) -> tuple[list[float], int]:
    """Five to eight round tick values (1, 2, 2.5 or 5 times a power of ten apart) within
    [lo, hi], and the decimals that print them."""
    raw = (hi - lo) / 7
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * 0.999)
    decimals = next(d for d in range(12) if abs(round(step * 10**d) - step * 10**d) < 1e-6)
    first = math.ceil(lo / step - 1e-9)
    ticks = []
    index = first
    while index * step <= hi + 1e-9 * step:
        ticks.append(round(index * step, decimals + 1))
        index += 1
    return ticks, decimals


def _overlap(a: Box, b: Box) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    return width * height if width > 0 and height > 0 else 0.0


def _label_box(
    x: float, y: float, size: tuple[float, float], area: Box, placed: Sequence[Box]
) -> Box:
    """Where a label of ``size`` goes next to the point (x, y): the first of the places around it,
    nearest first, that stays in ``area`` and overlaps the least of what is ``placed``."""
    w, h = size
    candidates: list[Box] = []
    for gap in (9, 16, 24, 32):
        for dx, dy in ((1, 0), (0, -1), (0, 1), (-1, 0), (1, -1), (1, 1), (-1, -1)):
            cx = x + dx * gap + (0 if dx > 0 else -w if dx < 0 else -w / 2)
            cy = y + dy * gap + (-h / 2 if dy == 0 else -h if dy < 0 else 0)
            candidates.append((cx, cy, cx + w, cy + h))
    inside = [
        c
        for c in candidates
        if c[0] >= area[0] + 2
        and c[2] <= area[2] - 2
        and c[1] >= area[1] + 2
        and c[3] <= area[3] - 2
    ] or candidates
    return min(inside, key=lambda c: sum(_overlap(c, p) for p in placed))


def _marker(draw: Any, shape: str, x: float, y: float, colour: str, r: float = 6) -> None:
    if shape == "cross":
        draw.line([(x - r, y - r), (x + r, y + r)], fill=colour, width=3)
        draw.line([(x - r, y + r), (x + r, y - r)], fill=colour, width=3)
    elif shape == "square":  # a white rim keeps neighbouring markers apart
        draw.rectangle([x - r + 1, y - r + 1, x + r - 1, y + r - 1], fill=colour, outline="white")
    elif shape == "diamond":
        corners = [(x, y - r - 1), (x + r + 1, y), (x, y + r + 1), (x - r - 1, y)]
        draw.polygon(corners, fill=colour, outline="white")
    elif shape == "triangle":
        corners = [(x, y - r - 1), (x + r + 1, y + r), (x - r - 1, y + r)]
        draw.polygon(corners, fill=colour, outline="white")
    else:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour, outline="white")


# plot_bench's columns: (row key, axis name), left to right.
_X_AXES = [
    ("round_speedup", "round speedup (N / rounds)"),
    ("wall_speedup", "wall speedup (sequential wall / wall)"),
]

Series = dict[tuple[str, Any], dict[str, Any]]
Point = tuple[dict[str, Any], tuple[float, float]]  # a row and where it goes on the page


@dataclass(frozen=True)
class _Layout:
    """plot_bench's page geometry, in pixels: a grid of equal panels, the legend right of it."""

    columns: int
    rows: int
    plot_w: int = 440
    plot_h: int = 300
    margin_left: int = 82
    margin_right: int = 26
    margin_bottom: int = 52
    top: int = 76
    legend_w: int = 230

    @property
    def column_w(self) -> int:
        return self.margin_left + self.plot_w + self.margin_right

    @property
    def row_h(self) -> int:
        return self.plot_h + self.margin_bottom + 16

    @property
    def size(self) -> tuple[int, int]:
        return self.columns * self.column_w + self.legend_w, self.top + self.rows * self.row_h + 4

    def area(self, row_index: int, col_index: int) -> Box:
        """The plot area (left, top, right, bottom) of the panel in that row and column."""
        left = col_index * self.column_w + self.margin_left
        upper = self.top + row_index * self.row_h
        return (left, upper, left + self.plot_w, upper + self.plot_h)


@dataclass(frozen=True)
class _Canvas:
    """The page being drawn, its drawing context and plot_bench's three fonts."""

    page: Any
    draw: Any
    font: Any
    small: Any
    title_font: Any

    def text_size(self, text: str, which: Any) -> tuple[float, float]:
        """The width and height ``text`` takes in the font ``which``."""
        box = self.draw.textbbox((0, 0), text, font=which)
        return box[2] - box[0], box[3] - box[1]


@dataclass(frozen=True)
class _Scale:
    """One panel's data ranges, mapped onto its plot area."""

    area: Box
    x_lo: float
    x_hi: float
    y_lo: float
    y_hi: float

    def at(self, x: float, y: float) -> tuple[float, float]:
        """The page position of the data point (x, y)."""
        area = self.area
        return (
            area[0] + (x - self.x_lo) / (self.x_hi - self.x_lo) * (area[2] - area[0]),
            area[3] - (y - self.y_lo) / (self.y_hi - self.y_lo) * (area[3] - area[1]),
        )


def _finite(row: dict[str, Any], key: str) -> bool:
    """Whether the row holds a finite number under ``key``."""
    value = row.get(key)
    return isinstance(value, int | float) and math.isfinite(value)


def _series_key(row: dict[str, Any]) -> tuple[str, Any]:
    """The series the row belongs to: (method, tolerance)."""
    return row["method"], row.get("tolerance")


def _y_axes(result: dict[str, Any], rows: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """The panel rows' y axes (row key, axis name): quality where any row has it, then the RMSE."""
    y_axes: list[tuple[str, str]] = []
    if any(row.get("quality") is not None for row in rows):
        y_axes.append(("quality", result.get("quality_metric") or "quality"))
    y_axes.append(("latent_rmse", "latent RMSE vs sequential"))
    return y_axes


def _series_styles(rows: Sequence[dict[str, Any]]) -> Series:
    """Each series, (method, tolerance) in the rows' order, with its label, colour and marker."""
    series: Series = {}
    used: set[str] = set()
    for row in rows:
        key = _series_key(row)
        if key in series:
            continue
        colour = BENCH_COLOURS.get(row["method"])
        if colour is None or colour in used:
            colour = next((c for c in BENCH_EXTRA_COLOURS if c not in used), "#7f7f7f")
        used.add(colour)
        series[key] = {
            "label": row_label(row),
            "colour": colour,
            "marker": BENCH_MARKERS.get(row["method"], "circle"),
        }
    return series


def _new_canvas(layout: _Layout) -> _Canvas:
    """A blank white page of the layout's size, with the fonts to write on it."""
    from PIL import Image, ImageDraw

    page = Image.new("RGB", layout.size, "white")
    return _Canvas(page, ImageDraw.Draw(page), _font(14), _font(12), _font(18))


def _subtitle(result: dict[str, Any]) -> list[str]:
    """The subtitle's parts: the samples per point, the machine and the date, those known."""
    config = result.get("config", {})
    machine = result.get("machine", {})
    prompts, seeds = len(config.get("prompts", [])), len(config.get("seeds", []))
    subtitle = [f"{prompts} prompt(s) x {seeds} seed(s) per point"] if prompts and seeds else []
    if machine:
        subtitle.append(f"{machine.get('cpus', '?')} CPUs, GPU: {machine.get('gpu') or 'none'}")
        if machine.get("workers"):
            devices = ", ".join(machine.get("worker_devices", []))
            subtitle.append(f"{machine['workers']} workers on {devices or '?'}")
    if result.get("date"):
        subtitle.append(str(result["date"]))
    return subtitle


def _draw_title(canvas: _Canvas, layout: _Layout, result: dict[str, Any], y_key: str) -> None:
    """Draws the title (model, N and what the first row plots) and the subtitle under it."""
    config = result.get("config", {})
    title = f"chords bench: {config.get('model', '?')}, N={config.get('steps', '?')}"
    against = "quality" if y_key == "quality" else "latent RMSE"
    canvas.draw.text(
        (layout.margin_left, 10),
        f"{title}: speedup against {against}",
        fill="black",
        font=canvas.title_font,
    )
    subtitle = "; ".join(_subtitle(result))
    canvas.draw.text((layout.margin_left, 38), subtitle, fill="#333333", font=canvas.font)


def _draw_panel(
    canvas: _Canvas,
    layout: _Layout,
    area: Box,
    rows: Sequence[dict[str, Any]],
    series: Series,
    x_axis: tuple[str, str],
    y_axis: tuple[str, str],
) -> None:
    """Draws one panel: y_axis against x_axis for the rows with both, or a note that none has."""
    (x_key, x_name), (y_key, y_name) = x_axis, y_axis
    points = [r for r in rows if _finite(r, x_key) and _finite(r, y_key)]
    if not points:
        canvas.draw.rectangle(area, outline="black")
        canvas.draw.text(
            (area[0] + 10, area[1] + 10), f"no {y_name}", fill="black", font=canvas.font
        )
        return
    x_lo, x_hi = _axis_range([float(r[x_key]) for r in points])
    percent = y_key == "quality" and "%" in y_name
    y_lo, y_hi = _axis_range([float(r[y_key]) for r in points], 0.0, 100.0 if percent else None)
    scale = _Scale(area, x_lo, x_hi, y_lo, y_hi)
    _draw_ticks(canvas, scale)
    canvas.draw.rectangle(area, outline="black")
    _draw_axis_names(canvas, layout, area, x_name, y_name)
    # lines through each series' points in K order, then the markers, then the K labels
    placed_points = [(r, scale.at(float(r[x_key]), float(r[y_key]))) for r in points]
    _draw_series_lines(canvas, placed_points, series)
    placed = _draw_markers(canvas, placed_points, series)
    _draw_k_labels(canvas, area, placed_points, series, placed)


def _draw_ticks(canvas: _Canvas, scale: _Scale) -> None:
    """Draws one panel's grid lines, its ticks and their values on both axes."""
    draw, small, area = canvas.draw, canvas.small, scale.area
    x_ticks, x_decimals = _ticks(scale.x_lo, scale.x_hi)
    y_ticks, y_decimals = _ticks(scale.y_lo, scale.y_hi)
    for tick in x_ticks:
        x, _ = scale.at(tick, scale.y_lo)
        draw.line([(x, area[1]), (x, area[3])], fill="#e4e4e4")
        draw.line([(x, area[3]), (x, area[3] + 5)], fill="black")
        label = f"{tick:.{x_decimals}f}"
        w, _ = canvas.text_size(label, small)
        draw.text((x - w / 2, area[3] + 8), label, fill="black", font=small)
    for tick in y_ticks:
        _, y = scale.at(scale.x_lo, tick)
        draw.line([(area[0], y), (area[2], y)], fill="#e4e4e4")
        draw.line([(area[0] - 5, y), (area[0], y)], fill="black")
        label = f"{tick:.{y_decimals}f}"
        w, h = canvas.text_size(label, small)
        draw.text((area[0] - 8 - w, y - h / 2 - 2), label, fill="black", font=small)


def _draw_axis_names(canvas: _Canvas, layout: _Layout, area: Box, x_name: str, y_name: str) -> None:
    """Draws a panel's x axis name below it and its y axis name, turned a quarter left, beside."""
    from PIL import Image, ImageDraw

    font = canvas.font
    w, _ = canvas.text_size(x_name, font)
    canvas.draw.text(
        (area[0] + (layout.plot_w - w) / 2, area[3] + 28), x_name, fill="black", font=font
    )
    w, h = canvas.text_size(y_name, font)
    label_image = Image.new("L", (int(w) + 4, int(h) + 8), 0)
    ImageDraw.Draw(label_image).text((2, 0), y_name, fill=255, font=font)
    turned = label_image.rotate(90, expand=True)
    y0 = int(area[1] + (layout.plot_h - turned.height) / 2)
    x0 = int(area[0] - layout.margin_left + 4)
    canvas.page.paste((0, 0, 0), (x0, y0, x0 + turned.width, y0 + turned.height), turned)


def _draw_series_lines(canvas: _Canvas, points: Sequence[Point], series: Series) -> None:
    """Draws a line through each series' points in K order, where it has more than one."""
    for key, style in series.items():
        members = sorted(
            (p for p in points if _series_key(p[0]) == key), key=lambda p: int(p[0]["cores"])
        )
        if len(members) > 1:
            canvas.draw.line([xy for _, xy in members], fill=style["colour"], width=1)


def _draw_markers(canvas: _Canvas, points: Sequence[Point], series: Series) -> list[Box]:
    """Draws each point's marker in its series' style; returns the boxes the markers cover."""
    placed: list[Box] = []
    for r, (x, y) in points:
        style = series[_series_key(r)]
        _marker(canvas.draw, style["marker"], x, y, style["colour"])
        placed.append((x - 7, y - 7, x + 7, y + 7))
    return placed


def _draw_k_labels(
    canvas: _Canvas, area: Box, points: Sequence[Point], series: Series, placed: list[Box]
) -> None:
    """Draws each parallel point's K beside it, where it overlaps the least (adds to ``placed``)."""
    for r, (x, y) in points:
        if r["method"] == "sequential":
            continue
        style = series[_series_key(r)]
        label = str(r["cores"])
        best = _label_box(x, y, canvas.text_size(label, canvas.small), area, placed)
        placed.append(best)
        canvas.draw.text((best[0], best[1] - 2), label, fill=style["colour"], font=canvas.small)


def _draw_legend(canvas: _Canvas, layout: _Layout, series: Series) -> None:
    """Draws the legend right of the first row: each series' marker and label, then what K is."""
    draw = canvas.draw
    legend_x = layout.columns * layout.column_w + 4
    y = layout.top + 4
    draw.text((legend_x, y), "method", fill="black", font=canvas.font)
    y += 24
    for style in series.values():
        _marker(draw, style["marker"], legend_x + 8, y + 8, style["colour"])
        draw.text((legend_x + 24, y), style["label"], fill="black", font=canvas.font)
        y += 24
    y += 6
    for note in ("numbers next to points:", "K, the cores (workers)"):
        draw.text((legend_x, y), note, fill="#333333", font=canvas.small)
        y += 17


def plot_bench(result: dict[str, Any], path: str | Path) -> list[Box]:
    """``chords bench``'s result (the object ``bench.json`` holds) as a PNG: round speedup (left)
    and wall speedup (right) against the quality metric, one colour and marker per method (and
    ParaDIGMS tolerance), each point labelled with its K. Below, when the result has a quality
    metric, a second row puts the same speedups against the latent RMSE versus sequential; without
    one, the RMSE is the only row. Returns the plot areas (left, top, right, bottom), row by row.
    """
    rows = [row for row in result["rows"] if row.get("method")]
    if not rows:
        raise ValueError("the bench result has no rows to plot")
    y_axes = _y_axes(result, rows)
    series = _series_styles(rows)
    layout = _Layout(columns=len(_X_AXES), rows=len(y_axes))
    canvas = _new_canvas(layout)
    _draw_title(canvas, layout, result, y_axes[0][0])
    areas: list[Box] = []
    for row_index, y_axis in enumerate(y_axes):
        for col_index, x_axis in enumerate(_X_AXES):
            area = layout.area(row_index, col_index)
            areas.append(area)
            _draw_panel(canvas, layout, area, rows, series, x_axis, y_axis)
    _draw_legend(canvas, layout, series)
    canvas.page.save(path, format="PNG")
    return areas
