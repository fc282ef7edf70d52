"""Segment a whole volume (or a slice range) with an adapted model.

Two modes:

``auto``  every slice is prompted with the learned tokens of every segment;
          a voxel takes the most probable segment above the threshold.
``box``   starts from the labelled slices and walks outwards, prompting each
          slice with the segment's tokens plus a box around the neighbour's
          mask (with a margin); a walk stops at the next labelled slice, when
          the mask vanishes, shrinks abruptly, or its predicted IoU drops.

Either way the user's labelled slices come back exactly as drawn, optional
3D clean-up keeps the largest connected component of each segment, and the
result is a label map on exactly the input grid.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from . import preprocessing as pp
from .devices import autocast, autocast_dtype, resolve_device
from .models import PromptableSegmenter
from .prompts import SegmentPrompts
from .volume_io import Segment

MODES = ("auto", "box")


class PropagationInputError(ValueError):
    """Propagation cannot run on the given inputs."""


@dataclass
class PropagationConfig:
    mode: str = "auto"
    slice_range: Optional[tuple[int, int]] = None   # inclusive first, last
    batch_size: int = 4
    threshold: float = 0.5
    cleanup: bool = True
    box_margin_mm: float = 3.0
    min_predicted_iou: float = 0.5
    min_area_ratio: float = 0.2
    device: str = "auto"
    precision: str = "auto"


@dataclass
class PropagationProgress:
    done: int
    total: int
    elapsed_s: float
    eta_s: float


@dataclass
class PropagationResult:
    labels: np.ndarray
    slices: list[int]
    seconds: float
    interrupted: bool = False


class VolumePropagator:
    """Runs an adapted model over the slices of one volume."""

    def __init__(self, model: PromptableSegmenter, prompts: SegmentPrompts, segments: list[Segment],
                 intensity: pp.IntensityMapping, axis: str, config: PropagationConfig) -> None:
        if config.mode not in MODES:
            raise PropagationInputError(f"Unknown propagation mode '{config.mode}'; choose {' or '.join(MODES)}")
        self.device = resolve_device(config.device)
        self.dtype = autocast_dtype(self.device, config.precision)
        self.model = model.to(self.device).eval()
        self.tokens = prompts.tokens.detach().to(self.device)
        self.segments = segments
        self.intensity = intensity
        self.axis = axis
        self.config = config

    # ------------------------------------------------------------------ helpers
    def _slice_indices(self, shape: tuple[int, ...]) -> list[int]:
        count = pp.slice_count(shape, self.axis)
        if self.config.slice_range is None:
            return list(range(count))
        first, last = self.config.slice_range
        if not (0 <= first <= last < count):
            raise PropagationInputError(f"Slice range {first}:{last} is outside 0:{count - 1} along {self.axis}")
        return list(range(first, last + 1))

    @torch.inference_mode()
    def _embed(self, volume01: np.ndarray, indices: list[int], geometry: pp.SliceGeometry) -> torch.Tensor:
        inputs = torch.stack([pp.slice_to_input(pp.rescale_slice(pp.take_slice(volume01, self.axis, i)), geometry)
                              for i in indices]).to(self.device)
        with autocast(self.device, self.dtype):
            return self.model.encode(inputs, geometry.resized_shape)

    @torch.inference_mode()
    def _decode(self, embedding: torch.Tensor, sparse: torch.Tensor,
                geometry: pp.SliceGeometry) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(self.device, self.dtype):
            logits, iou = self.model.decode(embedding[None], sparse)
        return torch.sigmoid(pp.logits_to_slice(logits.float(), geometry)).cpu(), iou.float()[:, 0].cpu()

    # ------------------------------------------------------------------ run
    def run(self, image: np.ndarray, spacing: tuple[float, float, float],
            user_labels: Optional[np.ndarray] = None, labelled_slices: Optional[list[int]] = None,
            on_progress: Optional[Callable[[PropagationProgress], None]] = None,
            should_stop: Optional[Callable[[], bool]] = None) -> PropagationResult:
        """Segment ``image`` (z, y, x). ``user_labels`` + ``labelled_slices`` are what the user drew."""
        start = time.perf_counter()
        if user_labels is not None and user_labels.shape != image.shape:
            raise PropagationInputError(f"Labels shape {user_labels.shape} differs from image shape {image.shape}")
        labelled = sorted(set(labelled_slices or []))
        if self.config.mode == "box" and (user_labels is None or not labelled):
            raise PropagationInputError("Box propagation starts from labelled slices: pass the labels you drew")
        indices = self._slice_indices(image.shape)
        volume01 = self.intensity.apply(image)
        geometry = pp.geometry_for(pp.take_slice(image, self.axis, 0).shape,
                                   pp.slice_pixel_spacing(spacing, self.axis), self.model.input_size)
        probabilities = np.zeros((len(self.segments), *image.shape), dtype=np.float16)

        def report(done: int, total: int) -> None:
            if on_progress is not None:
                elapsed = time.perf_counter() - start
                on_progress(PropagationProgress(done, total, elapsed, elapsed / max(done, 1) * (total - done)))

        if self.config.mode == "auto":
            interrupted = self._run_auto(volume01, indices, geometry, probabilities, report, should_stop)
        else:
            interrupted = self._run_box(volume01, indices, geometry, probabilities, user_labels, labelled,
                                        spacing, report, should_stop)
        labels = self._labels_from_probabilities(probabilities)
        values = [s.label for s in self.segments]
        if user_labels is not None:
            # Before the clean-up too: the drawn slices join the pieces predicted between them.
            restore_labelled_slices(labels, user_labels, labelled, self.axis, values)
        if self.config.cleanup:
            if user_labels is not None:
                bound_by_labelled_negatives(labels, user_labels, labelled, self.axis, values)
            labels = keep_largest_components(labels, values)
        if user_labels is not None:
            restore_labelled_slices(labels, user_labels, labelled, self.axis, values)
        return PropagationResult(labels, indices, time.perf_counter() - start, interrupted)

    def _run_auto(self, volume01, indices, geometry, probabilities, report, should_stop) -> bool:
        for chunk_start in range(0, len(indices), self.config.batch_size):
            if should_stop is not None and should_stop():
                return True
            chunk = indices[chunk_start:chunk_start + self.config.batch_size]
            embeddings = self._embed(volume01, chunk, geometry)
            for row, index in enumerate(chunk):
                maps, _ = self._decode(embeddings[row], self.tokens, geometry)
                for k in range(len(self.segments)):
                    pp.put_slice(probabilities[k], self.axis, index, maps[k].numpy())
            report(chunk_start + len(chunk), len(indices))
        return False

    def _run_box(self, volume01, indices, geometry, probabilities, user_labels, labelled, spacing,
                 report, should_stop) -> bool:
        embeddings: dict[int, torch.Tensor] = {}
        in_range = set(indices)
        for chunk_start in range(0, len(indices), self.config.batch_size):
            if should_stop is not None and should_stop():
                return True
            chunk = indices[chunk_start:chunk_start + self.config.batch_size]
            for index, embedding in zip(chunk, self._embed(volume01, chunk, geometry)):
                embeddings[index] = embedding
            report(chunk_start + len(chunk), len(indices))
        row_spacing, _ = pp.slice_pixel_spacing(spacing, self.axis)
        margin = self.config.box_margin_mm / row_spacing
        labelled_set = set(labelled)
        for k, segment in enumerate(self.segments):
            for seed in labelled:
                seed_mask = pp.take_slice(user_labels, self.axis, seed) == segment.label
                if not seed_mask.any():
                    continue
                for step in (-1, 1):
                    previous = seed_mask
                    index = seed + step
                    while index in in_range and index not in labelled_set:
                        box = pp.mask_box(previous, margin)
                        boxes = torch.as_tensor(geometry.boxes_to_input(box), dtype=torch.float32, device=self.device)
                        with torch.inference_mode(), autocast(self.device, self.dtype):
                            sparse = torch.cat([self.tokens[k:k + 1], self.model.embed_boxes(boxes)], dim=1)
                        maps, iou = self._decode(embeddings[index], sparse, geometry)
                        mask = maps[0].numpy() > self.config.threshold
                        if (not mask.any() or float(iou[0]) < self.config.min_predicted_iou
                                or mask.sum() < self.config.min_area_ratio * previous.sum()):
                            break
                        current = pp.take_slice(probabilities[k], self.axis, index)
                        pp.put_slice(probabilities[k], self.axis, index, np.maximum(current, maps[0].numpy()))
                        previous = mask
                        index += step
        return False

    def _labels_from_probabilities(self, probabilities: np.ndarray) -> np.ndarray:
        best = probabilities.argmax(axis=0)
        confident = probabilities.max(axis=0) > self.config.threshold
        values = np.array([s.label for s in self.segments], dtype=np.uint16)
        return np.where(confident, values[best], 0).astype(np.uint16)


def keep_largest_components(labels: np.ndarray, values: list[int]) -> np.ndarray:
    """Keep each segment's largest 3D connected component (face connectivity)."""
    from scipy import ndimage

    cleaned = labels.copy()
    for value in values:
        mask = labels == value
        if not mask.any():
            continue
        components, count = ndimage.label(mask)
        if count > 1:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            cleaned[mask & (components != sizes.argmax())] = 0
    return cleaned


def bound_by_labelled_negatives(labels: np.ndarray, user_labels: np.ndarray, labelled: list[int], axis: str,
                                values: list[int]) -> None:
    """Remove each segment beyond the nearest labelled slice on which the user left it out, in place.

    A labelled slice without a segment is the user saying "not here"; for a
    single connected structure (what the clean-up assumes) nothing of it can
    lie on the far side of that slice either.
    """
    dim = pp.slice_axis(axis)
    count = labels.shape[dim]
    for value in values:
        present = [i for i in labelled if (pp.take_slice(user_labels, axis, i) == value).any()]
        if not present:
            continue
        absent = [i for i in labelled if i not in present]
        below = [i for i in absent if i < min(present)]
        above = [i for i in absent if i > max(present)]
        first = max(below) + 1 if below else 0
        last = min(above) - 1 if above else count - 1
        outside = np.ones(count, dtype=bool)
        outside[first:last + 1] = False
        shape = [1, 1, 1]
        shape[dim] = count
        labels[(labels == value) & outside.reshape(shape)] = 0


def restore_labelled_slices(labels: np.ndarray, user_labels: np.ndarray, labelled: list[int], axis: str,
                            values: list[int]) -> None:
    """Put the user's drawing back on every labelled slice, for the propagated segments, in place."""
    for index in labelled:
        drawn = pp.take_slice(user_labels, axis, index)
        current = pp.take_slice(labels, axis, index).copy()
        current[np.isin(current, values)] = 0
        selected = np.isin(drawn, values)
        current[selected] = drawn[selected]
        pp.put_slice(labels, axis, index, current)
