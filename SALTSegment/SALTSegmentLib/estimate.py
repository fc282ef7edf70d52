"""Before you trust the result: an estimate of its quality, and the slice worth drawing next.

Leave-one-out over the drawn slices. For each segment drawn on three or more
slices, each drawn slice in turn is hidden, predicted from the others by the
same box propagation (:mod:`box_mode`), and compared with what the user drew
there; Slicer's *Fill between slices* predicts the same hidden slice from the
same others. Both means go to the report and the Slicer panel.

What it measures: how well the shape between drawn slices is recovered, on
this volume, for these structures. What it does not: the adapter was trained
*with* the hidden slice, so the model's share is optimistic; a hidden slice
doubles the gap it sits in, so interpolation is tested across wider gaps than
the real ones; the slices beyond the outermost drawn ones (the ends) are not
tested at all: each end is reported with the reason its walk stopped.

The suggestion names, per segment, the slice whose drawing would pin down the
most of what is still uncertain: the middle of the widest gap between drawn
slices, or the far end of a stretch the walk extrapolated on soft evidence.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from . import preprocessing as pp
from .box_mode import BoxPropagation, SegmentResult
from .extent import END_DRAWN, END_EDGE, END_MARKED, END_RANGE
from .host.propagation_findings import NextSlice
from .interpolation import interpolate_segment
from .metrics import dice
from .volume_io import Segment

MIN_DRAWN_FOR_ESTIMATE = 3
HARD_ENDS = (END_DRAWN, END_MARKED, END_EDGE, END_RANGE)   # ends the user's labels or the volume fix, not evidence


@dataclass
class SegmentEstimate:
    """Leave-one-out Dice of one segment's hidden drawn slices, for the propagation and Fill between slices."""

    segment: str
    slices: list[int]
    propagation: float
    fill_between_slices: float


@dataclass
class QualityEstimate:
    segments: list[SegmentEstimate] = field(default_factory=list)

    @property
    def propagation(self) -> Optional[float]:
        return float(np.mean([s.propagation for s in self.segments])) if self.segments else None

    @property
    def fill_between_slices(self) -> Optional[float]:
        return float(np.mean([s.fill_between_slices for s in self.segments])) if self.segments else None

    def describe(self) -> str:
        if not self.segments:
            return (f"no quality estimate: it needs a segment drawn on {MIN_DRAWN_FOR_ESTIMATE} or more slices")
        hidden = sum(len(s.slices) for s in self.segments)
        return (f"expected Dice on unlabelled slices between drawn ones: {self.propagation:.2f}; Fill between "
                f"slices: {self.fill_between_slices:.2f} (leave-one-out over {hidden} inner drawn slices of "
                f"{len(self.segments)} segment{'s' if len(self.segments) != 1 else ''}; the ends are not in it)")

    def to_dict(self) -> dict:
        return {"propagation": self.propagation, "fill_between_slices": self.fill_between_slices,
                "segments": [asdict(s) for s in self.segments], "text": self.describe()}


def leave_one_out(run: BoxPropagation, segments: Sequence[Segment], user_labels: np.ndarray,
                  labelled: Sequence[int], results: Sequence[Optional[SegmentResult]],
                  on_segment: Optional[Callable[[int], None]] = None) -> QualityEstimate:
    """Hide each inner drawn slice of each segment drawn on 3+ slices; predict it from the others, both ways.

    Only slices with drawn slices of the segment on both sides are hidden,
    with the ends kept as the full run decided them (``results``). Hiding an
    outermost slice would ask the walk to reach a slice a whole label gap
    away, which the spacing bound forbids by design, and Fill between slices
    cannot extrapolate at all: both would score 0 there and say nothing
    about the result. So this estimates the slices between drawn ones, not
    the ends; each end is reported with its reason instead. ``on_segment(k)``
    is called after segment ``k``, for progress.
    """
    estimate = QualityEstimate()
    for k, (segment, full) in enumerate(zip(segments, results)):
        row = _segment_estimate(run, k, segment, user_labels == segment.label, labelled, full)
        if row is not None:
            estimate.segments.append(row)
        if on_segment is not None:
            on_segment(k)
    return estimate


def _segment_estimate(run: BoxPropagation, k: int, segment: Segment, drawn: np.ndarray, labelled: Sequence[int],
                      full: Optional[SegmentResult]) -> Optional[SegmentEstimate]:
    """One segment's leave-one-out row; None if it is drawn on too few slices (or not at all)."""
    axis = run.axis
    present = [i for i in labelled if pp.take_slice(drawn, axis, i).any()]
    if full is None or len(present) < MIN_DRAWN_FOR_ESTIMATE:
        return None
    ours, fill = [], []
    inner = present[1:-1]
    for hidden in inner:
        truth = pp.take_slice(drawn, axis, hidden)
        without = drawn.copy()
        pp.put_slice(without, axis, hidden, False)
        others = [i for i in labelled if i != hidden]
        known = [full.extent.first, full.extent.last]
        predicted = run.segment(k, segment.name, without, others, only=hidden, known_ends=known)
        ours.append(dice(pp.take_slice(predicted.mask, axis, hidden), truth))
        fill.append(dice(pp.take_slice(interpolate_segment(without, axis), axis, hidden), truth))
    return SegmentEstimate(segment.name, inner, round(float(np.mean(ours)), 4), round(float(np.mean(fill)), 4))


def suggest_next_slices(segments: Sequence[Segment], user_labels: np.ndarray, labelled: Sequence[int],
                        results: Sequence[Optional[SegmentResult]], axis: str,
                        absent: Optional[Mapping[str, Iterable[int]]] = None) -> list[NextSlice]:
    """Per segment, the unlabelled slice whose drawing removes the most uncertainty.

    Candidates, scored by the slices they leave to guesswork: the middle of
    each gap between drawn slices (half the gap on either side), and the far
    end of an extrapolated stretch whose end came from evidence rather than
    from a label (the whole stretch, plus one: the end itself is a guess).
    A slice marked without the segment (``absent``) is never suggested for it.
    """
    suggestions = []
    for segment, result in zip(segments, results):
        if result is None:
            continue
        labelled_set = set(labelled) | {int(i) for i in (absent or {}).get(segment.name, ())}
        drawn = user_labels == segment.label
        present = [i for i in labelled if pp.take_slice(drawn, axis, i).any()]
        candidates: list[tuple[float, int, str]] = []
        for a, b in zip(present[:-1], present[1:]):
            if b - a > 1:
                middle = (a + b) // 2
                candidates.append(((b - a) / 2.0, middle, f"middle of the gap between drawn slices {a} and {b}"))
        for end, outermost in ((result.extent.first, present[0]), (result.extent.last, present[-1])):
            if end.reason in HARD_ENDS or end.slice in labelled_set:
                continue
            candidates.append((end.beyond_drawn + 1.0, end.slice,
                               f"the walk past slice {outermost} ended here because {end.reason}; if it is not "
                               "there, mark it absent on this slice"))
        candidates = [c for c in candidates if c[1] not in labelled_set]
        if candidates:
            _, index, reason = max(candidates, key=lambda c: c[0])
            suggestions.append(NextSlice(segment.name, int(index), reason))
    return suggestions
