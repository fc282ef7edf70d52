"""Box propagation: the drawn slices give each segment its shape, the model gives it its ends.

For one segment:

1. Between its drawn slices the shape is interpolated (ITK's morphological
   contour interpolation, :mod:`interpolation`), honouring labelled slices on
   which the user left the segment out.
2. From each outermost drawn slice a box walk prompts the adapted model slice
   by slice (the segment's learned tokens plus a box around the previous
   answer); :mod:`extent` decides from its answers, the image features
   (:mod:`appearance`) and the user's label spacing where the segment ends.
3. The interpolation closes the shape just past each end; on the slices a
   walk covered, the model's probabilities are blended with that closing
   shape (:func:`walk_fusion_weight`); between drawn slices, on the slices
   far enough from every drawn one (:func:`slices_far_from_drawn`), with
   the interpolated shape (``inside_fusion``).

:class:`BoxPropagation` holds what one volume's run shares between segments
(the embeddings made so far, the grid, the labelled slices), so the
leave-one-out estimate (:mod:`estimate`) reuses it for free.

A slice the user marked as without a segment (``absent``: in Slicer, a slice
they emptied after a propagation) counts as a labelled slice for that segment
alone: the interpolation leaves it empty and a walk stops before it, all the
way up to it rather than half way, since the user looked at that very slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
from scipy import ndimage

from . import preprocessing as pp
from .appearance import SegmentAppearance, build_appearance
from .extent import (END_DRAWN, END_EDGE, END_HALFWAY, END_MARKED, END_RANGE, END_SIZE, EVIDENCE_ENDS, SegmentEnd,
                     SegmentExtent, WalkStep, decide_end, halfway_limit, spacing_limit)
from .interpolation import interpolate_segment
from .slices import array_axis
from .structure_length import drawn_length, reach_per_radius


class PropagationStopped(Exception):
    """A stop request arrived in the middle of a walk."""


def box_margin_pixels(mask: np.ndarray, fraction: float) -> float:
    """A margin that scales with the structure: ``fraction`` of the mask's larger side, at least one pixel."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return 1.0
    return max(1.0, fraction * max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1))


def soft_mask(mask: np.ndarray, softness: float = 1.0) -> np.ndarray:
    """A binary slice as a probability map: 0.5 on its boundary, towards 1 inside and 0 outside.

    A logistic of the signed distance to the boundary (in pixels), so it
    blends with the model's probabilities on the same scale.
    """
    if not mask.any():
        return np.zeros(mask.shape, np.float32)
    inside = ndimage.distance_transform_edt(mask)
    outside = ndimage.distance_transform_edt(~mask)
    signed = np.where(mask, inside - 0.5, 0.5 - outside)
    return (1.0 / (1.0 + np.exp(-signed / softness))).astype(np.float32)


def walk_fusion_weight(end_fusion: float, bounded_end_fusion: float, end: SegmentEnd, drawn_slices: int) -> float:
    """The model's weight against the closing shape on the slices one walk covered.

    From a single drawn slice the closing shape is only that slice shrinking
    away, so the model's masks are the shape there (``end_fusion``); so too
    past slices drawn densely, which the drawn region's size bounds as it
    bounds one slice (:func:`extent.drawn_densely`; docs/quality/README.md
    "Drawn on neighbouring slices"). From two drawn slices or more, a walk that the
    model's own evidence ended (nothing found, a sliver, an unlike region)
    followed the structure to where it faded, and its masks are blended in
    the same way; a walk a bound ended (the drawn spacing, half way, a
    labelled slice without it, an edge) was cut where the model still saw a
    region, and near a tip those masks hold more false than true voxels: the
    shape closed towards that end is kept (``bounded_end_fusion``,
    docs/quality/README.md "Which walks take the model's half").
    """
    if drawn_slices <= 1 or end.reason in EVIDENCE_ENDS or end.reason == END_SIZE:
        return end_fusion
    return bounded_end_fusion


def slices_far_from_drawn(present: Sequence[int], labelled: Sequence[int], min_distance: int,
                          slice_spacing_mm: float) -> list[int]:
    """The unlabelled slices between the outermost drawn ones at least ``min_distance`` slices and mm from any.

    Next to a drawn slice the interpolated shape is nearly the drawing
    itself, and the model's mask (a coarser answer) only blurs it; further
    into a gap the interpolation is a guess and the image helps. Measured on
    the development set (1 mm slices, docs/quality/README.md "Between the drawn slices"): the
    model's blend loses at one slice from a drawing, ties at two, gains from
    three. The distance must hold in slices and in millimetres, so thick
    slices (not in the development set) are treated no less cautiously than
    thin ones.
    """
    drawn = sorted(present)
    if len(drawn) < 2:
        return []
    labelled_set = set(labelled)
    far = []
    for index in range(drawn[0] + 1, drawn[-1]):
        if index in labelled_set:
            continue
        distance = min(abs(index - d) for d in drawn)
        if distance >= min_distance and distance * slice_spacing_mm >= min_distance:
            far.append(index)
    return far


@dataclass
class SegmentResult:
    """One segment's mask over the volume, its extent, and the model's maps on the walked slices."""

    mask: np.ndarray
    extent: SegmentExtent
    walked: dict[int, np.ndarray]


class BoxPropagation:
    """One volume's box propagation; ``propagator`` supplies the model, the prompts and the settings."""

    def __init__(self, propagator, volume01: np.ndarray, geometry: pp.SliceGeometry,
                 spacing: tuple[float, float, float], indices: Sequence[int],
                 should_stop: Optional[Callable[[], bool]] = None,
                 absent: Optional[Mapping[str, Iterable[int]]] = None) -> None:
        self.propagator = propagator
        self.absent = {name: frozenset(int(i) for i in slices) for name, slices in (absent or {}).items()}
        self.config = propagator.config
        self.axis = propagator.axis
        self.volume01 = volume01
        self.geometry = geometry
        self.spacing = spacing
        self.indices = list(indices)
        self.count = pp.slice_count(volume01.shape, self.axis)
        self.should_stop = should_stop
        self._embeddings: dict[int, torch.Tensor] = {}
        self._appearances: dict[tuple[int, tuple[int, ...]], Optional[SegmentAppearance]] = {}

    # ------------------------------------------------------------------ model access
    def embedding(self, index: int, upcoming: Sequence[int] = ()) -> torch.Tensor:
        """The slice's image embedding, made on demand a batch at a time along ``upcoming``, then kept."""
        if index not in self._embeddings:
            batch = [index] + [i for i in upcoming if i not in self._embeddings][:self.propagator.batch_size - 1]
            for i, embedding in zip(batch, self.propagator.embed(self.volume01, batch, self.geometry)):
                self._embeddings[i] = embedding
        return self._embeddings[index]

    def _check_stop(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise PropagationStopped

    def _predict(self, k: int, index: int, guide: np.ndarray, upcoming: Sequence[int] = ()) -> np.ndarray:
        """The model's probability map of segment ``k`` on slice ``index``, prompted by a box around ``guide``."""
        self._check_stop()
        box = pp.mask_box(guide, box_margin_pixels(guide, self.config.box_margin))
        return self.propagator.predict_box(self.embedding(index, upcoming), k, box, self.geometry)

    def _appearance(self, k: int, drawn: np.ndarray, present: list[int]) -> Optional[SegmentAppearance]:
        key = (k, tuple(present))
        if key not in self._appearances:
            low = self.propagator.embedding_grid
            grids = [pp.mask_to_input(pp.take_slice(drawn, self.axis, i), self.geometry, output_size=low).numpy() > 0.5
                     for i in present]
            self._appearances[key] = build_appearance([self.embedding(i, present) for i in present], grids)
        return self._appearances[key]

    # ------------------------------------------------------------------ one segment
    def segment(self, k: int, name: str, drawn: np.ndarray, labelled: Sequence[int],
                only: Optional[int] = None, known_ends: Optional[Sequence[Optional[SegmentEnd]]] = None
                ) -> Optional[SegmentResult]:
        """Segment ``k`` from its drawn mask; None if it is drawn nowhere.

        ``only`` restricts the model's work between drawn slices to that one
        slice (the leave-one-out estimate needs no other); ``known_ends``
        reuses ends already decided (None entries are walked again).
        ``labelled`` are the slices labelled for every segment; the slices
        marked without this one are added here.
        """
        labelled = sorted(set(labelled) | self.absent.get(name, frozenset()))
        present = [i for i in labelled if pp.take_slice(drawn, self.axis, i).any()]
        if not present:
            return None
        ends, walks = [], []
        for side, direction in enumerate((-1, 1)):
            known = known_ends[side] if known_ends is not None else None
            if known is not None:
                ends.append(known)
                continue
            end, maps = self._walk_to_end(k, name, drawn, present, labelled, direction)
            ends.append(end)
            walks.append((end, maps))
        extent = SegmentExtent(name, ends[0], ends[1])
        shape = closed_shape(drawn, self.axis, labelled, extent)
        walked = {}
        for end, maps in walks:
            walked.update(maps)
            weight = walk_fusion_weight(self.config.end_fusion, self.config.bounded_end_fusion, end, len(present))
            if weight > 0:
                self._fuse(shape, maps, weight)
        if self.config.inside_fusion > 0:
            inside = {}
            between = slices_far_from_drawn(present, labelled, self.config.inside_fusion_from,
                                            pp.slice_spacing(self.spacing, self.axis))
            if only is not None:
                between = [i for i in between if i == only]
            for position, index in enumerate(between):
                guide = pp.take_slice(shape, self.axis, index)
                if guide.any():
                    inside[index] = self._predict(k, index, guide, between[position + 1:])
            self._fuse(shape, inside, self.config.inside_fusion)
        return SegmentResult(shape, extent, walked)

    def _fuse(self, shape: np.ndarray, model_maps: dict[int, np.ndarray], weight: float) -> None:
        """Replace slices of ``shape`` (in place) by the model's map blended with the shape's own soft mask."""
        for index, probabilities in model_maps.items():
            blended = weight * probabilities + (1 - weight) * soft_mask(pp.take_slice(shape, self.axis, index))
            pp.put_slice(shape, self.axis, index, blended > self.config.threshold)

    def _pixel_area_mm2(self) -> float:
        row_spacing, col_spacing = pp.slice_pixel_spacing(self.spacing, self.axis)
        return row_spacing * col_spacing

    def _known_reach(self, name: str, areas: dict[int, int]) -> Optional[float]:
        """How far the adapter's training cases say ``name`` reaches, in radii; None if they never measured it.

        ``areas`` (the segment's drawn area per drawn slice) identify a record
        of this very drawing, which is left out (:func:`reach_per_radius`).
        """
        if not self.propagator.lengths:
            return None
        drawing = drawn_length(areas, pp.slice_spacing(self.spacing, self.axis), self._pixel_area_mm2())
        return reach_per_radius(self.propagator.lengths, self.config.extent.spacing_bound,
                                {name: drawing} if drawing is not None else None).get(name)

    def _walk_to_end(self, k: int, name: str, drawn: np.ndarray, present: list[int], labelled: list[int],
                     direction: int) -> tuple[SegmentEnd, dict[int, np.ndarray]]:
        """Walk from the outermost drawn slice towards ``direction``; decide where the segment ends.

        Returns the end and the model's probability maps on the slices up to it.
        """
        rule = self.config.extent
        outermost = present[0] if direction < 0 else present[-1]
        # How far the walk may go: up to a labelled slice without the segment, or the edge of the volume,
        # and never outwards past the slice range (it may cross into the range from a drawn slice outside).
        absent = [i for i in labelled if (i - outermost) * direction > 0]
        if absent:
            nearest = max(absent) if direction < 0 else min(absent)
            marked = nearest in self.absent.get(name, ())
            limit, hard_reason = nearest - direction, END_MARKED if marked else END_DRAWN
        else:
            limit, hard_reason = (0 if direction < 0 else self.count - 1), END_EDGE
        range_edge = self.indices[0] if direction < 0 else self.indices[-1]
        if (range_edge - outermost) * direction <= 0:
            return SegmentEnd(outermost, END_RANGE, 0), {}  # everything this way lies outside the range
        if (limit - range_edge) * direction > 0:
            limit, hard_reason = range_edge, END_RANGE
        seed = pp.take_slice(drawn, self.axis, outermost)
        areas = {i: int(pp.take_slice(drawn, self.axis, i).sum()) for i in present}
        known_reach = self._known_reach(name, areas)
        bound, bound_reason = spacing_limit(rule, areas, outermost, self._pixel_area_mm2(),
                                            pp.slice_spacing(self.spacing, self.axis), known_reach)
        reachable = abs(limit - outermost)
        # A slice drawn without the segment halves the way to it, unless a known length places the end.
        halfway = halfway_limit(rule, reachable) if hard_reason == END_DRAWN and known_reach is None else None
        if halfway is not None and halfway < min(bound, reachable):
            bound, bound_reason = halfway, END_HALFWAY
        path = [outermost + direction * d for d in range(1, min(bound, reachable) + 1)]
        walk: list[WalkStep] = []
        maps: dict[int, np.ndarray] = {}
        previous = seed
        low = self.propagator.embedding_grid
        appearance = self._appearance(k, drawn, present) if path else None
        for position, index in enumerate(path):
            probabilities = self._predict(k, index, previous, path[position + 1:])
            mask = probabilities > self.config.threshold
            maps[index] = probabilities
            similarity = None
            if appearance is not None and mask.any():
                grid = pp.mask_to_input(mask, self.geometry, output_size=low).numpy() > 0.5
                score = appearance.score(self.embedding(index), grid)
                similarity = None if score is None else score / max(appearance.reference, 1e-6)
            walk.append(WalkStep(index, int(mask.sum()), similarity))
            if not mask.any():
                break
            previous = mask
        end = decide_end(rule, outermost, walk, areas[outermost], bound_reason if bound < reachable else hard_reason)
        return end, {index: maps[index] for index in path[:end.beyond_drawn]}


def closed_shape(drawn: np.ndarray, axis: str, labelled: Sequence[int], extent: SegmentExtent) -> np.ndarray:
    """The drawn mask interpolated between its drawn slices and closed just past each end of ``extent``.

    The volume is padded by one slice on each side, so an end on the first
    or last slice still has an "absent" slice beyond it to close towards.
    """
    dim = array_axis(axis)
    padding = [(0, 0)] * drawn.ndim
    padding[dim] = (1, 1)
    padded = np.pad(drawn, padding)
    absent = [extent.first.slice - 1, extent.last.slice + 1]
    shape = interpolate_segment(padded, axis, sorted({i + 1 for i in labelled} | {i + 1 for i in absent}))
    return np.take(shape, np.arange(1, drawn.shape[dim] + 1), axis=dim)


def compose_label_map(masks: Sequence[Optional[np.ndarray]], values: Sequence[int],
                      shape: tuple[int, ...]) -> np.ndarray:
    """One label map from per-segment masks; where masks overlap, the voxel deepest inside one wins."""
    labels = np.zeros(shape, np.uint16)
    depth = np.zeros(shape, np.float32)
    for mask, value in zip(masks, values):
        if mask is None or not mask.any():
            continue
        box = ndimage.find_objects(mask.astype(np.uint8))[0]
        box = tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in box)
        inside = ndimage.distance_transform_edt(mask[box])
        wins = mask[box] & (inside > depth[box])
        labels[box][wins] = value
        depth[box][wins] = inside[wins]
    return labels
