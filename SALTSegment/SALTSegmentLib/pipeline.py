"""The headless jobs behind the CLI, the worker and the demo: files in, files out.

Each function reads its inputs, checks them (grids must match; segments must
exist), runs the engine and writes outputs atomically. Progress and stop
requests come in as callbacks so the CLI, the Slicer worker and the tests
drive the same code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import SimpleITK as sitk

from . import preprocessing as pp
from .slices import adapter_axis_in, check_slice_range, describe_axis, labelled_slices, resolve_axis
from .output_lock import output_lock
from .devices import autocast_dtype, resolve_device
from .preflight import (MemoryEstimate, check_adapter_suffix, check_label_map_suffix, check_memory,
                        check_output_is_not_an_input, check_output_path, propagation_memory, training_memory)
from .adapters import merge_adapters
from .adapter_file import AdapterMetadata, LoadedAdapter, load_adapter, load_adapter_metadata, save_adapter
from .label_layers import flatten_layers, is_layered, layers_with_drawn_slices, value_mask
from .metrics import EvaluationReport, evaluate_label_maps
from .models import WeightsError, get_spec, load_model
from .propagation import (MODES_NEEDING_LABELS, PropagationConfig, PropagationInputError, PropagationProgress,
                          PropagationResult, VolumePropagator)
from .training import (FewShotData, FewShotTrainer, StepReport, TrainingConfig, TrainingInputError, TrainingResult,
                       check_training_data)
from .segment_matching import SegmentMatch, match_segments
from .volume_io import (Segment, VolumeGeometry, read_image, read_label_map, read_volume_info, require_3d_scalar,
                        unlisted_label_values, write_label_map)

class GridMismatchError(ValueError):
    """The label map is not on the image's voxel grid."""


class JobStopped(Exception):
    """A stop request (SIGTERM/SIGINT, Cancel) arrived before anything worth keeping was computed."""


def _volume_info_checked(path: str | os.PathLike, label_map: bool = False):
    info = read_volume_info(path)
    if info is not None:   # a label map's components may be layers: read_label_map decides
        require_3d_scalar(path, len(info.size), 1 if label_map else info.components)
    return info


def _memory_setting(device: str, precision: str) -> dict[str, bool]:
    """Where a job's activations live and whether autocast halves its features (memory estimate inputs)."""
    resolved = resolve_device(device)
    return {"on_gpu": resolved.type != "cpu", "half_precision": autocast_dtype(resolved, precision) is not None}


def _stop_if_requested(should_stop: Optional[Callable[[], bool]], message: str) -> None:
    if should_stop is not None and should_stop():
        raise JobStopped(message)


@dataclass
class LabelledVolume:
    image: np.ndarray
    geometry: VolumeGeometry
    labels: np.ndarray
    segments: list[Segment]


def resample_labels_to(labels: np.ndarray, label_geometry: VolumeGeometry, target: VolumeGeometry) -> np.ndarray:
    """Nearest-neighbour resampling of a label map onto another grid (only when the user asks)."""
    if is_layered(labels):
        return np.stack([resample_labels_to(layer, label_geometry, target) for layer in labels])
    image = label_geometry.apply_to(sitk.GetImageFromArray(labels))
    reference = target.apply_to(sitk.Image(list(target.size), sitk.sitkUInt8))
    resampled = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, image.GetPixelID())
    return sitk.GetArrayFromImage(resampled).astype(np.uint16)


def warn_unlisted_values(labels: np.ndarray, segments: list[Segment], path: str | os.PathLike,
                         on_message: Optional[Callable[[str], None]]) -> None:
    """Say which label values a segmentation holds without listing them in its header (they are ignored)."""
    unlisted = unlisted_label_values(labels, segments)
    if unlisted and on_message is not None:
        values = ", ".join(f"{value} ({count} voxels)" for value, count in unlisted.items())
        on_message(f"warning: {Path(path).name} holds label value{'s' if len(unlisted) > 1 else ''} {values} "
                   "that its header lists for no segment; those voxels are ignored")


def read_labels_on_grid(labels_path: str | os.PathLike, geometry: VolumeGeometry,
                       resample_labels: bool = False,
                       on_message: Optional[Callable[[str], None]] = None) -> tuple[np.ndarray, list[Segment]]:
    """Read a label map for an image grid, refusing (or, if asked, resampling) one on another grid."""
    labels, label_geometry, segments = read_label_map(labels_path)
    warn_unlisted_values(labels, segments, labels_path, on_message)
    differences = label_geometry.differences(geometry)
    if differences:
        if not resample_labels:
            raise GridMismatchError(
                f"The label map is not on the image grid ({'; '.join(differences)}); "
                "pass --resample-labels to resample it onto the image")
        labels = resample_labels_to(labels, label_geometry, geometry)
    return labels, segments


def read_labelled_volume(image_path: str | os.PathLike, labels_path: str | os.PathLike,
                         resample_labels: bool = False,
                         on_message: Optional[Callable[[str], None]] = None) -> LabelledVolume:
    """Read an image and its label map on the same grid (see :func:`read_labels_on_grid`)."""
    image, geometry = read_image(image_path)
    labels, segments = read_labels_on_grid(labels_path, geometry, resample_labels, on_message)
    return LabelledVolume(image, geometry, labels, segments)


def select_segments(segments: list[Segment], wanted: Optional[list[str]]) -> list[Segment]:
    """Segments named (or numbered) in ``wanted``; all of them when it is empty."""
    if not wanted:
        return list(segments)
    chosen = []
    for item in wanted:
        match = [s for s in segments if s.name == item or str(s.label) == item]
        if not match:
            names = ", ".join(s.name for s in segments) or "none"
            raise TrainingInputError(f"No segment named '{item}' in the label map (segments: {names})")
        chosen.extend(m for m in match if m not in chosen)
    return chosen


def check_image_values(image: np.ndarray) -> None:
    """Refuse images that carry no usable contrast, before any model is loaded."""
    finite = np.isfinite(image)
    if not finite.any():
        raise TrainingInputError("The image holds no finite values (all NaN or Inf)")
    values = image[finite]
    if float(values.max()) == float(values.min()):
        raise TrainingInputError(f"The image is constant (every voxel is {float(values.min()):g}); nothing to segment")


@dataclass
class TrainJob:
    image: str
    labels: str
    out: str
    model_id: str = "lite_medsam"
    weights: Optional[str] = None
    segments: Optional[list[str]] = None
    slices: Optional[list[int]] = None
    axis: str = "axial"          # an anatomical plane (resolved from the image direction) or a voxel axis i/j/k
    intensity: str = "auto"
    resample_labels: bool = False
    config: TrainingConfig = field(default_factory=TrainingConfig)


@dataclass
class TrainOutcome:
    adapter_path: Path
    result: TrainingResult
    metadata: AdapterMetadata
    memory_estimate: Optional[MemoryEstimate] = None


def _check_training_memory(job: TrainJob, size: tuple[int, ...], read_bytes: int, slices: Optional[int],
                           segments: int, setting: dict[str, bool]) -> MemoryEstimate:
    """Refuse a training run that would not fit; ``slices`` is None before the labels are read (1 assumed)."""
    estimate = training_memory(int(np.prod(size, dtype=np.float64)), read_bytes, slices or 1, segments,
                               model_id=job.model_id, method=job.config.method,
                               input_size=get_spec(job.model_id).default_input, batch_size=job.config.batch_size,
                               copies_per_slice=job.config.copies_per_slice, **setting)
    labelled = f" {slices} labelled slice{'s' if slices != 1 else ''} of" if slices else ""
    check_memory(estimate, f"Training on{labelled} this {' x '.join(map(str, size))} volume",
                 "crop the volume around the labelled slices, label fewer slices, lower --batch-size, "
                 "or close other programs")
    return estimate


def run_training(job: TrainJob, on_step: Optional[Callable[[StepReport], None]] = None,
                 should_stop: Optional[Callable[[], bool]] = None,
                 on_checkpoint: Optional[Callable[[Path, int], None]] = None,
                 on_message: Optional[Callable[[str], None]] = None,
                 on_ready: Optional[Callable[[], None]] = None) -> TrainOutcome:
    """Train an adapter from files; checkpoints and the final adapter go atomically to ``job.out``.

    Every input is checked before the model is loaded (``on_ready`` is called
    then). A stop request before the first step raises :class:`JobStopped`
    and writes nothing (an existing file at ``job.out`` stays as it was); a
    later one ends training at the next step and saves the adapter. The
    output is never an input, and one run at a time writes it (a lock file
    beside it).
    """
    out = check_output_path(job.out)
    check_output_is_not_an_input(out, {"--image": job.image, "--labels": job.labels, "--weights": job.weights})
    check_adapter_suffix(out)
    with output_lock(out):
        return _train_locked(job, out, on_step, should_stop, on_checkpoint, on_message, on_ready)


def _train_locked(job: TrainJob, out: Path, on_step, should_stop, on_checkpoint, on_message,
                  on_ready) -> TrainOutcome:
    get_spec(job.model_id)
    if job.weights is not None and not Path(job.weights).is_file():
        raise WeightsError(f"Weights file not found: {job.weights}")
    info = _volume_info_checked(job.image)
    _volume_info_checked(job.labels, label_map=True)
    setting = _memory_setting(job.config.device, job.config.precision)
    if info is not None:  # the volume alone, from its header: a volume too large is refused before it is read
        _check_training_memory(job, info.size, info.bytes_per_component, None, 1, setting)
    volume = read_labelled_volume(job.image, job.labels, job.resample_labels, on_message)
    check_image_values(volume.image)
    segments = select_segments(volume.segments, job.segments)
    intensity = pp.parse_intensity(job.intensity, volume.image)
    axis, plane = resolve_axis(job.axis, volume.geometry.direction)
    data = FewShotData(volume.image, volume.labels, volume.geometry.spacing, segments, intensity,
                       axis, job.slices)
    labelled = check_training_data(data)
    memory = _check_training_memory(job, volume.geometry.size, info.bytes_per_component if info else 4,
                                    len(labelled), len(segments), setting)
    if on_ready is not None:
        on_ready()
    stopped = "stopped before the first training step; no adapter was written"
    _stop_if_requested(should_stop, stopped)
    model = load_model(job.model_id, weights=job.weights)
    _stop_if_requested(should_stop, stopped)
    if on_message is not None:  # before the trainer's set-up (the augmented bank), which takes a while
        on_message(f"{len(labelled)} labelled {plane} slices ({describe_axis(axis, None)}), "
                   f"{len(segments)} segments, {intensity.describe()}, {job.config.method} on {model.model_id}, "
                   f"{resolve_device(job.config.device)}")
    trainer = FewShotTrainer(model, data, job.config)

    def metadata(result: Optional[TrainingResult], steps_done: int) -> AdapterMetadata:
        training = {"config": job.config.to_dict(), "steps_done": steps_done}
        if result is not None:
            training.update(result.summary())
        return AdapterMetadata(
            base_model=model.model_id, base_weights_sha256=model.weights_sha256, input_size=model.input_size,
            method=job.config.method, method_config=trainer.method_config, intensity=intensity.to_dict(),
            axis=axis, plane=plane, segments=AdapterMetadata.segments_to_dicts(segments), training=training)

    def checkpoint(step: int) -> None:
        save_adapter(out, model, trainer.prompts, metadata(None, step))
        if on_checkpoint is not None:
            on_checkpoint(out, step)

    result = trainer.run(on_step=on_step, should_stop=should_stop, on_checkpoint=checkpoint)
    if result.interrupted and result.steps_done == 0:
        raise JobStopped(stopped)  # a 0-step adapter is only the untrained model: keep what was there
    final = metadata(result, result.steps_done)
    save_adapter(out, model, trainer.prompts, final)
    return TrainOutcome(out, result, final, memory)


@dataclass
class PropagateJob:
    image: str
    adapter: str
    out: str
    labels: Optional[str] = None
    weights: Optional[str] = None
    resample_labels: bool = False
    match_by: str = "auto"   # how drawn segments meet the adapter's: auto, name or value (segment_matching)
    config: PropagationConfig = field(default_factory=PropagationConfig)


@dataclass
class KeptSegment:
    """A drawn segment the adapter does not predict: written to the output exactly as drawn."""

    segment: Segment     # name, colour and its label value in the output
    drawn_label: int     # its label value in the user's label map (differs only when the adapter uses it)

    def describe(self) -> str:
        moved = f", written as label {self.segment.label}" if self.segment.label != self.drawn_label else ""
        return f"{self.segment.name} (label {self.drawn_label}{moved})"


@dataclass
class PropagateOutcome:
    segmentation_path: Path
    result: PropagationResult
    segments: list[Segment]
    labelled_slices: list[int]
    kept_segments: list[KeptSegment] = field(default_factory=list)
    memory_estimate: Optional[MemoryEstimate] = None


def keep_unpredicted_segments(unmatched: list[Segment], adapter_segments: list[Segment]) -> list[KeptSegment]:
    """Give every drawn segment the adapter does not predict a label value in the output.

    It keeps its own value when no adapter segment uses it, else takes the
    lowest value used by no segment at all (drawn or predicted).
    """
    taken = {s.label for s in adapter_segments}
    drawn_values = {s.label for s in unmatched}
    kept = []
    for segment in unmatched:
        label = segment.label
        if label in taken:
            label = next(v for v in range(1, 1 << 16) if v not in taken and v not in drawn_values)
        taken.add(label)
        kept.append(KeptSegment(Segment(label, segment.name, segment.color), segment.label))
    return kept


def add_kept_segments(predicted: np.ndarray, drawn: np.ndarray, kept: list[KeptSegment]) -> np.ndarray:
    """Write the kept segments' drawn voxels over the prediction (they are the user's, exactly as drawn)."""
    if not kept:
        return predicted
    largest = max(k.segment.label for k in kept)
    merged = predicted.astype(np.uint16 if largest > np.iinfo(predicted.dtype).max else predicted.dtype, copy=True)
    for item in kept:
        merged[drawn == item.drawn_label] = item.segment.label
    return merged


def _no_drawn_segment_error(labels_path: str, adapter_segments: list[Segment], match: SegmentMatch
                            ) -> PropagationInputError:
    names = ", ".join(s.name for s in adapter_segments)
    drawn = ", ".join(s.name for s in match.unmatched_source) or "none"
    error = PropagationInputError(f"None of the adapter's segments ({names}) is drawn in {Path(labels_path).name} "
                                  f"(matched by {match.by}; its segments: {drawn}); "
                                  "box propagation starts from the slices you drew")
    if match.by == "name" and match.unmatched_source:
        error.hint = "if its label values are the adapter's, pass --match-by value to pair segments by value"
    else:
        error.hint = "draw the adapter's segments on a few slices, or propagate without --labels (--mode auto)"
    return error


def _describe_value_match(labels_path: str, match: SegmentMatch, by: str) -> str:
    why = "carries no segment names" if by == "auto" else "is matched by label value (--match-by value)"
    return (f"{Path(labels_path).name} {why}: label values paired with the adapter's segments: "
            f"{match.describe()}")


def run_propagation(job: PropagateJob, loaded: Optional[LoadedAdapter] = None,
                    on_progress: Optional[Callable[[PropagationProgress], None]] = None,
                    should_stop: Optional[Callable[[], bool]] = None,
                    on_ready: Optional[Callable[[], None]] = None,
                    on_message: Optional[Callable[[str], None]] = None) -> PropagateOutcome:
    """Segment a volume with an adapter and write the label map (``.seg.nrrd`` keeps names).

    The output path, the adapter's metadata, the volume and the labels are
    checked before the model is loaded (``on_ready`` is called then). A stop
    request at any moment leaves nothing at ``job.out`` (the result says
    ``interrupted``). Drawn segments the adapter does not predict come back
    unchanged (see :class:`KeptSegment`); ``on_message`` hears about them.
    """
    out = check_output_path(job.out)
    check_output_is_not_an_input(out, {"--image": job.image, "--labels": job.labels, "--adapter": job.adapter,
                                       "--weights": job.weights})
    check_label_map_suffix(out)
    with output_lock(out):
        return _propagate_locked(job, out, loaded, on_progress, should_stop, on_ready, on_message)


def _propagate_locked(job: PropagateJob, out: Path, loaded, on_progress, should_stop, on_ready,
                      on_message) -> PropagateOutcome:
    say = on_message or (lambda text: None)
    if loaded is None:
        metadata = load_adapter_metadata(job.adapter)
    else:
        metadata = loaded.metadata
    segments = metadata.segment_list
    info = _volume_info_checked(job.image)
    if job.labels is not None:
        _volume_info_checked(job.labels, label_map=True)
    memory = None
    if info is not None:
        slices = info.size[2 - pp.array_axis(adapter_axis_in(metadata.axis, metadata.plane, info.direction))]
        if job.config.slice_range is not None:
            first, last = job.config.slice_range
            slices = max(0, last - first + 1)
        memory = propagation_memory(info.voxels, info.bytes_per_component, len(segments), slices,
                                    box_mode=job.config.mode == "box", with_labels=job.labels is not None,
                                    model_id=metadata.base_model, method=metadata.method,
                                    input_size=int(metadata.input_size), batch_size=job.config.batch_size,
                                    on_gpu=_memory_setting(job.config.device, job.config.precision)["on_gpu"])
        check_memory(memory, f"Propagating {len(segments)} segment{'s' if len(segments) != 1 else ''} over this "
                             f"{' x '.join(map(str, info.size))} volume",
                     "propagate part of the volume (--range FIRST:LAST), or close other programs")
    image, geometry = read_image(job.image)
    check_image_values(image)
    axis = adapter_axis_in(metadata.axis, metadata.plane, geometry.direction)  # the adapter's plane in this volume
    if job.config.slice_range is not None:
        check_slice_range(job.config.slice_range, pp.slice_count(image.shape, axis),
                          describe_axis(axis, metadata.plane), PropagationInputError)
    drawn, user_labels, labelled, kept = None, None, [], []
    if job.labels is not None:
        drawn, label_segments = read_labels_on_grid(job.labels, geometry, job.resample_labels, say)
        if is_layered(drawn) and not out.name.endswith(".seg.nrrd"):
            raise PropagationInputError(f"{Path(job.labels).name} keeps overlapping segments in layers, which only "
                                        "a .seg.nrrd holds: name --out like result.seg.nrrd")
        match = match_segments(label_segments, segments, job.match_by)
        user_labels = match.relabel(drawn)
        labelled = labelled_slices(user_labels, [s.label for s in segments], axis)
        if job.config.mode in MODES_NEEDING_LABELS and not labelled:
            raise _no_drawn_segment_error(job.labels, segments, match)
        if match.by == "value" and match.pairs:
            say(_describe_value_match(job.labels, match, job.match_by))
        kept = keep_unpredicted_segments(match.unmatched_source, segments)
    if on_ready is not None:
        on_ready()
    if loaded is None:
        if should_stop is not None and should_stop():
            return PropagateOutcome(out, PropagationResult(np.zeros(0, np.uint16), [], 0.0, True), segments, labelled,
                                    memory_estimate=memory)
        loaded = load_adapter(job.adapter, weights=job.weights)
        merge_adapters(loaded.model)  # plain weights again: propagation pays nothing for the adapter
    propagator = VolumePropagator(loaded.model, loaded.prompts, segments, metadata.intensity_mapping,
                                  axis, job.config)
    seeds = flatten_layers(user_labels, segments)   # one label per voxel; the drawn overlaps return below
    result = propagator.run(image, geometry.spacing, seeds, labelled, on_progress, should_stop)
    if not result.interrupted and should_stop is not None and should_stop():
        result.interrupted = True  # a stop during the last slices or the clean-up: still write nothing
    written = segments + [k.segment for k in kept]
    if not result.interrupted:
        if is_layered(drawn):
            result.labels, written = layers_with_drawn_slices(
                result.labels, segments, user_labels, labelled, axis,
                [(k.segment, value_mask(drawn, k.drawn_label)) for k in kept])
        else:
            result.labels = add_kept_segments(result.labels, drawn, kept)
        write_label_map(out, result.labels, geometry, written)
        if kept:
            say(f"kept {len(kept)} drawn segment{'s' if len(kept) != 1 else ''} the adapter does not predict, "
                f"as drawn: {'; '.join(k.describe() for k in kept)}")
    return PropagateOutcome(out, result, written, labelled, kept, memory)


def evaluate_files(pred_path: str | os.PathLike, ref_path: str | os.PathLike, axis: str = "axial",
                   exclude_slices: Optional[set[int]] = None,
                   on_message: Optional[Callable[[str], None]] = None) -> EvaluationReport:
    """Compare two label maps on the same grid, segment by segment.

    Segments pair by name when both files carry names, else by label value
    (:func:`match_segments`); a reference segment with no partner in the
    prediction is scored as missing (Dice 0), and the others keep their pairs.
    """
    pred, pred_geometry, pred_segments = read_label_map(pred_path)
    ref, ref_geometry, ref_segments = read_label_map(ref_path)
    warn_unlisted_values(pred, pred_segments, pred_path, on_message)
    warn_unlisted_values(ref, ref_segments, ref_path, on_message)
    differences = pred_geometry.differences(ref_geometry)
    if differences:
        raise GridMismatchError(f"Prediction and reference grids differ: {'; '.join(differences)}")
    match = match_segments(pred_segments, ref_segments)
    missing = {s.name for s in match.missing_target}
    voxel_axis, _ = resolve_axis(axis, ref_geometry.direction)  # a plane is the anatomical one of these files
    return evaluate_label_maps(match.relabel(pred), ref, ref_segments, ref_geometry.spacing, voxel_axis,
                               exclude_slices, missing=missing)
