"""The embedded real sample: a crop of the Colin27 T1 MR with eight AAL deep grey structures.

Made by ``scripts/make_sample_data.py`` from Debian's ``mricron-data``
(BSD-3); see README "Sample data" for provenance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .slices import occupied_slices

SAMPLE_IMAGE = "ch2_deep_grey_t1.nrrd"
SAMPLE_LABELS = "ch2_deep_grey_labels.seg.nrrd"


def sample_folder() -> Path:
    """``Resources/SampleData`` of the source tree (or of the installed Slicer module)."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parents[1] / "Resources" / "SampleData", here.parent / "Resources" / "SampleData"):
        if (candidate / SAMPLE_IMAGE).is_file():
            return candidate
    raise FileNotFoundError(f"The embedded sample ({SAMPLE_IMAGE}) is not installed next to {here}")


def sample_paths() -> tuple[Path, Path]:
    folder = sample_folder()
    return folder / SAMPLE_IMAGE, folder / SAMPLE_LABELS


def spread_slices(labels: np.ndarray, count: int, axis: int | str = 0) -> list[int]:
    """``count`` slices evenly spread inside the labelled extent, as a user would pick them.

    The ends of the extent are skipped (a user labels where a structure is
    clearly visible, not its last sliver).
    """
    occupied = occupied_slices(labels, axis)
    if not occupied:
        raise ValueError("The label map is empty")
    positions = np.linspace(occupied[0], occupied[-1], count + 2)[1:-1]
    return sorted(set(int(round(p)) for p in positions))
