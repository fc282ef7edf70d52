"""Pairing the segments of two label maps: by name where both carry names, else by label value.

A user's label map meets an adapter's segments (propagate), a prediction
meets a reference (evaluate). Label values are arbitrary (Slicer numbers
segments by their order in the editor), so names decide wherever a person
gave them. A plain label map (or Slicer's default ``Segment_1`` names) carries
none; only its values can be paired, and the caller says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .volume_io import Segment

MATCH_MODES = ("auto", "name", "value")
_GENERATED_NAME = re.compile(r"Segment_\d+")


def carries_names(segments: list[Segment]) -> bool:
    """Whether any segment has a name a person gave (not a plain label map's or Slicer's ``Segment_N``)."""
    return any(not _GENERATED_NAME.fullmatch(segment.name) for segment in segments)


@dataclass
class SegmentMatch:
    """Which source segment stands for which target segment, and what is left over on each side."""

    by: str                                 # "name" or "value"
    pairs: list[tuple[Segment, Segment]]    # (source, target)
    unmatched_source: list[Segment]         # e.g. drawn segments the adapter does not predict
    missing_target: list[Segment]           # e.g. reference segments absent from the prediction

    def relabel(self, labels: np.ndarray) -> np.ndarray:
        """``labels`` (source values) re-expressed in the target's values; unpaired voxels become 0."""
        matched = np.zeros_like(labels)
        for source, target in self.pairs:
            matched[labels == source.label] = target.label
        return matched

    def describe(self) -> str:
        """The pairs as ``label -> target name``, for messages."""
        return ", ".join(f"{source.label} -> {target.name}" for source, target in self.pairs) or "none"


def match_segments(source: list[Segment], target: list[Segment], by: str = "auto") -> SegmentMatch:
    """Pair ``source`` segments with ``target`` segments.

    ``auto`` pairs by name when both sides carry names and by label value
    otherwise; ``name`` and ``value`` force one rule. Segments are never
    re-paired by value because a name is missing: that would score or
    overwrite the wrong structure.
    """
    if by not in MATCH_MODES:
        raise ValueError(f"Unknown segment matching '{by}'; choose {', '.join(MATCH_MODES)}")
    if by == "auto":
        by = "name" if carries_names(source) and carries_names(target) else "value"
    key = (lambda segment: segment.name) if by == "name" else (lambda segment: segment.label)
    targets = {key(segment): segment for segment in target}
    pairs = [(segment, targets[key(segment)]) for segment in source if key(segment) in targets]
    paired_sources = {id(source_segment) for source_segment, _ in pairs}
    paired_targets = {id(target_segment) for _, target_segment in pairs}
    return SegmentMatch(by=by, pairs=pairs,
                        unmatched_source=[s for s in source if id(s) not in paired_sources],
                        missing_target=[t for t in target if id(t) not in paired_targets])
