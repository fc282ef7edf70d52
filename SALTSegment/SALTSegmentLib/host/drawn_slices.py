"""Which slices of a segment hold the user's drawing, and which the user emptied after a prediction.

Propagate must never alter a slice the user drew, and it decides that from
the segment's own mask at the moment the result is written (so slices drawn
while the worker ran count too). A slice with any voxel counts as drawn,
except one that still holds, unchanged, what an earlier Propagate wrote
there: each import records a checksum of every slice it wrote (in a tag of
the segment, saved with the scene), and a slice whose checksum still matches
is free to be predicted again. A slice the user corrected afterwards no
longer matches and is kept. Without a record (or on another grid) every
non-empty slice is kept: the safe side.

An empty slice says nothing by itself (most slices of a volume are empty),
but an empty slice on which an earlier Propagate wrote voxels means the user
erased them: the structure is *absent* there (typically the prediction ran a
few slices past its real end). Such slices are told to the worker (an end of
the walk, a negative for training) and later imports keep them empty, or the
correction would be silently painted over. The record lists them, so they
stay absent after the import that kept them empty (their checksums are gone
by then). A slice the user draws on again holds voxels, so it is drawn, no
longer absent. Without a matching record nothing is absent: predicting there
is what happened before the user could say otherwise. Nor is anything absent
once no predicted slice holds voxels any more: a user who cleared the whole
prediction (to draw the segment again from scratch) is starting over, not
saying where the structure is not; otherwise every slice the old prediction
covered would block the new drawing's interpolation and walks.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

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
    """The slices one import wrote into a segment, with their checksums, on one grid and axis.

    ``absent``: the slices the user had emptied after an earlier prediction, which this import kept empty.
    """

    grid: str
    axis: int
    checksums: dict[int, int] = field(default_factory=dict)
    absent: set[int] = field(default_factory=set)

    def to_json(self) -> str:
        return json.dumps({"grid": self.grid, "axis": self.axis,
                           "checksums": {str(k): v for k, v in sorted(self.checksums.items())},
                           "absent": sorted(self.absent)})

    @classmethod
    def from_json(cls, text: Optional[str]) -> Optional["PredictionRecord"]:
        """The record in ``text``, or None when there is none or it cannot be read (then nothing is exempt)."""
        if not text:
            return None
        try:
            values = json.loads(text)
            return cls(grid=str(values["grid"]), axis=int(values["axis"]),
                       checksums={int(k): int(v) for k, v in values["checksums"].items()},
                       absent={int(i) for i in values.get("absent", ())})  # records before absent: none
        except (ValueError, TypeError, KeyError, AttributeError):
            return None


def grid_key(shape: Iterable[int], ijk_to_ras: np.ndarray) -> str:
    """A short text that identifies a voxel grid (its size and rounded IJK-to-RAS matrix)."""
    matrix = np.round(np.asarray(ijk_to_ras, dtype=float)[:3, :4], 4) + 0.0  # + 0.0: no "-0.0"
    return json.dumps([list(int(v) for v in shape), matrix.ravel().tolist()])


def _matches(record: Optional[PredictionRecord], axis: int, grid: str) -> bool:
    return record is not None and record.grid == grid and record.axis == axis


def drawn_slices(mask: np.ndarray, axis: int, record: Optional[PredictionRecord], grid: str) -> list[int]:
    """Slices along ``axis`` that hold drawing: occupied, and not an untouched slice of the last prediction."""
    exempt = record.checksums if _matches(record, axis, grid) else {}
    return [index for index in occupied_slices(mask, axis)
            if exempt.get(index) != slice_checksum(np.take(mask, index, axis=axis))]


def absent_slices(mask: np.ndarray, axis: int, record: Optional[PredictionRecord], grid: str) -> list[int]:
    """Slices along ``axis`` the user emptied after a prediction: empty now, and written or kept empty by the last
    import on this grid and axis (without such a record, none)."""
    if not _matches(record, axis, grid):
        return []
    candidates = set(record.checksums) | record.absent
    occupied = set(occupied_slices(mask, axis))
    if not occupied & set(record.checksums):
        return []           # the whole prediction was cleared: a fresh start, not a correction (module docstring)
    return sorted(index for index in candidates if 0 <= index < mask.shape[axis] and index not in occupied)


def record_prediction(result: np.ndarray, axis: int, written: Iterable[int], grid: str,
                      absent: Iterable[int] = ()) -> PredictionRecord:
    """The record of an import: checksums of the slices it wrote that hold voxels, and the slices it kept absent."""
    written = set(int(i) for i in written)
    return PredictionRecord(grid, axis, {index: slice_checksum(plane) for index, plane in _slices(result, axis)
                                         if index in written and plane.any()},
                            {int(i) for i in absent})


def _on_slices(slices: Iterable[int]) -> str:
    """``on slice 7`` or ``on slices 52, 53`` (sorted)."""
    slices = sorted(int(i) for i in slices)
    return f"on slice{'' if len(slices) == 1 else 's'} {', '.join(map(str, slices))}"


def describe_absent(name: str, slices: Iterable[int]) -> str:
    """The log line that tells the user an emptied slice was understood (``Liver: absent on slices 52, 53 (...)``)."""
    slices = list(slices)
    pronoun = "it" if len(slices) == 1 else "them"
    return f"{name}: absent {_on_slices(slices)} (you emptied {pronoun} after a propagation)"


def describe_kept_empty(absent: Mapping[str, Iterable[int]]) -> str:
    """The panel's sentence after a propagation that honoured emptied slices ("" when there were none)."""
    marks = {name: list(slices) for name, slices in absent.items()}
    parts = [f"{name} {_on_slices(slices)}" for name, slices in marks.items() if slices]
    return f"Kept empty where you emptied them: {'; '.join(parts)}." if parts else ""
