"""Checks made before a job starts: can the output be written, and will the job fit in memory.

They run before any model is loaded, so a bad output path or a volume too
large for this machine costs the user seconds, not a training run.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Optional

MEMORY_LIMIT_ENV = "SALTSEGMENT_MEMORY_LIMIT_BYTES"
# Extensions SimpleITK writes label maps to (checked before any work, not after it).
LABEL_MAP_SUFFIXES = (".seg.nrrd", ".nrrd", ".nhdr", ".nii.gz", ".nii", ".mha", ".mhd")
# One slice's image embedding (256 x 64 x 64 float32), kept for every slice of a box walk.
_EMBEDDING_BYTES = 256 * 64 * 64 * 4


class InsufficientMemoryError(ValueError):
    """The job would not fit in the memory available (estimated before it starts)."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


def _with_hint(error: BaseException, hint: str) -> BaseException:
    error.hint = hint  # read by the CLI's one-line error report
    return error


def check_output_path(path: str | os.PathLike) -> Path:
    """Refuse an output path that cannot be written, before any work is done."""
    out = Path(path)
    parent = out.parent
    if not parent.exists():
        raise _with_hint(FileNotFoundError(errno.ENOENT, "Output folder does not exist", str(parent)),
                         "create the folder first, or choose another output path")
    if not parent.is_dir():
        raise _with_hint(NotADirectoryError(errno.ENOTDIR, "Output folder is a file, not a folder", str(parent)),
                         "choose an output path inside a folder")
    if out.is_dir():
        raise _with_hint(IsADirectoryError(errno.EISDIR, "Output path is a folder; give a file name", str(out)),
                         "add a file name to the output path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise _with_hint(PermissionError(errno.EACCES, "Output folder is not writable", str(parent)),
                         "choose an output folder you can write to")
    return out


def check_label_map_suffix(path: Path) -> None:
    if not path.name.lower().endswith(LABEL_MAP_SUFFIXES):
        raise _with_hint(ValueError(f"Cannot write a label map to '{path.name}': unknown file type"),
                         "end the output name with .seg.nrrd (keeps segment names), .nrrd, .nii.gz or .mha")


# --------------------------------------------------------------------------- memory

def available_memory_bytes() -> Optional[int]:
    """Memory this job may use: ``SALTSEGMENT_MEMORY_LIMIT_BYTES`` if set, else MemAvailable; None if unknown."""
    override = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    if override:
        try:
            return int(float(override))
        except ValueError:
            raise ValueError(f"{MEMORY_LIMIT_ENV} must be a number of bytes, not '{override}'") from None
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _input_bytes_per_voxel(read_bytes: int) -> int:
    # the file's voxels as read + the float32 image + its intensity-mapped float32 copy
    return read_bytes + 4 + 4


def training_memory_bytes(voxels: int, read_bytes: int = 4) -> int:
    """Lower estimate of the volume-sized memory of a training run (image, mapped copy, labels and masks).

    The labelled-slice bank and the model come on top; they do not grow
    with the volume, so the volume is what makes a job not fit.
    """
    label_bytes = 2 + 2 + 1  # label map as read, uint16 copy, selection mask
    return int(voxels) * (_input_bytes_per_voxel(read_bytes) + label_bytes)


def propagation_memory_bytes(voxels: int, segments: int, slices: int, box_mode: bool, read_bytes: int = 4,
                             with_labels: bool = False) -> int:
    """Lower estimate of the memory a propagation needs for a volume of ``voxels`` and ``segments``.

    Per voxel: the image and its mapped copy, float16 probabilities for every
    segment, the arg-max (int64), the maximum and confidence mask, and the
    output label maps; box mode also keeps one embedding per slice.
    """
    per_voxel = _input_bytes_per_voxel(read_bytes) + 2 * int(segments) + 8 + 2 + 1 + 2 * 3
    if with_labels:
        per_voxel += 2 + 2 + 2  # the user's label map, its uint16 copy and its re-expression
    total = int(voxels) * per_voxel
    if box_mode:
        total += int(slices) * _EMBEDDING_BYTES
    return total


def _gib(value: float) -> str:
    return f"{value / 1024 ** 3:.1f} GiB" if value >= 1024 ** 3 else f"{value / 1024 ** 2:.0f} MiB"


def check_memory(needed: int, what: str, hint: str) -> None:
    """Refuse a job whose estimate exceeds the available memory (no check when that is unknown)."""
    available = available_memory_bytes()
    if available is not None and needed > available:
        raise InsufficientMemoryError(f"{what} needs about {_gib(needed)} of memory but only {_gib(available)} "
                                      "is available", hint)
