"""Segment a whole volume (or a slice range) with an adapted model.

Three modes:

``box``          (the default with drawn labels) each segment's shape comes
                 from the slices the user drew, interpolated between them
                 (ITK's morphological contour interpolation, honouring
                 labelled slices where the segment is absent), and its ends
                 from the model: from the outermost drawn slice a box walk
                 prompts the adapted model slice by slice, and
                 :mod:`extent` decides from its answers, the image features
                 and the user's label spacing where the structure stops. The
                 interpolation then closes the shape at those ends.
``interpolate``  Slicer's *Fill between slices* and nothing else: the
                 baseline a Slicer user already has (:mod:`interpolation`).
``auto``         no drawn labels needed: every slice is prompted with the
                 learned tokens of every segment; a voxel takes the most
                 probable segment above the threshold.

The user's labelled slices always come back exactly as drawn, and the result
is a label map on exactly the input grid.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from scipy import ndimage

from . import preprocessing as pp
from .box_mode import BoxPropagation, PropagationStopped, compose_label_map
from .estimate import QualityEstimate, leave_one_out, suggest_next_slices
from .host.propagation_findings import NextSlice
from .devices import autocast, autocast_dtype, resolve_device
from .extent import ExtentRule, SegmentExtent
from .structure_length import DrawnLength
from .host.choices import PROPAGATION_MODES
from .interpolation import fill_between_slices
from .label_layers import flatten_layers, segment_mask, spatial_shape
from .models import PromptableSegmenter
from .prompts import SegmentPrompts
from .slices import array_axis, check_slice_range, put_back_slices
from .volume_io import Segment

MODES = PROPAGATION_MODES
MODES_NEEDING_LABELS = ("box", "interpolate")


class PropagationInputError(ValueError):
    """Propagation cannot run on the given inputs."""


def encoder_batch_size(batch_size: Optional[int], on_accelerator: bool) -> int:
    """How many slices the image encoder takes at once: ``batch_size`` if given, else 4 on a GPU and 1 on the CPU.

    A batch keeps a GPU busy; on the CPU it is slower per slice, not faster
    (LiteMedSAM on 2 cores, ``scripts/measure_encoder_speed.py --batches
    1,2,4``: 1.4x the time per slice at 4), and the embeddings are the same.
    """
    if batch_size is not None:
        return batch_size
    return 4 if on_accelerator else 1


@dataclass
class PropagationConfig:
    mode: str = "box"
    slice_range: Optional[tuple[int, int]] = None   # inclusive first, last
    batch_size: Optional[int] = None  # slices encoded together; None: encoder_batch_size's choice for the device
    threshold: float = 0.5
    cleanup: bool = True
    box_margin: float = 0.1          # of the box's size, each side (at least one pixel)
    extent: ExtentRule = field(default_factory=ExtentRule)
    end_fusion: float = 0.5          # the model's weight against the closing shape on walks its evidence ended
    bounded_end_fusion: float = 0.0  # ... on walks a bound ended, from two drawn slices or more (box_mode)
    inside_fusion: float = 0.2       # the model's weight against the interpolated shape between drawn slices ...
    inside_fusion_from: int = 3      # ... on slices at least this many slices and millimetres from a drawn one
    estimate: bool = True            # box mode: leave-one-out quality estimate and next-slice suggestions
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
    extents: list[SegmentExtent] = field(default_factory=list)
    estimate: Optional[QualityEstimate] = None
    suggestions: list[NextSlice] = field(default_factory=list)
    segment_masks: Optional[list[Optional[np.ndarray]]] = None   # box mode: each segment's voxels, overlaps kept


class VolumePropagator:
    """Runs an adapted model over the slices of one volume."""

    def __init__(self, model: Optional[PromptableSegmenter], prompts: Optional[SegmentPrompts],
                 segments: list[Segment], intensity: pp.IntensityMapping, axis: str,
                 config: PropagationConfig, lengths: Sequence[Mapping[str, DrawnLength]] = ()) -> None:
        if config.mode not in MODES:
            raise PropagationInputError(f"Unknown propagation mode '{config.mode}'; choose {', '.join(MODES)}")
        if model is None and config.mode != "interpolate":
            raise PropagationInputError(f"Propagation mode '{config.mode}' needs the adapted model")
        self.device = resolve_device(config.device)
        self.dtype = autocast_dtype(self.device, config.precision)
        self.batch_size = encoder_batch_size(config.batch_size, self.device.type != "cpu")
        self.model = model.to(self.device).eval() if model is not None else None
        self.tokens = prompts.tokens.detach().to(self.device) if prompts is not None else None
        self.segments = segments
        self.intensity = intensity
        # How long each segment was drawn in the adapter's training cases (structure_length, box mode's walks).
        self.lengths = list(lengths)
        self.axis = axis
        self.config = config

    # ------------------------------------------------------------------ helpers
    def _slice_indices(self, shape: tuple[int, ...]) -> list[int]:
        count = pp.slice_count(shape, self.axis)
        if self.config.slice_range is None:
            return list(range(count))
        return check_slice_range(self.config.slice_range, count, self.axis, PropagationInputError)

    @property
    def embedding_grid(self) -> int:
        """Side of the image embedding grid (64 for the 256 px models)."""
        return self.model.embedding_size[0]

    @torch.inference_mode()
    def embed(self, volume01: np.ndarray, indices: list[int], geometry: pp.SliceGeometry) -> torch.Tensor:
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

    @torch.inference_mode()
    def predict_box(self, embedding: torch.Tensor, k: int, box: np.ndarray, geometry: pp.SliceGeometry) -> np.ndarray:
        """Probability map (slice grid) of segment ``k``, prompted by its tokens and ``box`` (x0, y0, x1, y1)."""
        return self.predict_box_with_quality(embedding, k, box, geometry)[0]

    @torch.inference_mode()
    def predict_box_with_quality(self, embedding: torch.Tensor, k: int, box: np.ndarray,
                                 geometry: pp.SliceGeometry) -> tuple[np.ndarray, float]:
        """:meth:`predict_box` and the decoder's own quality (predicted IoU) of that mask."""
        boxes = torch.as_tensor(geometry.boxes_to_input(box), dtype=torch.float32, device=self.device)
        with autocast(self.device, self.dtype):
            sparse = torch.cat([self.tokens[k:k + 1], self.model.embed_boxes(boxes).to(self.tokens.dtype)], dim=1)
        maps, quality = self._decode(embedding, sparse, geometry)
        return maps[0].numpy(), float(quality[0])

    # ------------------------------------------------------------------ run
    def run(self, image: np.ndarray, spacing: tuple[float, float, float],
            user_labels: Optional[np.ndarray] = None, labelled_slices: Optional[list[int]] = None,
            on_progress: Optional[Callable[[PropagationProgress], None]] = None,
            should_stop: Optional[Callable[[], bool]] = None,
            absent_slices: Optional[Mapping[str, Sequence[int]]] = None) -> PropagationResult:
        """Segment ``image`` (z, y, x). ``user_labels`` + ``labelled_slices`` are what the user drew.

        ``user_labels`` may hold layers (overlapping segments, see :mod:`label_layers`):
        box mode then starts each segment from its own drawn voxels.
        ``absent_slices`` (segment name -> slices) are slices the user marked
        without that segment: it is empty there in every mode, and box mode's
        walks stop before them (:class:`~box_mode.BoxPropagation`).
        """
        start = time.perf_counter()
        if user_labels is not None and spatial_shape(user_labels) != image.shape:
            raise PropagationInputError(f"Labels shape {user_labels.shape} differs from image shape {image.shape}")
        flat = flatten_layers(user_labels, self.segments)   # one label per voxel where drawn segments overlap
        labelled = sorted(set(labelled_slices or []))
        if self.config.mode in MODES_NEEDING_LABELS and (user_labels is None or not labelled):
            raise PropagationInputError(
                f"'{self.config.mode}' propagation starts from labelled slices: pass the labels you drew")
        indices = self._slice_indices(image.shape)
        absent = check_absent_slices(absent_slices or {}, self.segments, self.axis, image.shape, flat)

        def report(done: int, total: int) -> None:
            if on_progress is not None:
                elapsed = time.perf_counter() - start
                on_progress(PropagationProgress(done, total, elapsed, elapsed / max(done, 1) * (total - done)))

        values = [s.label for s in self.segments]
        extents: list[SegmentExtent] = []
        estimate, suggestions = None, []
        masks: Optional[list[Optional[np.ndarray]]] = None
        interrupted = False
        if self.config.mode == "interpolate":
            drawn = np.where(np.isin(flat, values), flat, 0)
            labels = fill_between_slices(drawn, self.axis).astype(np.uint16)
            report(1, 1)
        else:
            volume01 = self.intensity.apply(image)
            geometry = pp.slice_geometry_for(pp.take_slice(image, self.axis, 0).shape,
                                       pp.slice_pixel_spacing(spacing, self.axis), self.model.input_size)
            if self.config.mode == "auto":
                labels, interrupted = self._run_auto(volume01, indices, geometry, report, should_stop)
            else:
                try:
                    labels, extents, estimate, suggestions, masks = self._run_box(
                        volume01, geometry, user_labels, labelled, indices, spacing, report, should_stop, absent)
                except PropagationStopped:
                    labels, interrupted = np.zeros(image.shape, np.uint16), True
        outside = np.ones(pp.slice_count(image.shape, self.axis), dtype=bool)
        outside[indices] = False
        labels[_along(outside, self.axis)] = 0
        for mask in masks or []:
            if mask is not None:
                mask[_along(outside, self.axis)] = False
        self._clear_absent(labels, masks, absent)
        if user_labels is not None:
            put_back_slices(labels, flat, labelled, self.axis, values)
        return PropagationResult(labels, indices, time.perf_counter() - start, interrupted, extents, estimate,
                                 suggestions, masks)

    def _clear_absent(self, labels: np.ndarray, masks: Optional[list[Optional[np.ndarray]]],
                      absent: Mapping[str, Sequence[int]]) -> None:
        """Empty each segment on the slices marked without it (in place): the user looked and it is not there."""
        for k, segment in enumerate(self.segments):
            slices = absent.get(segment.name)
            if not slices:
                continue
            marked = np.zeros(labels.shape[array_axis(self.axis)], dtype=bool)
            marked[list(slices)] = True
            region = labels[_along(marked, self.axis)]
            region[region == segment.label] = 0
            labels[_along(marked, self.axis)] = region
            if masks is not None and masks[k] is not None:
                masks[k][_along(marked, self.axis)] = False

    # ------------------------------------------------------------------ auto
    def _run_auto(self, volume01, indices, geometry, report, should_stop) -> tuple[np.ndarray, bool]:
        probabilities = np.zeros((len(self.segments), *volume01.shape), dtype=np.float16)
        for chunk_start in range(0, len(indices), self.batch_size):
            if should_stop is not None and should_stop():
                return np.zeros(volume01.shape, np.uint16), True
            chunk = indices[chunk_start:chunk_start + self.batch_size]
            embeddings = self.embed(volume01, chunk, geometry)
            for row, index in enumerate(chunk):
                maps, _ = self._decode(embeddings[row], self.tokens, geometry)
                for k in range(len(self.segments)):
                    pp.put_slice(probabilities[k], self.axis, index, maps[k].numpy())
            report(chunk_start + len(chunk), len(indices))
        labels = self._labels_from_probabilities(probabilities)
        if self.config.cleanup:
            labels = keep_largest_components(labels, [s.label for s in self.segments])
        return labels, False

    def _labels_from_probabilities(self, probabilities: np.ndarray) -> np.ndarray:
        best = probabilities.argmax(axis=0)
        confident = probabilities.max(axis=0) > self.config.threshold
        values = np.array([s.label for s in self.segments], dtype=np.uint16)
        return np.where(confident, values[best], 0).astype(np.uint16)

    # ------------------------------------------------------------------ box
    def _run_box(self, volume01, geometry, user_labels, labelled, indices, spacing, report, should_stop, absent
                 ) -> tuple[np.ndarray, list[SegmentExtent], Optional[QualityEstimate], list[NextSlice],
                            list[Optional[np.ndarray]]]:
        run = BoxPropagation(self, volume01, geometry, spacing, indices, should_stop, absent)
        steps = len(self.segments) * (2 if self.config.estimate else 1)
        results = []
        for k, segment in enumerate(self.segments):
            results.append(run.segment(k, segment.name, segment_mask(user_labels, segment), labelled))
            report(k + 1, steps)
        estimate, suggestions = None, []
        if self.config.estimate:
            flat = flatten_layers(user_labels, self.segments)
            estimate = leave_one_out(run, self.segments, flat, labelled, results,
                                     on_segment=lambda k: report(len(self.segments) + k + 1, steps))
            suggestions = suggest_next_slices(self.segments, flat, labelled, results, self.axis, absent)
        masks = [None if r is None else r.mask for r in results]
        labels = compose_label_map(masks, [s.label for s in self.segments], volume01.shape)
        return labels, [r.extent for r in results if r is not None], estimate, suggestions, masks


def check_absent_slices(absent: Mapping[str, Sequence[int]], segments: Sequence[Segment], axis: str,
                        shape: Sequence[int], drawn: Optional[np.ndarray] = None) -> dict[str, list[int]]:
    """Slices marked without a segment, checked: the adapter's segment names, slices in the volume, none drawn on.

    ``drawn`` is the user's label map in the adapter's label values (one
    label per voxel). Returns each name's sorted slices.
    """
    labels = {s.name: s.label for s in segments}
    unknown = [name for name in absent if name not in labels]
    if unknown:
        raise PropagationInputError(f"Marked absent: {', '.join(map(repr, unknown))}, not one of the adapter's "
                                    f"segments ({', '.join(labels)})")
    count = pp.slice_count(tuple(shape), axis)
    checked = {}
    for name, slices in absent.items():
        outside = sorted({int(i) for i in slices if not 0 <= int(i) < count})
        if outside:
            raise PropagationInputError(f"{name} marked absent on slice(s) {outside}, outside 0..{count - 1}")
        checked[name] = sorted({int(i) for i in slices})
        drawn_on = [] if drawn is None else [i for i in checked[name]
                                             if (pp.take_slice(drawn, axis, i) == labels[name]).any()]
        if drawn_on:
            raise PropagationInputError(f"{name} is drawn on slice(s) {drawn_on}, which are marked without it")
    return checked


def _along(per_slice: np.ndarray, axis: str) -> tuple:
    """An index that applies a per-slice boolean to a (z, y, x) volume along ``axis``."""
    selector: list = [slice(None)] * 3
    selector[array_axis(axis)] = per_slice
    return tuple(selector)


def keep_largest_components(labels: np.ndarray, values: list[int]) -> np.ndarray:
    """Keep each segment's largest 3D connected component (face connectivity)."""
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
