"""How far each structure runs along the slice axis, as the adapter's training cases drew it.

With one drawn slice, box propagation has no label spacing to bound a walk
(:mod:`extent`); it falls back on the drawn region's in-plane radius, the
rule for a round lesion. An elongated structure (a caudate runs four times
its width) then stops far too early. A site adapter has seen the structure
drawn on several slices of earlier patients, so it knows better: how long the
structure is compared with its width. That is what this module keeps and
uses.

At training, each case records, per segment drawn on two or more slices
spread along it (not densely, :func:`extent.drawn_densely`: a few
neighbouring slices say nothing of its length), the span of its drawn
slices, the largest gap between them and its largest cross-section (as a
disc radius), in millimetres (:func:`drawn_lengths`); the
records travel with the adapter's cases, through every continuation. At
propagation, :func:`reach_per_radius` turns them into one number per segment:
how many in-plane radii the structure reaches on each side of a drawn slice.
The estimate of a case's length is the same one the walks use with several
drawn slices: the drawn span plus ``spacing_bound`` x the label gap at each
end. The median over cases keeps one odd case from deciding. A record of the
drawing being propagated (an adapter trained on it, the usual
train-then-propagate) is left out: it knows nothing the drawing does not.
The walks then take that length in place of the drawing's own guess, shared
between the two ends by the radius drawn at each (:func:`extent.spacing_limit`).
"""

from __future__ import annotations

from dataclasses import asdict, astuple, dataclass
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

from . import preprocessing as pp
from .extent import ExtentRule, drawn_densely, equivalent_radius_mm, label_spacing
from .volume_io import Segment


@dataclass(frozen=True)
class DrawnLength:
    """One segment in one training case: its drawn slices' span and gap, and its widest drawn cross-section."""

    span_mm: float      # first to last drawn slice
    gap_mm: float       # the largest gap between consecutive drawn slices
    radius_mm: float    # the largest drawn cross-section, as a disc

    def to_dict(self) -> dict:
        return {k: round(v, 3) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: Mapping) -> "DrawnLength":
        return cls(float(values["span_mm"]), float(values["gap_mm"]), float(values["radius_mm"]))

    def same_drawing(self, other: "DrawnLength") -> bool:
        """Whether both were measured from one drawing (a record keeps three decimals)."""
        return all(abs(a - b) < 0.01 for a, b in zip(astuple(self), astuple(other)))


def drawn_length(areas: Mapping[int, int], slice_mm: float, pixel_area_mm2: float) -> Optional[DrawnLength]:
    """One segment from its drawn area on each labelled slice (pixels).

    None unless drawn on two slices or more, spread along it: a dense
    drawing's span is where the user drew, not how long the structure is.
    Density is judged by the default :class:`extent.ExtentRule`, whatever a
    propagation is configured with, so that box mode's check for a record
    of its own drawing (:func:`reach_per_radius`) sees what training recorded.
    """
    present = sorted(i for i, area in areas.items() if area > 0)
    if len(present) < 2:
        return None
    radius = equivalent_radius_mm(max(areas[i] for i in present), pixel_area_mm2)
    gap = label_spacing(present)
    if drawn_densely(ExtentRule(), gap, radius / slice_mm):
        return None
    return DrawnLength((present[-1] - present[0]) * slice_mm, gap * slice_mm, radius)


def drawn_lengths(labels: np.ndarray, segments: Sequence[Segment], axis: str, labelled: Sequence[int],
                  spacing: Sequence[float]) -> dict[str, DrawnLength]:
    """Each segment drawn on two or more of the ``labelled`` slices, measured in millimetres."""
    slice_mm = pp.slice_spacing(tuple(spacing), axis)
    row_mm, col_mm = pp.slice_pixel_spacing(tuple(spacing), axis)
    stack = {i: pp.take_slice(labels, axis, i) for i in sorted(set(labelled))}
    lengths = {}
    for segment in segments:
        length = drawn_length({i: int((plane == segment.label).sum()) for i, plane in stack.items()}, slice_mm,
                              row_mm * col_mm)
        if length is not None:
            lengths[segment.name] = length
    return lengths


def lengths_to_record(lengths: Mapping[str, DrawnLength]) -> dict[str, dict]:
    """The form a case record keeps (adapter metadata, JSON)."""
    return {name: length.to_dict() for name, length in lengths.items()}


def reach_per_radius(cases: Iterable[Mapping[str, DrawnLength]], spacing_bound: float,
                     drawing: Optional[Mapping[str, DrawnLength]] = None) -> dict[str, float]:
    """Per segment: how far it reaches each side of a drawn slice, in radii of its widest cross-section.

    A case's length is its drawn span plus ``spacing_bound`` x its label gap
    at each end; half of it, over the radius, is that case's ratio; the
    segment's is the median over the cases that drew it on two slices or more.
    A case measured from ``drawing`` itself (the drawing being propagated,
    which an adapter trained on it records) is left out: it knows nothing
    the drawing does not, so the walks keep the drawing's own bound.
    """
    drawing = drawing or {}
    ratios: dict[str, list[float]] = {}
    for case in cases:
        for name, length in case.items():
            if name in drawing and length.same_drawing(drawing[name]):
                continue
            if length.radius_mm > 0:
                half = length.span_mm / 2 + spacing_bound * length.gap_mm
                ratios.setdefault(name, []).append(half / length.radius_mm)
    return {name: float(np.median(values)) for name, values in ratios.items()}


def lengths_from_records(records: Iterable[Mapping]) -> list[dict[str, DrawnLength]]:
    """The drawn lengths kept in an adapter's case records (cases recorded before they existed have none)."""
    return [{name: DrawnLength.from_dict(values) for name, values in record.get("lengths", {}).items()}
            for record in records]

