"""Run and demo reports: slice montage, loss curve, and JSON + Markdown summaries.

Figures are drawn on a private ``Figure`` with the Agg canvas, so nothing here
touches pyplot's global state or needs a display. Every file is written
through :func:`atomic_path`, so a crash never leaves a truncated report.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .atomic_files import atomic_path
from .metrics import EvaluationReport
from .slices import array_axis, labelled_slices
from .volume_io import Segment

REFERENCE_COLOR = "white"
PANEL_INCHES = 3.0
DPI = 100


def _slice(volume: np.ndarray, dim: int, index: int) -> np.ndarray:
    return np.take(volume, index, axis=dim)


def _default_indices(reference: Optional[np.ndarray], prediction: np.ndarray, segments: list[Segment],
                     dim: int, max_panels: int) -> list[int]:
    """Evenly spaced slices among those holding a segment (all slices when none does)."""
    labels = [s.label for s in segments]
    candidates = set(labelled_slices(prediction, labels, dim))
    if reference is not None:
        candidates.update(labelled_slices(reference, labels, dim))
    return _evenly_spaced(sorted(candidates) or list(range(prediction.shape[dim])), max_panels)


def _evenly_spaced(values: list[int], count: int) -> list[int]:
    if len(values) <= count:
        return list(values)
    picks = np.round(np.linspace(0, len(values) - 1, count)).astype(int)
    return [values[i] for i in sorted(set(picks.tolist()))]


def _outline(ax: Any, mask: np.ndarray, color: Any, linestyle: str, linewidth: float) -> None:
    """Contour of a 2D mask in pixel-centre coordinates; padding closes shapes at the border."""
    if not mask.any():
        return
    padded = np.pad(mask.astype(np.float32), 1)
    rows, cols = mask.shape
    ax.contour(np.arange(-1, cols + 1), np.arange(-1, rows + 1), padded, levels=[0.5],
               colors=[color], linestyles=linestyle, linewidths=linewidth)


def _save(figure: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    FigureCanvasAgg(figure)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=DPI, facecolor=figure.get_facecolor())
    return path


def write_montage(path: str | os.PathLike, image: np.ndarray, reference: Optional[np.ndarray],
                  prediction: np.ndarray, segments: list[Segment], axis: str = "axial",
                  indices: Optional[list[int]] = None, labelled: Optional[set[int]] = None,
                  max_panels: int = 12,
                  spacing_xyz: Optional[Sequence[float]] = None) -> Path:
    """PNG grid of slices with reference (dashed white) and prediction (segment colour) outlines.

    Lets a user judge a run at a glance: which slices were labelled by hand
    and how the propagated ones compare. ``spacing_xyz`` (optional) keeps the
    pixel aspect right on coronal and sagittal slices of anisotropic volumes.
    """
    image, prediction = np.asarray(image), np.asarray(prediction)
    reference = None if reference is None else np.asarray(reference)
    if image.ndim != 3:
        raise ValueError(f"Image must be 3D (z, y, x), got {image.ndim}D")
    for name, volume in (("prediction", prediction), ("reference", reference)):
        if volume is not None and volume.shape != image.shape:
            raise ValueError(f"The {name} shape {volume.shape} differs from the image shape {image.shape}")
    if max_panels < 1:
        raise ValueError(f"max_panels must be at least 1, got {max_panels}")
    dim = array_axis(axis)
    if indices is None:
        indices = _default_indices(reference, prediction, segments, dim, max_panels)
    else:
        indices = [int(i) for i in indices]
        outside = [i for i in indices if not 0 <= i < image.shape[dim]]
        if outside:
            raise ValueError(f"Slice indices {outside} are outside 0..{image.shape[dim] - 1} along the {axis} axis")
        if not indices:
            raise ValueError("No slice indices to draw")
        indices = _evenly_spaced(indices, max_panels)
    labelled = set(labelled or ())

    finite = image[np.isfinite(image)]
    low = float(finite.min()) if finite.size else 0.0
    high = float(finite.max()) if finite.size else 1.0
    if high <= low:
        high = low + 1.0
    # Coronal and sagittal slices put z on the rows; draw superior (high z) at the top.
    origin = "upper" if dim == 0 else "lower"
    aspect = 1.0
    if spacing_xyz is not None:
        spacing_zyx = [float(s) for s in spacing_xyz][::-1]
        row_dim, col_dim = [a for a in range(3) if a != dim]
        aspect = spacing_zyx[row_dim] / spacing_zyx[col_dim]

    columns = min(len(indices), 4)
    rows = math.ceil(len(indices) / columns)
    figure = Figure(figsize=(PANEL_INCHES * columns, PANEL_INCHES * rows + 0.6), facecolor="black")
    for panel, index in enumerate(indices):
        ax = figure.add_subplot(rows, columns, panel + 1)
        picture = _slice(image, dim, index)
        ax.imshow(picture, cmap="gray", vmin=low, vmax=high, origin=origin, aspect=aspect,
                  interpolation="nearest")
        for segment in segments:
            if reference is not None:
                _outline(ax, _slice(reference, dim, index) == segment.label, REFERENCE_COLOR, "dashed", 1.0)
            _outline(ax, _slice(prediction, dim, index) == segment.label, segment.color, "solid", 1.5)
        height, width = picture.shape
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylim((height - 0.5, -0.5) if origin == "upper" else (-0.5, height - 0.5))
        ax.set_axis_off()
        title = f"{axis} {index}" + (" (labelled)" if index in labelled else "")
        ax.set_title(title, color="white", fontsize=9)

    handles = [Line2D([], [], color=s.color, linewidth=2, label=s.name) for s in segments]
    if reference is not None:
        handles.append(Line2D([], [], color=REFERENCE_COLOR, linestyle="dashed", linewidth=1, label="reference"))
    if handles:
        legend = figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8,
                               frameon=False)
        for text in legend.get_texts():
            text.set_color("white")
    figure.subplots_adjust(left=0.01, right=0.99, top=0.94, bottom=0.6 / (PANEL_INCHES * rows + 0.6) + 0.02,
                           wspace=0.05, hspace=0.15)
    return _save(figure, path)


def _smoothed(values: np.ndarray) -> np.ndarray:
    """Trailing moving average that skips non-finite values (a NaN step must not blank the line)."""
    window = max(1, len(values) // 20)
    finite = np.isfinite(values)
    sums = np.convolve(np.where(finite, values, 0.0), np.ones(window))[: len(values)]
    counts = np.convolve(finite.astype(float), np.ones(window))[: len(values)]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def write_loss_curve(path: str | os.PathLike, losses: list[float],
                     learning_rates: Optional[list[float]] = None, title: str = "Training loss") -> Path:
    """PNG of loss per step (raw and smoothed) with the learning rate on a second axis."""
    values = np.asarray(losses, dtype=float)
    if values.ndim != 1 or values.size == 0:
        raise ValueError("losses must be a non-empty list of numbers")
    if learning_rates is not None and len(learning_rates) != len(values):
        raise ValueError(f"Got {len(learning_rates)} learning rates for {len(values)} loss values")
    steps = np.arange(1, len(values) + 1)
    figure = Figure(figsize=(7, 4))
    ax = figure.add_subplot(1, 1, 1)
    ax.plot(steps, values, color="tab:blue", alpha=0.35, linewidth=1, label="loss")
    ax.plot(steps, _smoothed(values), color="tab:blue", linewidth=2, label="loss (smoothed)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if learning_rates is not None:
        lr_axis = ax.twinx()
        lr_axis.plot(steps, np.asarray(learning_rates, dtype=float), color="tab:orange", linewidth=1.2,
                     label="learning rate")
        lr_axis.set_ylabel("learning rate")
        lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        more_handles, more_labels = lr_axis.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, loc="upper right", fontsize=8)
    figure.tight_layout()
    return _save(figure, path)


def json_safe(value: Any) -> Any:
    """Plain JSON values: numpy scalars and arrays unwrapped, NaN and infinities as null."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return json_safe(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return [json_safe(v) for v in items]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        return json_safe(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _flatten(mapping: dict, prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.extend(_flatten(value, name + "."))
        else:
            rows.append((name, value))
    return rows


def _table(header: Sequence[str], rows: list[Sequence[str]], right: Sequence[bool]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if r else ":---" for r in right) + "|"]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return lines


def _markdown(name: str, summary: dict, evaluation: Optional[dict]) -> str:
    title = summary.get("title") or name
    lines = [f"# {_cell(title)}", ""]
    sections = {"settings": ("Settings", "Setting", "Value"), "timings": ("Timings", "Step", "Seconds")}
    for key, (heading, left, right) in sections.items():
        if isinstance(summary.get(key), dict) and summary[key]:
            rows = [(_cell(k), _cell(v)) for k, v in _flatten(summary[key])]
            lines += [f"## {heading}", "", *_table((left, right), rows, (False, key == "timings")), ""]
    details = {k: v for k, v in summary.items() if k not in ("title", "settings", "timings", "evaluation")}
    if details:
        rows = [(_cell(k), _cell(v)) for k, v in _flatten(details)]
        lines += ["## Details", "", *_table(("Field", "Value"), rows, (False, False)), ""]
    if evaluation is not None:
        rows = [(_cell(s["name"]), _cell(s["label"]), _number(s["dice"], 4), _number(s["hd95_mm"], 2),
                 _cell(s["ref_voxels"]), "missing" if s.get("missing") else _cell(s["pred_voxels"]))
                for s in evaluation["segments"]]
        rows.append(("**Mean**", "", _number(evaluation["mean_dice"], 4),
                     _number(evaluation["mean_hd95_mm"], 2), "", ""))
        lines += ["## Segmentation accuracy", "",
                  *_table(("Segment", "Label", "Dice", "HD95 (mm)", "Ref voxels", "Pred voxels"), rows,
                          (False, True, True, True, True, True)), ""]
    return "\n".join(lines)


def _number(value: Optional[float], digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def write_report(directory: str | os.PathLike, name: str, summary: dict,
                 evaluation: Optional[EvaluationReport]) -> tuple[Path, Path]:
    """Write ``{name}.json`` (the summary plus an ``evaluation`` entry) and ``{name}.md``.

    Both texts are built before either file is written, so a value that
    cannot be encoded fails the call without leaving a lone half of the pair.
    """
    directory = Path(directory)
    payload = json_safe(dict(summary))
    payload["evaluation"] = json_safe(evaluation.to_dict()) if evaluation is not None else None
    json_text = json.dumps(payload, indent=2, allow_nan=False) + "\n"
    markdown_text = _markdown(name, payload, payload["evaluation"])
    json_path, markdown_path = directory / f"{name}.json", directory / f"{name}.md"
    for path, text in ((json_path, json_text), (markdown_path, markdown_text)):
        with atomic_path(path) as temporary:
            temporary.write_text(text, encoding="utf-8")
    return json_path, markdown_path
