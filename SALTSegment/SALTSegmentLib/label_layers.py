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

Box propagation seeds from one label per voxel (:func:`flatten_layers`); the
output takes the drawn slices back segment by segment and goes into layers
only where segments overlap (:func:`stack_in_layers`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence

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


def stack_in_layers(masks: Sequence[np.ndarray], segments: Sequence[Segment]
                    ) -> tuple[np.ndarray, list[Segment]]:
    """Segments' masks as a label map, with a new layer only where a segment overlaps every layer so far.

    Returns (z, y, x) labels when no two segments overlap (as a plain label
    map), else (layers, z, y, x); each segment comes back with its layer.
    """
    if len(masks) != len(segments):
        raise ValueError(f"{len(masks)} masks for {len(segments)} segments")
    shape = spatial_shape(masks[0]) if masks else (0, 0, 0)
    dtype = np.uint16 if max((s.label for s in segments), default=0) > 255 else np.uint8
    layers: list[np.ndarray] = []
    placed = []
    for mask, segment in zip(masks, segments):
        mask = np.asarray(mask, dtype=bool)
        layer = next((i for i, existing in enumerate(layers) if not (existing[mask] != 0).any()), None)
        if layer is None:
            layers.append(np.zeros(shape, dtype=dtype))
            layer = len(layers) - 1
        layers[layer][mask] = segment.label
        placed.append(replace(segment, layer=layer))
    if len(layers) <= 1:
        return (layers[0] if layers else np.zeros(shape, dtype=dtype)), placed
    return np.stack(layers), placed


def layers_with_drawn_slices(predicted: np.ndarray, segments: Sequence[Segment], drawn: np.ndarray,
                             slices: Sequence[int], axis: str | int,
                             kept: Sequence[tuple[Segment, np.ndarray]] = ()) -> tuple[np.ndarray, list[Segment]]:
    """The output of a propagation seeded from overlapping segments, in layers where they still overlap.

    Each of ``segments`` is ``predicted`` (z, y, x, one label per voxel)
    except on the drawn ``slices``, where it is exactly its own voxels in
    ``drawn`` (layered, in the same label values), so two drawn segments keep
    their overlap. ``kept`` (segment, mask) pairs are drawn segments that pass
    through unchanged.
    """
    selector: list = [slice(None)] * 3
    selector[array_axis(axis)] = list(slices)
    chosen = tuple(selector)
    masks = []
    for segment in segments:
        mask = np.asarray(predicted) == segment.label
        if len(slices):
            mask[chosen] = segment_mask(drawn, segment)[chosen]
        masks.append(mask)
    masks.extend(mask for _, mask in kept)
    return stack_in_layers(masks, [*segments, *(segment for segment, _ in kept)])
