"""A list of volumes in a CSV file: ``train --cases`` and ``propagate --cases`` read it.

One volume per line, with a header naming the columns:

- ``image`` (required): a volume file or a DICOM series folder;
- ``labels``: its label map (required for ``train``; for ``propagate`` the
  drawn slices, which seed box mode);
- ``slices``: ``train`` only: the labelled slices, separated by spaces or
  semicolons (default: every slice where a selected segment has voxels);
- ``name``: ``propagate`` only: the output's name in the output folder
  (default: the image file's name without its extension);
- ``absent``: slices checked and found without a segment, as ``NAME=SLICES``
  marks separated by ``;`` (``Thalamus_L=52 53; Caudate_R=18``): ``train``
  learns that the segment is not there, ``propagate`` keeps those slices
  empty and stops box mode's walks before them (``--absent``, per volume).

Relative paths are relative to the CSV file's folder. Blank lines and lines
starting with ``#`` are skipped. Torch-free, so Slicer's process may read it.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .absent_marks import AbsentMarkError, Marks, parse_marks

COLUMNS = ("image", "labels", "slices", "name", "absent")
_VOLUME_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nrrd", ".nhdr", ".nii", ".mha", ".mhd", ".dcm")


class CaseListError(ValueError):
    """The case list cannot be read, or a line of it is wrong (the message names the line)."""


@dataclass
class CaseEntry:
    """One line of a case list."""

    image: str
    labels: Optional[str] = None
    slices: Optional[list[int]] = None
    name: str = ""
    line: int = 0
    absent: Marks = field(default_factory=dict)   # segment name -> slices marked without it


def volume_stem(path: str | os.PathLike) -> str:
    """A volume's name without its extension (``ct.nii.gz`` -> ``ct``; a DICOM folder keeps its name)."""
    name = Path(path).name
    for suffix in _VOLUME_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _slices(text: str, where: str) -> Optional[list[int]]:
    items = [item for item in re.split(r"[\s;,]+", text.strip()) if item]
    if not items:
        return None
    try:
        return [int(item) for item in items]
    except ValueError:
        raise CaseListError(f"{where}: slices must be whole numbers separated by spaces or ';', "
                            f"got '{text}'") from None


def _absent(text: str, where: str) -> Marks:
    try:
        return parse_marks(text)
    except AbsentMarkError as error:
        raise CaseListError(f"{where}: absent: {error} (marks are separated by ';')") from None


def read_case_list(path: str | os.PathLike, labels_required: bool = False) -> list[CaseEntry]:
    """The volumes a case list names, checked line by line (files are checked later, by the jobs)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise CaseListError(f"Case list not found: {path}") from None
    except (IsADirectoryError, UnicodeDecodeError) as error:
        raise CaseListError(f"{path} is not a CSV case list ({error.__class__.__name__})") from None
    lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1)
             if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise CaseListError(f"{path} lists no volume (expected a header line such as 'image,labels', then one "
                            "volume per line)")
    reader = csv.reader([line for _, line in lines], skipinitialspace=True)
    header = [column.strip().lower() for column in next(reader)]
    unknown = [column for column in header if column not in COLUMNS]
    if "image" not in header or unknown:
        raise CaseListError(f"{path}, line {lines[0][0]}: the header must name an 'image' column and only "
                            f"{', '.join(COLUMNS)} (got {', '.join(header) or 'nothing'})")
    if labels_required and "labels" not in header:
        raise CaseListError(f"{path}: training needs a 'labels' column")
    entries = []
    for (number, _), row in zip(lines[1:], reader):
        where = f"{path}, line {number}"
        if len(row) != len(header):
            raise CaseListError(f"{where}: {len(row)} values for {len(header)} columns")
        values = {column: value.strip() for column, value in zip(header, row)}
        if not values["image"]:
            raise CaseListError(f"{where}: no image")
        if labels_required and not values.get("labels"):
            raise CaseListError(f"{where}: no labels (training needs a label map for every volume)")
        image = str(path.parent / values["image"])
        labels = str(path.parent / values["labels"]) if values.get("labels") else None
        entries.append(CaseEntry(image, labels, _slices(values.get("slices", ""), where),
                                 values.get("name") or volume_stem(image), number,
                                 _absent(values.get("absent", ""), where)))
    if not entries:
        raise CaseListError(f"{path} lists no volume under its header")
    return entries
