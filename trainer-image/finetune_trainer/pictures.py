"""The two pictures of a run, under the output and listed with its files:

- ``loss.png``: the loss of every step and its smoothed value (the one on the resource),
  the learning rate on a second axis, the sample steps marked; 1200 x 600 pixels.
- ``samples.png``: a contact sheet of the preview samples, one row per sample step (the
  newest ``MAX_ROWS`` when there are more), one column per prompt, each cell at most
  ``CELL_PX`` pixels, step labels on the left and prompts on top.

Both are redrawn at each sample step and at the end, and written atomically.  Matplotlib
runs headless (its Agg canvas, no pyplot state), so no display is needed; on a read-only root
(a pod's) its config and font cache go to the temporary folder, quietly, unless MPLCONFIGDIR
says where.
"""

from __future__ import annotations

import os
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from finetune_trainer import storage
from finetune_trainer.report import SMOOTHING

if TYPE_CHECKING:
    from PIL import Image

LOSS_FILE = "loss.png"
SAMPLES_FILE = "samples.png"
LOSS_SIZE_PX = (1200, 600)
_DPI = 100
CELL_PX = 256
MAX_ROWS = 24
LABEL_WIDTH_PX = 96
HEADER_HEIGHT_PX = 48
GAP_PX = 4
_BACKGROUND = (255, 255, 255)
_MISSING = (200, 200, 200)


def smoothed(values: Sequence[float], *, beta: float = SMOOTHING) -> list[float]:
    """The exponentially smoothed, bias-corrected series (what progress reports as the loss)."""
    out: list[float] = []
    ema = 0.0
    for count, value in enumerate(values, start=1):
        ema = beta * ema + (1 - beta) * value
        out.append(ema / (1 - beta**count))
    return out


def matplotlib_home() -> None:
    """Point MPLCONFIGDIR at the temporary folder when matplotlib's own folders (under the home
    folder) cannot be written, as on a pod's read-only root: matplotlib would do the same, but
    with a warning in the log at every run."""
    if os.environ.get("MPLCONFIGDIR"):
        return
    home = Path.home()
    folders = [
        Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config") / "matplotlib",
        Path(os.environ.get("XDG_CACHE_HOME") or home / ".cache") / "matplotlib",
    ]
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            break
        if not os.access(folder, os.W_OK):
            break
    else:
        return
    os.environ["MPLCONFIGDIR"] = str(Path(tempfile.gettempdir()) / "matplotlib")


def loss_plot(
    history: Sequence[tuple[int, float, float]],
    dest: Path,
    *,
    title: str,
    total_steps: int,
    sample_steps: Sequence[int] = (),
) -> Path:
    """``history``: (step, loss, learning rate) of each optimizer step."""
    matplotlib_home()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(LOSS_SIZE_PX[0] / _DPI, LOSS_SIZE_PX[1] / _DPI), dpi=_DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    steps = [h[0] for h in history]
    losses = [h[1] for h in history]
    rates = [h[2] for h in history]
    marker = "o" if len(history) < 30 else None
    lines = []
    if history:
        lines += axes.plot(steps, losses, color="#9ecae1", linewidth=1, marker=marker, markersize=3, label="loss")
        label = f"smoothed loss (EMA {SMOOTHING}, as reported)"
        lines += axes.plot(steps, smoothed(losses), color="#08519c", linewidth=2, label=label)
    for index, step in enumerate(sample_steps):
        axes.axvline(step, color="#bbbbbb", linestyle=":", linewidth=1, label="sample step" if index == 0 else None)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    right = max(total_steps, max(steps, default=1), 1)
    axes.set_xlim(0, right * 1.02)  # a little room, so a sample step at the end stays visible
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(True, alpha=0.3)
    rate_axes = axes.twinx()
    if history:
        lines += rate_axes.plot(steps, rates, color="#d94801", linewidth=1.5, linestyle="--", label="learning rate")
    rate_axes.set_ylabel("learning rate")
    rate_axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    rate_axes.set_ylim(bottom=0)
    handles = lines + [line for line in axes.get_lines() if line.get_label() == "sample step"]
    if handles:
        # Below the axes, where it hides no data.
        figure.legend(
            handles=handles,
            labels=[str(h.get_label()) for h in handles],
            loc="lower center",
            ncol=len(handles),
            frameon=False,
        )
    else:
        axes.text(0.5, 0.5, "no training steps yet", transform=axes.transAxes, ha="center", va="center")
    done = max(steps, default=0)
    axes.set_title(f"{title}: step {done} of {total_steps}")
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    with storage.atomic_path(dest) as tmp:
        figure.savefig(tmp, format="png", dpi=_DPI)
    storage.make_readable(dest)
    return dest


def sheet_size(rows: int, columns: int, cell: int) -> tuple[int, int]:
    """(width, height) in pixels of a contact sheet."""
    return (
        LABEL_WIDTH_PX + columns * (cell + GAP_PX) + GAP_PX,
        HEADER_HEIGHT_PX + rows * (cell + GAP_PX) + GAP_PX,
    )


def cell_size(resolution: int) -> int:
    return min(CELL_PX, resolution)


def cell_origin(row: int, column: int, cell: int) -> tuple[int, int]:
    """(left, top) in pixels of a contact sheet's cell."""
    return LABEL_WIDTH_PX + column * (cell + GAP_PX) + GAP_PX, HEADER_HEIGHT_PX + row * (cell + GAP_PX)


def contact_sheet(
    rows: dict[int, dict[int, Path]],
    prompts: Sequence[str],
    dest: Path,
    *,
    resolution: int,
    corner: str = "",
) -> Path | None:
    """``rows``: {step: {prompt index: sample}}; a sample that is missing (it failed to render)
    is a grey cell; ``corner``, a word above the steps (what the rows were rendered with).
    None where there is nothing to show."""
    from PIL import Image, ImageDraw, ImageFont

    if not rows or not prompts:
        return None
    steps = sorted(rows)[-MAX_ROWS:]
    cell = cell_size(resolution)
    size = sheet_size(len(steps), len(prompts), cell)
    sheet = Image.new("RGB", size, _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=11)
    for column, prompt in enumerate(prompts):
        left, _ = cell_origin(0, column, cell)
        width_chars = max(8, cell // 7)
        lines = textwrap.wrap(prompt, width_chars)[:3] or [""]
        if len(textwrap.wrap(prompt, width_chars)) > 3:
            lines[-1] = lines[-1][: width_chars - 3] + "..."
        draw.multiline_text((left, 2), "\n".join(lines), fill=(0, 0, 0), font=small, spacing=1)
    if corner:
        draw.text((6, 6), corner, fill=(0, 0, 0), font=font)
    for row, step in enumerate(steps):
        _, top = cell_origin(row, 0, cell)
        draw.text((6, top + cell // 2 - 8), f"step {step}", fill=(0, 0, 0), font=font)
        for column in range(len(prompts)):
            left, top = cell_origin(row, column, cell)
            path = rows[step].get(column)
            image = _open(path, cell) if path is not None else None
            if image is None:
                draw.rectangle((left, top, left + cell - 1, top + cell - 1), fill=_MISSING)
                draw.text((left + 6, top + 6), "not rendered", fill=(80, 80, 80), font=small)
            else:
                sheet.paste(image, (left, top))
    with storage.atomic_path(dest) as tmp:
        sheet.save(tmp, format="PNG")
    storage.make_readable(dest)
    return dest


def _open(path: Path, cell: int) -> Image.Image | None:
    from PIL import Image

    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except OSError:
        return None
    if image.size != (cell, cell):
        image = image.resize((cell, cell), Image.Resampling.LANCZOS)
    return image
