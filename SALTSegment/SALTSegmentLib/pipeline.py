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
from .preflight import (check_label_map_suffix, check_memory, check_output_path, propagation_memory_bytes,
                        training_memory_bytes)
from .adapters import merge_adapters
from .adapter_io import AdapterMetadata, LoadedAdapter, load_adapter, load_adapter_metadata, save_adapter
from .metrics import EvaluationReport, evaluate_label_maps
from .models import WeightsError, get_spec, load_model
from .propagation import (PropagationConfig, PropagationInputError, PropagationProgress, PropagationResult,
                          VolumePropagator)
from .training import (FewShotData, FewShotTrainer, StepReport, TrainingConfig, TrainingInputError, TrainingResult,
                       check_training_data)
from .volume_io import (Segment, VolumeGeometry, VolumeReadError, read_image, read_label_map, read_volume_info,
                        write_label_map)

class GridMismatchError(ValueError):
    """The label map is not on the image's voxel grid."""


class JobStopped(Exception):
    """A stop request (SIGTERM/SIGINT, Cancel) arrived before anything worth keeping was computed."""


def _volume_info_checked(path: str | os.PathLike):
    info = read_volume_info(path)
    if info is not None and info.components != 1:
        raise VolumeReadError(f"{path} has {info.components} components per voxel; "
                              "a scalar (single-channel) 3D volume is needed")
    if info is not None and len(info.size) != 3:
        raise VolumeReadError(f"{path} is {len(info.size)}D; a 3D volume is needed")
    return info


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
    image = label_geometry.apply_to(sitk.GetImageFromArray(labels))
    reference = target.apply_to(sitk.Image(list(target.size), sitk.sitkUInt8))
    resampled = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, image.GetPixelID())
    return sitk.GetArrayFromImage(resampled).astype(np.uint16)


def read_labels_on_grid(labels_path: str | os.PathLike, geometry: VolumeGeometry,
                       resample_labels: bool = False) -> tuple[np.ndarray, list[Segment]]:
    """Read a label map for an image grid, refusing (or, if asked, resampling) one on another grid."""
    labels, label_geometry, segments = read_label_map(labels_path)
    differences = label_geometry.differences(geometry)
    if differences:
        if not resample_labels:
            raise GridMismatchError(
                f"The label map is not on the image grid ({'; '.join(differences)}); "
                "pass --resample-labels to resample it onto the image")
        labels = resample_labels_to(labels, label_geometry, geometry)
    return labels, segments


def read_labelled_volume(image_path: str | os.PathLike, labels_path: str | os.PathLike,
                         resample_labels: bool = False) -> LabelledVolume:
    """Read an image and its label map on the same grid (see :func:`read_labels_on_grid`)."""
    image, geometry = read_image(image_path)
    labels, segments = read_labels_on_grid(labels_path, geometry, resample_labels)
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
    axis: str = "axial"
    intensity: str = "auto"
    resample_labels: bool = False
    config: TrainingConfig = field(default_factory=TrainingConfig)


@dataclass
class TrainOutcome:
    adapter_path: Path
    result: TrainingResult
    metadata: AdapterMetadata


def run_training(job: TrainJob, on_step: Optional[Callable[[StepReport], None]] = None,
                 should_stop: Optional[Callable[[], bool]] = None,
                 on_checkpoint: Optional[Callable[[Path, int], None]] = None,
                 on_message: Optional[Callable[[str], None]] = None,
                 on_ready: Optional[Callable[[], None]] = None) -> TrainOutcome:
    """Train an adapter from files; checkpoints and the final adapter go atomically to ``job.out``.

    Every input is checked before the model is loaded (``on_ready`` is called
    then). A stop request before the first step raises :class:`JobStopped`
    and writes nothing (an existing file at ``job.out`` stays as it was); a
    later one ends training at the next step and saves the adapter.
    """
    out = check_output_path(job.out)
    get_spec(job.model_id)
    if job.weights is not None and not Path(job.weights).is_file():
        raise WeightsError(f"Weights file not found: {job.weights}")
    info = _volume_info_checked(job.image)
    _volume_info_checked(job.labels)
    if info is not None:
        check_memory(training_memory_bytes(info.voxels, info.bytes_per_component),
                     f"Training on this {' x '.join(map(str, info.size))} volume",
                     "crop the volume around the labelled slices, or close other programs")
    volume = read_labelled_volume(job.image, job.labels, job.resample_labels)
    check_image_values(volume.image)
    segments = select_segments(volume.segments, job.segments)
    intensity = pp.parse_intensity(job.intensity, volume.image)
    data = FewShotData(volume.image, volume.labels, volume.geometry.spacing, segments, intensity,
                       job.axis, job.slices)
    check_training_data(data)
    if on_ready is not None:
        on_ready()
    stopped = "stopped before the first training step; no adapter was written"
    _stop_if_requested(should_stop, stopped)
    model = load_model(job.model_id, weights=job.weights)
    _stop_if_requested(should_stop, stopped)
    trainer = FewShotTrainer(model, data, job.config)
    if on_message is not None:
        on_message(f"{len(trainer.slices)} labelled {job.axis} slices, {len(segments)} segments, "
                   f"{intensity.describe()}, {job.config.method} on {model.model_id}, {trainer.device}")

    def metadata(result: Optional[TrainingResult], steps_done: int) -> AdapterMetadata:
        training = {"config": job.config.to_dict(), "steps_done": steps_done}
        if result is not None:
            training.update(result.summary())
        return AdapterMetadata(
            base_model=model.model_id, base_weights_sha256=model.weights_sha256, input_size=model.input_size,
            method=job.config.method, method_config=trainer.method_config, intensity=intensity.to_dict(),
            axis=job.axis, segments=AdapterMetadata.segments_to_dicts(segments), training=training)

    def checkpoint(step: int) -> None:
        save_adapter(out, model, trainer.prompts, metadata(None, step))
        if on_checkpoint is not None:
            on_checkpoint(out, step)

    result = trainer.run(on_step=on_step, should_stop=should_stop, on_checkpoint=checkpoint)
    if result.interrupted and result.steps_done == 0:
        raise JobStopped(stopped)  # a 0-step adapter is only the untrained model: keep what was there
    final = metadata(result, result.steps_done)
    save_adapter(out, model, trainer.prompts, final)
    return TrainOutcome(out, result, final)


@dataclass
class PropagateJob:
    image: str
    adapter: str
    out: str
    labels: Optional[str] = None
    weights: Optional[str] = None
    resample_labels: bool = False
    config: PropagationConfig = field(default_factory=PropagationConfig)


@dataclass
class PropagateOutcome:
    segmentation_path: Path
    result: PropagationResult
    segments: list[Segment]
    labelled_slices: list[int]


def labelled_slices_of(labels: np.ndarray, segments: list[Segment], axis: str) -> list[int]:
    """Slices on which any of ``segments`` has voxels: the slices the user drew."""
    return pp.occupied_slices(np.isin(labels, [s.label for s in segments]), axis)


def match_user_labels(labels: np.ndarray, label_segments: list[Segment], adapter_segments: list[Segment]
                      ) -> np.ndarray:
    """Re-express the user's label map in the adapter's label values, matching segments by name."""
    by_name = {s.name: s.label for s in label_segments}
    matched = np.zeros_like(labels)
    for segment in adapter_segments:
        if segment.name in by_name:
            matched[labels == by_name[segment.name]] = segment.label
    return matched


def run_propagation(job: PropagateJob, loaded: Optional[LoadedAdapter] = None,
                    on_progress: Optional[Callable[[PropagationProgress], None]] = None,
                    should_stop: Optional[Callable[[], bool]] = None,
                    on_ready: Optional[Callable[[], None]] = None) -> PropagateOutcome:
    """Segment a volume with an adapter and write the label map (``.seg.nrrd`` keeps names).

    The output path, the adapter's metadata, the volume and the labels are
    checked before the model is loaded (``on_ready`` is called then). A stop
    request at any moment leaves nothing at ``job.out`` (the result says
    ``interrupted``).
    """
    out = check_output_path(job.out)
    check_label_map_suffix(out)
    if loaded is None:
        metadata = load_adapter_metadata(job.adapter)
    else:
        metadata = loaded.metadata
    segments = metadata.segment_list
    info = _volume_info_checked(job.image)
    if job.labels is not None:
        _volume_info_checked(job.labels)
    if info is not None:
        slices = info.size[2 - pp.slice_axis(metadata.axis)]
        if job.config.slice_range is not None:
            first, last = job.config.slice_range
            slices = max(0, last - first + 1)
        check_memory(propagation_memory_bytes(info.voxels, len(segments), slices, job.config.mode == "box",
                                              info.bytes_per_component, job.labels is not None),
                     f"Propagating {len(segments)} segment{'s' if len(segments) != 1 else ''} over this {' x '.join(map(str, info.size))} volume",
                     "propagate part of the volume (--range FIRST:LAST), or close other programs")
    image, geometry = read_image(job.image)
    check_image_values(image)
    count = pp.slice_count(image.shape, metadata.axis)
    if job.config.slice_range is not None:
        first, last = job.config.slice_range
        if not 0 <= first <= last < count:
            raise PropagationInputError(
                f"Slice range {first}:{last} is outside 0:{count - 1} along {metadata.axis}")
    user_labels, labelled = None, []
    if job.labels is not None:
        labels, label_segments = read_labels_on_grid(job.labels, geometry, job.resample_labels)
        user_labels = match_user_labels(labels, label_segments, segments)
        labelled = labelled_slices_of(user_labels, segments, metadata.axis)
        if job.config.mode == "box" and not labelled:
            names = ", ".join(s.name for s in segments)
            raise PropagationInputError(
                f"None of the adapter's segments ({names}) is drawn in {Path(job.labels).name}; "
                "box propagation starts from the slices you drew")
    if on_ready is not None:
        on_ready()
    if loaded is None:
        if should_stop is not None and should_stop():
            return PropagateOutcome(out, PropagationResult(np.zeros(0, np.uint16), [], 0.0, True), segments, labelled)
        loaded = load_adapter(job.adapter, weights=job.weights)
        merge_adapters(loaded.model)  # plain weights again: propagation pays nothing for the adapter
    propagator = VolumePropagator(loaded.model, loaded.prompts, segments, metadata.intensity_mapping,
                                  metadata.axis, job.config)
    result = propagator.run(image, geometry.spacing, user_labels, labelled, on_progress, should_stop)
    if not result.interrupted and should_stop is not None and should_stop():
        result.interrupted = True  # a stop during the last slices or the clean-up: still write nothing
    if not result.interrupted:
        write_label_map(out, result.labels, geometry, segments)
    return PropagateOutcome(out, result, segments, labelled)


def evaluate_files(pred_path: str | os.PathLike, ref_path: str | os.PathLike, axis: str = "axial",
                   exclude_slices: Optional[set[int]] = None) -> EvaluationReport:
    """Compare two label maps on the same grid, matching segments by name (else by label value)."""
    pred, pred_geometry, pred_segments = read_label_map(pred_path)
    ref, ref_geometry, ref_segments = read_label_map(ref_path)
    differences = pred_geometry.differences(ref_geometry)
    if differences:
        raise GridMismatchError(f"Prediction and reference grids differ: {'; '.join(differences)}")
    pred_by_name = {s.name: s.label for s in pred_segments}
    if all(s.name in pred_by_name for s in ref_segments):
        pred = match_user_labels(pred, pred_segments, ref_segments)
    return evaluate_label_maps(pred, ref, ref_segments, ref_geometry.spacing, axis, exclude_slices)
