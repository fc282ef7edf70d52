"""Where each structure starts and ends: a decision per end, from evidence available at run time.

Beyond the outermost slice a user drew, a box walk prompts the model slice by
slice (:mod:`propagation`); each step leaves a :class:`WalkStep`. The walk
decides how far the structure goes from three kinds of evidence:

- the user's own labels: a labelled slice without the segment is a hard end
  (and, without other evidence, the end is taken half way to it), and the
  spacing of the drawn slices is a soft bound (a structure drawn every 5
  slices rarely runs 15 slices past the last one; a single drawn slice
  bounds the extent by the structure's in-plane radius, as for a round lesion),
  tightened where the drawn area shrinks towards the outermost drawn slice
  (drawn small, the end is near);
- the image: how much the predicted region looks like the drawn structure in
  the encoder's features (:mod:`appearance`), relative to how the drawn
  slices themselves score;
- the shape: a predicted region that vanishes or shrinks to a sliver of the
  last drawn one.

The decided end becomes a labelled "absent" slice just past it, so the shape
interpolation closes the structure there (:mod:`interpolation`). Every end
carries the reason it was chosen; the report and the Slicer log show them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping, Optional, Sequence

# Why an end is where it is (report strings).
END_DRAWN = "drawn up to a labelled slice without it"
END_EDGE = "edge of the volume"
END_RANGE = "edge of the slice range"
END_EMPTY = "the model found nothing"
END_SHRANK = "the region shrank to a sliver"
END_APPEARANCE = "the region stopped looking like the drawn structure"
END_SPACING = "the spacing of the drawn slices bounds it"
END_SIZE = "the drawn region's size bounds it"
END_LENGTH = "its length in the adapter's training cases bounds it"
END_TAPER = "its drawn area shrinks towards the end"
END_HALFWAY = "half way to a labelled slice without it"
END_MARKED = "up to a slice where you marked it absent"
# The ends the model's own answers decided; every other end is a bound.
EVIDENCE_ENDS = (END_EMPTY, END_SHRANK, END_APPEARANCE)


@dataclass(frozen=True)
class ExtentRule:
    """Thresholds of the end decision (chosen on the development set: docs/quality/README.md)."""

    spacing_bound: float = 1.0        # x the user's label spacing beyond the outermost drawn slice
    radius_bound: float = 0.75        # x in-plane radius / slice spacing, when one slice is drawn
    min_similarity: float = 0.5       # x the drawn slices' own appearance score
    min_area_ratio: float = 0.1       # x the area of the outermost drawn slice
    # x the distance at which the drawn area's shrinking (next drawn slice -> outermost) would reach zero:
    # a user who drew close to the end drew it small. The spacing bound alone assumes evenly drawn slices, one
    # gap inside the ends; drawn near the ends or at random it overshoots (docs/quality/README.md "Where you
    # draw": the near_ends and random protocols; scripts/extent_study.py). None: off
    taper_bound: Optional[float] = 0.5
    # x the slices between the outermost drawn slice and a labelled slice without the segment: the end lies
    # somewhere between, and without evidence half way is the least wrong guess (None: up to that slice)
    halfway_bound: Optional[float] = 0.5
    # x the widest drawn region's radius (in slices): drawn slices no further apart than this (or next to each
    # other) were drawn densely where the structure is clearest, and their gap says nothing of its length; they
    # are bounded by the radius, as one drawn slice is (docs/quality/README.md "Drawn on neighbouring slices";
    # scripts/extent_study.py). None: only slices next to each other
    dense_gap: Optional[float] = 0.2

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class WalkStep:
    """The model's answer on one slice of a walk outwards from the outermost drawn slice."""

    index: int
    area: int                          # predicted pixels
    similarity: Optional[float]        # appearance score / the drawn slices' score; None if nothing found


@dataclass
class SegmentEnd:
    """The outermost slice holding the segment at one end, and why."""

    slice: int
    reason: str
    beyond_drawn: int                  # slices past the outermost drawn one


@dataclass
class SegmentExtent:
    """A segment's first and last slice along the slice axis."""

    name: str
    first: SegmentEnd
    last: SegmentEnd

    def to_dict(self) -> dict:
        return {"segment": self.name, "first": self.first.slice, "last": self.last.slice,
                "first_reason": self.first.reason, "last_reason": self.last.reason,
                "beyond_drawn": [self.first.beyond_drawn, self.last.beyond_drawn], "text": self.describe()}

    def describe(self) -> str:
        return (f"{self.name}: slices {self.first.slice}-{self.last.slice} "
                f"(first: {self.first.reason}; last: {self.last.reason})")


def label_spacing(drawn: Sequence[int]) -> Optional[float]:
    """How far apart the user drew a segment: the largest gap between its drawn slices.

    The largest gap, not the mean: slices drawn for *other* segments often
    land inside this one's extent and would make the user's spacing look
    denser than it was.
    """
    drawn = sorted(drawn)
    if len(drawn) < 2:
        return None
    return float(max(b - a for a, b in zip(drawn[:-1], drawn[1:])))


def equivalent_radius_mm(area_pixels: int, pixel_area_mm2: float) -> float:
    """In-plane radius of a drawn region taken as a disc of the same area, in millimetres."""
    return math.sqrt(max(area_pixels, 0) * pixel_area_mm2 / math.pi)


def equivalent_radius_slices(area_pixels: int, pixel_area_mm2: float, slice_spacing_mm: float) -> float:
    """In-plane radius of a drawn region (as a disc), in slices: a round structure's reach along the axis."""
    return equivalent_radius_mm(area_pixels, pixel_area_mm2) / slice_spacing_mm


def drawn_densely(rule: ExtentRule, spacing: float, widest_radius_slices: float) -> bool:
    """Whether drawn slices ``spacing`` apart are a dense drawing rather than a spread one.

    Next to each other always; further apart while the gap is under
    ``rule.dense_gap`` x the widest drawn region's radius (in slices). A
    user who draws every other slice of a large round structure drew where
    it is clearest, not across its length; a small structure drawn every
    other slice was drawn across it.
    """
    if spacing <= 1:
        return True
    return rule.dense_gap is not None and spacing <= rule.dense_gap * widest_radius_slices


def spacing_limit(rule: ExtentRule, areas: Mapping[int, int], outermost: int, pixel_area_mm2: float,
                  slice_spacing_mm: float, known_reach_per_radius: Optional[float] = None) -> tuple[int, str]:
    """Slices past ``outermost`` the evidence may reach (soft bound, at least 1), and why.

    ``areas`` holds the segment's drawn area (pixels) on each slice it is
    drawn on; ``outermost`` is the first or the last of them. From the
    user's drawing: ``spacing_bound`` x the label gap with two drawn slices
    or more; with one, ``radius_bound`` x the drawn region's radius (a round
    lesion's reach). With ``taper_bound`` set, a drawn area that shrinks from
    the next drawn slice inwards to the outermost one caps it: the structure
    ends about where that shrinking would reach nothing. Slices drawn
    densely (a few neighbouring slices where a lesion is clearest:
    :func:`drawn_densely`) say nothing of the structure's length: a gap of
    one slice would stop the walk one slice out, so they are bounded as one
    drawn slice is, by the outermost region's radius.

    When other drawings of the structure measured its length
    (``known_reach_per_radius`` radii each side of its middle, from an
    adapter's training cases, :mod:`structure_length`; scaled by the widest
    region drawn here), that length replaces the drawing's guess. What it
    leaves beyond the drawn slices (nothing if they span it already) is
    shared between the two ends by the radius drawn at each: a structure
    drawn small at one end is near its tip there, one drawn wide runs on.
    ``scripts/extent_study.py`` measures the rules on atlas structures drawn
    evenly, near the ends, at random inside them or on neighbouring slices
    around the middle: with the length known to 20%, sharing by radius puts
    0.69 / 0.82 / 0.61 / 0.71 of the ends within two slices of the truth,
    sharing evenly 0.71 / 0.82 / 0.57 / 0.72, the drawing's own guess 0.95
    / 0.27 / 0.38 / 0.41 at a spacing bound of 1.0 (0.76 / 0.37 / 0.45 at
    0.75: evenly drawn slices sit one gap inside the ends, which 1.0
    matches), 0.81 / 0.60 / 0.54 / 0.41 with the taper at 0.5 (the default)
    (known exactly, by radius: 0.91 / 0.99 / 0.71 / 0.97). Before dense
    drawings were told apart (every gap, one of a single slice too, taken
    for the user's spacing) the taper's row was 0.82 / 0.60 / 0.54 / 0.19.
    A known length wins wherever the user does not draw evenly.
    """
    drawn = sorted(areas)
    end_area = areas[outermost]
    spacing = label_spacing(drawn)
    widest = equivalent_radius_slices(max(areas.values()), pixel_area_mm2, slice_spacing_mm)
    if spacing is not None and not drawn_densely(rule, spacing, widest):
        reach, reason = rule.spacing_bound * spacing, END_SPACING
        inner = drawn[1] if outermost == drawn[0] else drawn[-2]
        shrink = areas[inner] - end_area
        if rule.taper_bound is not None and shrink > 0:
            taper = rule.taper_bound * abs(inner - outermost) * end_area / shrink
            if taper < reach:
                reach, reason = taper, END_TAPER
    else:
        radius = equivalent_radius_slices(end_area, pixel_area_mm2, slice_spacing_mm)
        reach, reason = rule.radius_bound * radius, END_SIZE
    if known_reach_per_radius is not None:
        beyond = max(2 * known_reach_per_radius * widest - (drawn[-1] - drawn[0]), 0.0)   # both ends together
        here = math.sqrt(max(end_area, 0))
        there = math.sqrt(max(areas[drawn[-1] if outermost == drawn[0] else drawn[0]], 0))
        reach, reason = beyond * (here / (here + there) if here + there > 0 else 0.5), END_LENGTH
    return max(1, int(round(reach))), reason


def halfway_limit(rule: ExtentRule, between: int) -> Optional[int]:
    """Slices a walk may go towards a labelled slice without the segment, ``between`` slices lying between.

    The user said the structure is on the outermost drawn slice and not on
    that one: its end is one of the ``between`` slices or the drawn one
    itself, and with nothing else known each is as likely. ``halfway_bound``
    x ``between`` (0.5: the middle, the guess with the smallest expected
    error); None when the rule is off.
    """
    if rule.halfway_bound is None or between < 1:
        return None
    return max(1, int(round(rule.halfway_bound * between)))


def decide_end(rule: ExtentRule, outermost: int, walk: Sequence[WalkStep], end_area: int,
               exhausted_reason: str) -> SegmentEnd:
    """The last slice of the segment beyond ``outermost``, from the walk's evidence.

    ``walk`` holds the model's answers in order, moving away from the
    outermost drawn slice; ``exhausted_reason`` says why it went no further
    when the evidence never said stop (the spacing bound, a labelled slice
    without the segment, the edge of the volume or of the slice range).
    """
    last = outermost
    for taken, observed in enumerate(walk, start=1):
        if observed.area == 0:
            return SegmentEnd(last, END_EMPTY, taken - 1)
        if observed.area < rule.min_area_ratio * end_area:
            return SegmentEnd(last, END_SHRANK, taken - 1)
        if observed.similarity is not None and observed.similarity < rule.min_similarity:
            return SegmentEnd(last, END_APPEARANCE, taken - 1)
        last = observed.index
    return SegmentEnd(last, exhausted_reason, len(walk))
