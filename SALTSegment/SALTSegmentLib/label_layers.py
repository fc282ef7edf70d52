"""Label maps whose segments overlap: several layers of one grid.

Slicer stores overlapping segments as a multi-layer ``.seg.nrrd``: one label
map per layer, a segment being one value in one layer. The engine keeps such
a file as an array of shape (layers, z, y, x) beside the usual (z, y, x)
array of a one-layer map. :func:`volume_io.read_label_map` gives every
segment a value no other layer uses, so a segment is one value whatever the
layer, and every consumer asks for its voxels through :func:`segment_mask`.
Slicing (``preprocessing.take_slice``, ``slices.occupied_slices``) reads the
last three axes as the grid, so a layered map slices like a plain one with
its layers in front.

Box propagation starts each segment from its own drawn voxels and keeps its
own prediction; what needs one label per voxel (interpolation mode, the
quality estimate) reads :func:`flatten_layers`. The output takes the drawn
slices back segment by segment and goes into layers only where segments
overlap (:func:`stack_in_layers`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from .slices import array_axis
from .volume_io import Segment


def is_layered(labels: np.ndarray) -> bool:
    """Whether ``labels`` is a (layers, z, y, x) label map rather than a (z, y, x) one."""
    return np.ndim(labels) == 4


def spatial_shape(labels: np.ndarray) -> tuple[int, int, int]:
    """The (z, y, x) grid of a label map, layered or not."""
    return tuple(int(v) for v in np.shape(labels)[-3:])


def value_mask(labels: np.ndarray, value: int, spatial_dims: int = 3) -> np.ndarray:
    """Where ``labels`` holds ``value`` in any layer; its last ``spatial_dims`` axes are the grid (2: a slice)."""
    mask = np.asarray(labels) == value
    return mask.any(axis=0) if mask.ndim > spatial_dims else mask


def segment_mask(labels: np.ndarray, segment: Segment) -> np.ndarray:
    """The (z, y, x) voxels of ``segment``: its value in whichever layer holds it."""
    return value_mask(labels, segment.label)


def flatten_layers(labels: Optional[np.ndarray], segments: Sequence[Segment]) -> Optional[np.ndarray]:
    """One label per voxel: where segments overlap the smallest one wins (a (z, y, x) map, or None, stays).

    The smaller structure keeps its voxels; the larger one loses only a
    hole, which changes neither its bounding box nor, much, its area.
    """
    if not is_layered(labels):
        return labels
    flat = np.zeros(spatial_shape(labels), dtype=labels.dtype)
    masks = [(segment, segment_mask(labels, segment)) for segment in segments]
    for segment, mask in sorted(masks, key=lambda item: -int(item[1].sum())):
        flat[mask] = segment.label
    return flat


def stack_in_layers(masks: Iterable[np.ndarray], segments: Sequence[Segment], shape: Sequence[int]
                    ) -> tuple[np.ndarray, list[Segment]]:
    """Segments' (z, y, x) masks as a label map, with a new layer only where a segment overlaps every layer so far.

    Returns (z, y, x) labels when no two segments overlap (as a plain label
    map), else (layers, z, y, x); each segment comes back with its layer.
    ``masks`` may be a generator: one mask is held at a time.
    """
    dtype = np.uint16 if max((s.label for s in segments), default=0) > 255 else np.uint8
    layers: list[np.ndarray] = []
    placed = []
    for mask, segment in zip(masks, segments, strict=True):
        mask = np.asarray(mask, dtype=bool)
        layer = next((i for i, existing in enumerate(layers) if not (existing[mask] != 0).any()), None)
        if layer is None:
            layers.append(np.zeros(tuple(shape), dtype=dtype))
            layer = len(layers) - 1
        layers[layer][mask] = segment.label
        placed.append(replace(segment, layer=layer))
    if len(layers) <= 1:
        return (layers[0] if layers else np.zeros(tuple(shape), dtype=dtype)), placed
    return np.stack(layers), placed


def layers_with_drawn_slices(predicted: np.ndarray, segments: Sequence[Segment], drawn: np.ndarray,
                             slices: Sequence[int], axis: str | int,
                             predicted_masks: Optional[Sequence[Optional[np.ndarray]]] = None,
                             kept: Sequence[tuple[Segment, np.ndarray]] = ()) -> tuple[np.ndarray, list[Segment]]:
    """The output of a propagation seeded from overlapping segments, in layers where they still overlap.

    Each of ``segments`` is its own predicted mask (``predicted_masks[i]``,
    which box mode gives before overlaps are resolved), else its voxels in
    ``predicted`` (z, y, x); on the drawn ``slices`` it is exactly its own
    voxels in ``drawn`` (layered, in the same label values), so two drawn
    segments keep their overlap. ``kept`` (segment, mask) pairs are drawn
    segments that pass through unchanged.
    """
    selector: list = [slice(None)] * 3
    selector[array_axis(axis)] = list(slices)
    chosen = tuple(selector)

    def masks() -> Iterator[np.ndarray]:
        for index, segment in enumerate(segments):
            own = predicted_masks[index] if predicted_masks is not None else None
            mask = np.array(own, dtype=bool) if own is not None else np.asarray(predicted) == segment.label
            if len(slices):
                mask[chosen] = segment_mask(drawn, segment)[chosen]
            yield mask
        yield from (mask for _, mask in kept)

    return stack_in_layers(masks(), [*segments, *(segment for segment, _ in kept)], np.shape(predicted))
