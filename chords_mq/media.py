"""Pictures for people: PNG files of decoded hits, a labelled grid of hits, the schedule plot,
the bench plot (speedup against quality).

Pillow only (it comes with diffusers); imported lazily so the core stays light.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def save_png(image: torch.Tensor, path: str | Path) -> None:
    """Write a uint8 (H, W) or (H, W, 3) tensor as a PNG."""
    from PIL import Image

    Image.fromarray(image.contiguous().numpy()).save(path)


def hits_grid(images: Sequence[torch.Tensor], labels: Sequence[str], path: str | Path) -> None:
    """One column per hit: the picture with its label underneath, on a white page."""
    from PIL import Image, ImageDraw

    pad, text_h = 8, 26
    width = max(int(im.shape[1]) for im in images)
    height = max(int(im.shape[0]) for im in images)
    column = max(width, 84)
    page = Image.new(
        "RGB", (pad + len(images) * (column + pad), pad + height + text_h + pad), "white"
    )
    draw = ImageDraw.Draw(page)
    for index, (image, label) in enumerate(zip(images, labels)):
        x = pad + index * (column + pad)
        page.paste(
            Image.fromarray(image.contiguous().numpy()).convert("RGB"),
            (x + (column - int(image.shape[1])) // 2, pad),
        )
        for line_no, line in enumerate(label.split("\n")[:2]):
            draw.text((x, pad + height + 2 + 12 * line_no), line, fill="black")
    page.save(path)


def save_mp4(frames: torch.Tensor, path: str | Path, fps: int = 8) -> None:
    """Write uint8 frames (F, H, W, C) as an H.264 MP4 with imageio-ffmpeg's bundled ffmpeg."""
    import imageio.v2 as imageio

    imageio.mimwrite(
        str(path), list(frames.contiguous().numpy()), fps=fps, codec="libx264", macro_block_size=1
    )


CORE_COLOURS = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
]


def plot_schedule(report: dict[str, Any], path: str | Path) -> None:
    """The schedule as in the paper's Figure 2: step against round, one line per core,
    rectifications as dots, hits as squares. ``report`` is ``chords plan --json``'s object."""
    from PIL import Image, ImageDraw

    steps, cores = report["steps"], report["cores"]
    rounds = len(report["rounds"])
    left, right, top, bottom, scale = 60, 130, 40, 50, 10
    width = left + right + rounds * scale
    height = top + bottom + steps * scale
    page = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(page)

    def point(round_: float, step: float) -> tuple[float, float]:
        return left + round_ * scale, top + (steps - step) * scale

    draw.line([point(0, 0), point(rounds, 0)], fill="black")
    draw.line([point(0, 0), point(0, steps)], fill="black")
    for r in range(0, rounds + 1, 5):
        x, y = point(r, 0)
        draw.line([(x, y), (x, y + 4)], fill="black")
        draw.text((x - 6, y + 6), str(r), fill="black")
    for s in range(0, steps + 1, 10):
        x, y = point(0, s)
        draw.line([(x - 4, y), (x, y)], fill="black")
        draw.text((x - 30, y - 6), str(s), fill="black")
    draw.text((left + rounds * scale // 2 - 20, height - 20), "round", fill="black")
    draw.text((6, top - 30), "step", fill="black")
    title = f"CHORDS N={steps}, K={cores}, init {report['init_sequence']}"
    draw.text((left, 8), title, fill="black")

    by_core: dict[int, list[tuple[int, int]]] = {}
    for r, pairs in enumerate(report["rounds"], start=1):
        for step, core in pairs:
            by_core.setdefault(core, []).append((r, step))
    hits = {hit["core"]: hit["round"] for hit in report["hits"]}
    for core, evals in sorted(by_core.items()):
        colour = CORE_COLOURS[(core - 1) % len(CORE_COLOURS)]
        # a task at round r evaluates step s; its result lands at step s + 1 after round r
        line = [point(r - 1, s) for r, s in evals] + [point(evals[-1][0], evals[-1][1] + 1)]
        draw.line(line, fill=colour, width=2)
        if core in hits:
            x, y = point(hits[core], steps)
            draw.rectangle([x - 3, y - 3, x + 3, y + 3], fill=colour)
        x, y = point(rounds, 0)
        draw.text((x + 12, top + 14 * core), f"core {core}", fill=colour)
    for rect in report["rectifications"]:
        x, y = point(rect["round"], rect["target"])
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], outline="black")
    legend_x = point(rounds, 0)[0] + 12
    if 0 in hits:
        x, y = point(hits[0], steps)
        draw.rectangle([x - 3, y - 3, x + 3, y + 3], outline="black")
        draw.rectangle(
            [legend_x, top + 14 * (cores + 1) + 3, legend_x + 6, top + 14 * (cores + 1) + 9],
            outline="black",
        )
        draw.text((legend_x + 10, top + 14 * (cores + 1)), "zero-th hit", fill="black")
    draw.ellipse(
        [legend_x - 1, top + 14 * (cores + 2) + 1, legend_x + 7, top + 14 * (cores + 2) + 9],
        outline="black",
    )
    draw.text((legend_x + 10, top + 14 * (cores + 2)), "rectified", fill="black")
    page.save(path)
