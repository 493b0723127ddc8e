"""``chords bench --plot``: round and wall speedup against quality, per method and K.

Drawn with Pillow, as ``chords_mq.media`` draws the schedule, from the dict ``bench.json`` holds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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


def plot_bench(result: dict[str, Any], path: str | Path) -> list[Box]:
    """``chords bench``'s result (the object ``bench.json`` holds) as a PNG: round speedup (left)
    and wall speedup (right) against the quality metric, one colour and marker per method (and
    ParaDIGMS tolerance), each point labelled with its K. Below, when the result has a quality
    metric, a second row puts the same speedups against the latent RMSE versus sequential; without
    one, the RMSE is the only row. Returns the plot areas (left, top, right, bottom), row by row.
    """
    from PIL import Image, ImageDraw

    rows = [row for row in result["rows"] if row.get("method")]
    if not rows:
        raise ValueError("the bench result has no rows to plot")
    config = result.get("config", {})
    machine = result.get("machine", {})
    metric = result.get("quality_metric") or "quality"
    y_axes: list[tuple[str, str]] = []
    if any(row.get("quality") is not None for row in rows):
        y_axes.append(("quality", metric))
    y_axes.append(("latent_rmse", "latent RMSE vs sequential"))
    x_axes = [
        ("round_speedup", "round speedup (N / rounds)"),
        ("wall_speedup", "wall speedup (sequential wall / wall)"),
    ]

    # series: (method, tolerance) in the rows' order
    series: dict[tuple[str, Any], dict[str, Any]] = {}
    used: set[str] = set()
    for row in rows:
        key = (row["method"], row.get("tolerance"))
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

    font, small, title_font = _font(14), _font(12), _font(18)
    plot_w, plot_h = 440, 300
    margin_left, margin_right, margin_bottom = 82, 26, 52
    top = 76
    legend_w = 230
    width = len(x_axes) * (margin_left + plot_w + margin_right) + legend_w
    height = top + len(y_axes) * (plot_h + margin_bottom + 16) + 4
    page = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(page)

    def text_size(text: str, which: Any) -> tuple[float, float]:
        box = draw.textbbox((0, 0), text, font=which)
        return box[2] - box[0], box[3] - box[1]

    title = f"chords bench: {config.get('model', '?')}, N={config.get('steps', '?')}"
    against = "quality" if y_axes[0][0] == "quality" else "latent RMSE"
    draw.text(
        (margin_left, 10), f"{title}: speedup against {against}", fill="black", font=title_font
    )
    prompts, seeds = len(config.get("prompts", [])), len(config.get("seeds", []))
    subtitle = [f"{prompts} prompt(s) x {seeds} seed(s) per point"] if prompts and seeds else []
    if machine:
        subtitle.append(f"{machine.get('cpus', '?')} CPUs, GPU: {machine.get('gpu') or 'none'}")
        if machine.get("workers"):
            devices = ", ".join(machine.get("worker_devices", []))
            subtitle.append(f"{machine['workers']} workers on {devices or '?'}")
    if result.get("date"):
        subtitle.append(str(result["date"]))
    draw.text((margin_left, 38), "; ".join(subtitle), fill="#333333", font=font)

    def finite(row: dict[str, Any], key: str) -> bool:
        value = row.get(key)
        return isinstance(value, int | float) and math.isfinite(value)

    areas: list[Box] = []
    for row_index, (y_key, y_name) in enumerate(y_axes):
        for col_index, (x_key, x_name) in enumerate(x_axes):
            points = [r for r in rows if finite(r, x_key) and finite(r, y_key)]
            left = col_index * (margin_left + plot_w + margin_right) + margin_left
            upper = top + row_index * (plot_h + margin_bottom + 16)
            area = (left, upper, left + plot_w, upper + plot_h)
            areas.append(area)
            if not points:
                draw.rectangle(area, outline="black")
                draw.text((left + 10, upper + 10), f"no {y_name}", fill="black", font=font)
                continue
            x_lo, x_hi = _axis_range([float(r[x_key]) for r in points])
            percent = y_key == "quality" and "%" in y_name
            y_lo, y_hi = _axis_range(
                [float(r[y_key]) for r in points], 0.0, 100.0 if percent else None
            )

            def at(
                x: float,
                y: float,
                x_lo: float = x_lo,
                x_hi: float = x_hi,
                y_lo: float = y_lo,
                y_hi: float = y_hi,
                area: Box = area,
            ) -> tuple[float, float]:
                return (
                    area[0] + (x - x_lo) / (x_hi - x_lo) * plot_w,
                    area[3] - (y - y_lo) / (y_hi - y_lo) * plot_h,
                )

            x_ticks, x_decimals = _ticks(x_lo, x_hi)
            y_ticks, y_decimals = _ticks(y_lo, y_hi)
            for tick in x_ticks:
                x, _ = at(tick, y_lo)
                draw.line([(x, area[1]), (x, area[3])], fill="#e4e4e4")
                draw.line([(x, area[3]), (x, area[3] + 5)], fill="black")
                label = f"{tick:.{x_decimals}f}"
                w, _ = text_size(label, small)
                draw.text((x - w / 2, area[3] + 8), label, fill="black", font=small)
            for tick in y_ticks:
                _, y = at(x_lo, tick)
                draw.line([(area[0], y), (area[2], y)], fill="#e4e4e4")
                draw.line([(area[0] - 5, y), (area[0], y)], fill="black")
                label = f"{tick:.{y_decimals}f}"
                w, h = text_size(label, small)
                draw.text((area[0] - 8 - w, y - h / 2 - 2), label, fill="black", font=small)
            draw.rectangle(area, outline="black")
            w, _ = text_size(x_name, font)
            draw.text((left + (plot_w - w) / 2, area[3] + 28), x_name, fill="black", font=font)
            # the y label, turned a quarter left
            w, h = text_size(y_name, font)
            label_image = Image.new("L", (int(w) + 4, int(h) + 8), 0)
            ImageDraw.Draw(label_image).text((2, 0), y_name, fill=255, font=font)
            turned = label_image.rotate(90, expand=True)
            y0 = int(upper + (plot_h - turned.height) / 2)
            x0 = int(area[0] - margin_left + 4)
            page.paste((0, 0, 0), (x0, y0, x0 + turned.width, y0 + turned.height), turned)

            # lines through each series' points in K order, then the markers, then the K labels
            placed: list[Box] = []
            for key, style in series.items():
                members = sorted(
                    (r for r in points if (r["method"], r.get("tolerance")) == key),
                    key=lambda r: int(r["cores"]),
                )
                if len(members) > 1:
                    line = [at(float(r[x_key]), float(r[y_key])) for r in members]
                    draw.line(line, fill=style["colour"], width=1)
            for r in points:
                style = series[(r["method"], r.get("tolerance"))]
                x, y = at(float(r[x_key]), float(r[y_key]))
                _marker(draw, style["marker"], x, y, style["colour"])
                placed.append((x - 7, y - 7, x + 7, y + 7))
            for r in points:
                if r["method"] == "sequential":
                    continue
                style = series[(r["method"], r.get("tolerance"))]
                x, y = at(float(r[x_key]), float(r[y_key]))
                label = str(r["cores"])
                best = _label_box(x, y, text_size(label, small), area, placed)
                placed.append(best)
                draw.text((best[0], best[1] - 2), label, fill=style["colour"], font=small)

    # the legend, right of the first row
    legend_x = len(x_axes) * (margin_left + plot_w + margin_right) + 4
    y = top + 4
    draw.text((legend_x, y), "method", fill="black", font=font)
    y += 24
    for style in series.values():
        _marker(draw, style["marker"], legend_x + 8, y + 8, style["colour"])
        draw.text((legend_x + 24, y), style["label"], fill="black", font=font)
        y += 24
    y += 6
    for note in ("numbers next to points:", "K, the cores (workers)"):
        draw.text((legend_x, y), note, fill="#333333", font=small)
        y += 17
    page.save(path, format="PNG")
    return areas
