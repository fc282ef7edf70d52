"""Which slices of a segment hold the user's drawing, as opposed to an earlier prediction left untouched.

Propagate must never alter a slice the user drew, and it decides that from
the segment's own mask at the moment the result is written (so slices drawn
while the worker ran count too). A slice with any voxel counts as drawn,
except one that still holds, unchanged, what an earlier Propagate wrote
there: each import records a checksum of every slice it wrote (in a tag of
the segment, saved with the scene), and a slice whose checksum still matches
is free to be predicted again. A slice the user corrected afterwards no
longer matches and is kept. Without a record (or on another grid) every
non-empty slice is kept: the safe side.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np

from ..slices import occupied_slices

RECORD_TAG = "SALTSegment.PredictedSlices"


def _slices(mask: np.ndarray, axis: int):
    for index in range(mask.shape[axis]):
        yield index, np.take(mask, index, axis=axis)


def slice_checksum(plane: np.ndarray) -> int:
    """A checksum of one binary slice (its shape and which voxels are set)."""
    bits = np.packbits(np.asarray(plane, dtype=bool), axis=None)
    return zlib.crc32(bits.tobytes(), zlib.crc32(repr(plane.shape).encode()))


@dataclass
class PredictionRecord:
    """The slices one import wrote into a segment, with their checksums, on one grid and axis."""

    grid: str
    axis: int
    checksums: dict[int, int] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"grid": self.grid, "axis": self.axis,
                           "checksums": {str(k): v for k, v in sorted(self.checksums.items())}})

    @classmethod
    def from_json(cls, text: Optional[str]) -> Optional["PredictionRecord"]:
        """The record in ``text``, or None when there is none or it cannot be read (then nothing is exempt)."""
        if not text:
            return None
        try:
            values = json.loads(text)
            return cls(grid=str(values["grid"]), axis=int(values["axis"]),
                       checksums={int(k): int(v) for k, v in values["checksums"].items()})
        except (ValueError, TypeError, KeyError, AttributeError):
            return None


def grid_key(shape: Iterable[int], ijk_to_ras: np.ndarray) -> str:
    """A short text that identifies a voxel grid (its size and rounded IJK-to-RAS matrix)."""
    matrix = np.round(np.asarray(ijk_to_ras, dtype=float)[:3, :4], 4) + 0.0  # + 0.0: no "-0.0"
    return json.dumps([list(int(v) for v in shape), matrix.ravel().tolist()])


def drawn_slices(mask: np.ndarray, axis: int, record: Optional[PredictionRecord], grid: str) -> list[int]:
    """Slices along ``axis`` that hold drawing: occupied, and not an untouched slice of the last prediction."""
    exempt = record.checksums if record is not None and record.grid == grid and record.axis == axis else {}
    return [index for index in occupied_slices(mask, axis)
            if exempt.get(index) != slice_checksum(np.take(mask, index, axis=axis))]


def record_prediction(result: np.ndarray, axis: int, written: Iterable[int], grid: str) -> PredictionRecord:
    """The record of an import: checksums of the slices it wrote that hold voxels."""
    written = set(int(i) for i in written)
    return PredictionRecord(grid, axis, {index: slice_checksum(plane) for index, plane in _slices(result, axis)
                                         if index in written and plane.any()})
