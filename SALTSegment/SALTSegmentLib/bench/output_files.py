"""A benchmark's three outputs, written the same way for every benchmark: JSON, a Markdown table, a plot.

Each file is written atomically, so a rerun that fails half way leaves the
previous outputs whole.
"""

from __future__ import annotations

import json
from pathlib import Path


def new_figure(width: float, height: float = 4.5):
    """A matplotlib figure with its Agg canvas (no display needed) and one axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def write_outputs(folder: Path, stem: str, document: dict, table: str, figure) -> tuple[Path, Path, Path]:
    """``stem``.json, ``stem``.md and ``stem``.png in ``folder`` (created if needed)."""
    from ..atomic_files import atomic_path

    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = folder / f"{stem}.json", folder / f"{stem}.md", folder / f"{stem}.png"
    with atomic_path(json_path) as temporary:
        temporary.write_text(json.dumps(document, indent=2))
    with atomic_path(md_path) as temporary:
        temporary.write_text(table + "\n")
    figure.tight_layout()
    with atomic_path(png_path) as temporary:
        figure.savefig(temporary, format="png")
    return json_path, md_path, png_path
