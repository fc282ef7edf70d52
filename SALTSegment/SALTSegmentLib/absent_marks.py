"""The text form of absent marks: slices a user checked and found without a segment.

One form for every place a user types them, so that they read the same:
``NAME=S1,S2`` (``--absent``, once per segment) and, in a case list's
``absent`` column, several such marks separated by ``;`` with the slices
separated by commas or spaces (``Thalamus_L=52 53; Caudate_R=18``). A name
may hold ``=`` (the mark splits at the last one). Torch-free, so Slicer's
process and the case list may use it.
"""

from __future__ import annotations

import re
from typing import Iterable

Marks = dict[str, list[int]]   # segment name -> sorted slices marked without it


class AbsentMarkError(ValueError):
    """A mark that is not ``NAME=SLICES`` with whole slice numbers."""


def parse_mark(text: str) -> tuple[str, list[int]]:
    """``NAME=S1,S2`` (or ``NAME=S1 S2``) -> (NAME, [S1, S2])."""
    name, sep, slices = text.rpartition("=")
    items = [item for item in re.split(r"[\s,]+", slices.strip()) if item]
    if not sep or not name.strip() or not items:
        raise AbsentMarkError(f"expected NAME=SLICES (e.g. Thalamus_L=52,53), got '{text.strip()}'")
    try:
        return name.strip(), [int(item) for item in items]
    except ValueError:
        raise AbsentMarkError(f"expected whole slice numbers after '=' (e.g. Thalamus_L=52,53), "
                              f"got '{text.strip()}'") from None


def merge_marks(marks: Iterable[tuple[str, Iterable[int]]]) -> Marks:
    """Marks as one mapping, in the order names first appear; a name given twice gets both lists."""
    merged: Marks = {}
    for name, slices in marks:
        merged[name] = sorted(set(merged.get(name, [])) | {int(i) for i in slices})
    return merged


def parse_marks(text: str) -> Marks:
    """A case list cell: marks separated by ``;`` (an empty cell marks nothing)."""
    return merge_marks(parse_mark(part) for part in text.split(";") if part.strip())
