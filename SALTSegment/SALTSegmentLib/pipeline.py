"""The headless jobs behind the CLI, the worker and the demo: files in, files out.

Each function reads its inputs, checks them (grids must match; segments must
exist), runs the engine and writes outputs atomically. Progress and stop
requests come in as callbacks so the CLI, the Slicer worker and the tests
drive the same code.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import SimpleITK as sitk

from . import preprocessing as pp
from .slices import adapter_axis_in, check_slice_range, describe_axis, labelled_slices, resolve_axis
from .output_lock import output_lock
from .devices import autocast_dtype, resolve_device
from .preflight import (MemoryEstimate, check_adapter_suffix, check_label_map_suffix, check_memory,
                        check_output_is_not_an_input, check_output_path, propagation_memory, training_memory)
from .adapter_file import AdapterMetadata, LoadedAdapter, load_adapter, load_adapter_metadata, save_adapter
from .label_layers import is_layered, layers_with_drawn_slices, value_mask
from .metrics import EvaluationReport, evaluate_label_maps
from .models import WeightsError, get_spec, load_model
from .array_jobs import AdaptedModel, fine_tune, propagate
from .propagation import (MODES_NEEDING_LABELS, PropagationConfig, PropagationInputError, PropagationProgress,
                          PropagationResult, check_absent_slices, encoder_batch_size)
from .training import (FewShotData, FewShotTrainer, StepReport, TrainingConfig, TrainingInputError, TrainingResult,
                       WarmStart, check_training_cases, merge_segments)
from .host.adapter_metadata import case_record, file_sha256, lineage_record
from .structure_length import drawn_lengths, lengths_to_record
from .segment_matching import SegmentMatch, match_segments
from .volume_io import (Segment, VolumeGeometry, read_image, read_label_map, read_volume_info, require_3d_scalar,
                        unlisted_label_values, write_label_map)

if TYPE_CHECKING:
    from .distributed import Distributed


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
class TrainCase:
    """One volume to train on: image, label map and (optionally) its labelled slices."""

    image: str
    labels: str
    slices: Optional[list[int]] = None
    absent: dict[str, list[int]] = field(default_factory=dict)   # segment name -> slices marked without it


@dataclass
class TrainJob:
    image: Optional[str]         # the first volume (None when every volume is in ``cases``)
    labels: Optional[str]
    out: str
    model_id: Optional[str] = None   # None: lite_medsam, or the --init adapter's base model
    weights: Optional[str] = None
    segments: Optional[list[str]] = None
    slices: Optional[list[int]] = None   # ``image``'s labelled slices (each case has its own)
    axis: Optional[str] = None   # an anatomical plane or a voxel axis i/j/k; None: axial, or the --init adapter's plane
    intensity: str = "auto"      # with --init, "auto" means the parent's mapping
    resample_labels: bool = False
    config: TrainingConfig = field(default_factory=TrainingConfig)
    cases: list[TrainCase] = field(default_factory=list)   # more volumes, segments matched by name
    init: Optional[str] = None   # a parent adapter to continue (same base model and method)
    absent: dict[str, list[int]] = field(default_factory=dict)   # ``image``'s marks (each case has its own)

    def all_cases(self) -> list[TrainCase]:
        first = [TrainCase(self.image, self.labels, self.slices, self.absent)] if self.image is not None else []
        return first + list(self.cases)


@dataclass
class TrainOutcome:
    adapter_path: Path
    result: TrainingResult
    metadata: AdapterMetadata
    memory_estimate: Optional[MemoryEstimate] = None


def _check_training_memory(job: TrainJob, sizes: list[tuple[int, ...]], read_bytes: int, slices: Optional[int],
                           segments: int, setting: dict[str, bool], model_id: str = "lite_medsam") -> MemoryEstimate:
    """Refuse a training run that would not fit; ``slices`` is None before the labels are read (1 assumed).

    Every volume is held while the bank is built, so several volumes add up.
    """
    voxels = int(sum(np.prod(size, dtype=np.float64) for size in sizes))
    estimate = training_memory(voxels, read_bytes, slices or 1, segments,
                               model_id=model_id, method=job.config.method,
                               input_size=get_spec(model_id).default_input, batch_size=job.config.batch_size,
                               copies_per_slice=job.config.copies_per_slice,
                               recompute_activations=job.config.recompute_activations is not False, **setting)
    labelled = f" {slices} labelled slice{'s' if slices != 1 else ''} of" if slices else ""
    volumes = (f"this {' x '.join(map(str, sizes[0]))} volume" if len(sizes) == 1
               else f"these {len(sizes)} volumes ({voxels:,} voxels)")
    check_memory(estimate, f"Training on{labelled} {volumes}",
                 "crop the volume around the labelled slices, label fewer slices, lower --batch-size, "
                 "or close other programs")
    return estimate


def run_training(job: TrainJob, on_step: Optional[Callable[[StepReport], None]] = None,
                 should_stop: Optional[Callable[[], bool]] = None,
                 on_checkpoint: Optional[Callable[[Path, int], None]] = None,
                 on_message: Optional[Callable[[str], None]] = None,
                 on_ready: Optional[Callable[[], None]] = None,
                 distributed: Optional["Distributed"] = None) -> TrainOutcome:
    """Train an adapter from files; checkpoints and the final adapter go atomically to ``job.out``.

    Every input is checked before the model is loaded (``on_ready`` is called
    then). A stop request before the first step raises :class:`JobStopped`
    and writes nothing (an existing file at ``job.out`` stays as it was); a
    later one ends training at the next step and saves the adapter. The
    output is never an input, and one run at a time writes it (a lock file
    beside it). Under torchrun (``distributed``) every rank trains and rank 0
    alone holds the lock and writes.
    """
    out = check_output_path(job.out)
    inputs = {"--weights": job.weights, "--init": job.init}
    for number, case in enumerate(job.all_cases()):
        inputs[f"--image #{number + 1}" if number else "--image"] = case.image
        inputs[f"--labels #{number + 1}" if number else "--labels"] = case.labels
    check_output_is_not_an_input(out, inputs)
    check_adapter_suffix(out)
    main = distributed is None or distributed.is_main
    with output_lock(out) if main else contextlib.nullcontext():
        return _train_locked(job, out, on_step, should_stop, on_checkpoint, on_message, on_ready, distributed)


@dataclass
class _Parent:
    """The adapter ``--init`` continues: its checked metadata and the sha256 of its file."""

    path: str
    metadata: AdapterMetadata
    sha256: str


def _parent_adapter(job: TrainJob) -> _Parent:
    """Read ``--init`` (header only) and refuse a parent that this job cannot continue."""
    metadata = load_adapter_metadata(job.init)
    name = Path(job.init).name
    problems = []
    if job.model_id is not None and job.model_id != metadata.base_model:
        problems.append(f"base model {metadata.base_model}, not {job.model_id}")
    if job.config.method != metadata.method:
        problems.append(f"method {metadata.method}, not {job.config.method}")
    else:
        changed = {k: v for k, v in job.config.method_options.items() if metadata.method_config.get(k) != v}
        if changed:
            problems.append(f"{metadata.method} options {metadata.method_config}, not {changed}")
    if problems:
        raise TrainingInputError(f"Cannot continue {name}: it was trained with {'; '.join(problems)}. "
                                 "A continued adapter keeps its parent's base model and method; leave --method, "
                                 "--model and --rank out, or train a new adapter without --init")
    return _Parent(job.init, metadata, file_sha256(job.init))


def _case_intensity(job: TrainJob, parent: Optional[_Parent], image: np.ndarray) -> pp.IntensityMapping:
    if parent is None:
        return pp.parse_intensity(job.intensity, image)
    inherited = parent.metadata.intensity_mapping
    if job.intensity != "auto" and pp.parse_intensity(job.intensity, image) != inherited:
        raise TrainingInputError(f"Cannot continue {Path(parent.path).name} with --intensity {job.intensity}: it "
                                 f"maps intensities as {inherited.describe()}; leave --intensity out")
    return inherited


def _case_axis(job: TrainJob, parent: Optional[_Parent], direction) -> tuple[str, str]:
    """(voxel axis, plane) of a case: --axis, else the parent's plane (its voxel axis for format 1), else axial."""
    if parent is None:
        return resolve_axis(job.axis or "axial", direction)
    axis, plane = resolve_axis(parent.metadata.plane or parent.metadata.axis, direction)
    if job.axis is not None and resolve_axis(job.axis, direction)[0] != axis:
        raise TrainingInputError(f"Cannot continue {Path(parent.path).name} along --axis {job.axis}: it was "
                                 f"trained on {parent.metadata.plane or 'voxel axis ' + parent.metadata.axis} "
                                 "slices; leave --axis out")
    return axis, plane


def _read_training_cases(job: TrainJob, cases: list[TrainCase], parent: Optional[_Parent],
                         on_message) -> tuple[list[FewShotData], list[str], str]:
    """Every case as :class:`FewShotData` (segments selected, intensity and axis resolved), checked together."""
    datas, planes, axes = [], set(), []
    several = len(cases) > 1
    for case in cases:
        volume = read_labelled_volume(case.image, case.labels, job.resample_labels, on_message)
        check_image_values(volume.image)
        if several and job.segments:
            wanted = set(job.segments)
            segments = [s for s in volume.segments if s.name in wanted or str(s.label) in wanted]
        else:
            segments = select_segments(volume.segments, job.segments)
        axis, plane = _case_axis(job, parent, volume.geometry.direction)
        planes.add(plane)
        axes.append(axis)
        datas.append(FewShotData(volume.image, volume.labels, volume.geometry.spacing, segments,
                                 _case_intensity(job, parent, volume.image), axis, case.slices,
                                 name=Path(case.image).name, absent=dict(case.absent)))
    if several:
        if job.segments:
            found = {s.name for d in datas for s in d.segments} | {str(s.label) for d in datas for s in d.segments}
            missing = [item for item in job.segments if item not in found]
            if missing:
                raise TrainingInputError(f"No case holds a segment named {', '.join(map(repr, missing))}")
        if len(planes) > 1:
            raise TrainingInputError(f"The volumes are cut in different planes along --axis {job.axis} "
                                     f"({', '.join(sorted(planes))}); pass an anatomical plane (--axis axial)")
        mappings = {json.dumps(d.intensity.to_dict(), sort_keys=True) for d in datas}
        if len(mappings) > 1:
            kinds = ", ".join(sorted({d.intensity.describe() for d in datas}))
            raise TrainingInputError(f"The volumes would map intensities differently ({kinds}); pass one "
                                     "--intensity for all (mr, ct, a CT preset or L,W)")
    return datas, axes, planes.pop()


def _train_locked(job: TrainJob, out: Path, on_step, should_stop, on_checkpoint, on_message,
                  on_ready, distributed: Optional["Distributed"] = None) -> TrainOutcome:
    main = distributed is None or distributed.is_main
    cases = job.all_cases()
    if not cases:
        raise TrainingInputError("Nothing to train on: give --image and --labels, or --cases FILE")
    parent = _parent_adapter(job) if job.init else None
    model_id = job.model_id or (parent.metadata.base_model if parent else "lite_medsam")
    get_spec(model_id)
    if job.weights is not None and not Path(job.weights).is_file():
        raise WeightsError(f"Weights file not found: {job.weights}")
    infos = []
    for case in cases:
        infos.append(_volume_info_checked(case.image))
        _volume_info_checked(case.labels, label_map=True)
    setting = _memory_setting(job.config.device, job.config.precision)
    read_bytes = max([info.bytes_per_component for info in infos if info is not None], default=4)
    if all(info is not None for info in infos):  # the volumes alone, from their headers, before any is read
        _check_training_memory(job, [info.size for info in infos], read_bytes, None, 1, setting, model_id)
    datas, axes, plane = _read_training_cases(job, cases, parent, on_message)
    axis = axes[0]
    case_slices = check_training_cases(datas)
    inherited = parent.metadata.segment_list if parent else []
    segments = merge_segments(datas, inherited)
    labelled_count = sum(len(s) for s in case_slices)
    memory = _check_training_memory(job, [d.image.shape[::-1] for d in datas], read_bytes, labelled_count,
                                    len(segments), setting, model_id)
    if on_ready is not None:
        on_ready()
    stopped = "stopped before the first training step; no adapter was written"
    stop_now = should_stop
    if distributed is not None:  # every rank asks at the same points, so a stop on one stops all
        stop_now = lambda: distributed.any(should_stop is not None and should_stop())  # noqa: E731
    _stop_if_requested(stop_now, stopped)
    warm_start = None
    if parent is not None:
        loaded = load_adapter(parent.path, weights=job.weights)
        model = loaded.model
        warm_start = WarmStart(loaded.metadata.method_config,
                               {name: loaded.prompts.tokens[index].detach().clone()
                                for index, name in enumerate(loaded.metadata.segment_names)})
    else:
        model = load_model(model_id, weights=job.weights)
    _stop_if_requested(stop_now, stopped)
    if on_message is not None:  # before the trainer's set-up (the augmented bank), which takes a while
        volumes = f" of {len(datas)} volumes" if len(datas) > 1 else ""
        continued = f", continuing {Path(parent.path).name}" if parent else ""
        ranks = f", {distributed.world_size} processes" if distributed is not None else ""
        on_message(f"{labelled_count} labelled {plane} slices{volumes} ({describe_axis(axis, None)}), "
                   f"{len(segments)} segments, {datas[0].intensity.describe()}, {job.config.method} on "
                   f"{model.model_id}{continued}, {resolve_device(job.config.device)}{ranks}")
    records = _case_records(cases, datas, case_slices, parent) if main else []

    def metadata(trainer: FewShotTrainer, result: Optional[TrainingResult], steps_done: int) -> AdapterMetadata:
        training = {"config": job.config.to_dict(), "steps_done": steps_done}
        if result is not None:
            training.update(result.summary())
        lineage = None
        if parent is not None:
            lineage = lineage_record(parent.sha256, parent.metadata, [d.name for d in datas],
                                     [s.name for s in segments if s not in inherited])
        return AdapterMetadata(
            base_model=model.model_id, base_weights_sha256=model.weights_sha256, input_size=model.input_size,
            method=job.config.method, method_config=trainer.method_config,
            intensity=datas[0].intensity.to_dict(), axis=axis, plane=plane,
            segments=AdapterMetadata.segments_to_dicts(segments), training=training, cases=records, lineage=lineage)

    def checkpoint(step: int, trainer: FewShotTrainer) -> None:
        if not main:
            return
        save_adapter(out, model, trainer.prompts, metadata(trainer, None, step))
        if on_checkpoint is not None:
            on_checkpoint(out, step)

    tuned = fine_tune(model, datas, job.config, segments=segments, warm_start=warm_start, distributed=distributed,
                      on_step=on_step, should_stop=should_stop, on_checkpoint=checkpoint)
    result = tuned.result
    if result.interrupted and result.steps_done == 0:
        raise JobStopped(stopped)  # a 0-step adapter is only the untrained model: keep what was there
    final = metadata(tuned.trainer, result, result.steps_done)
    if main:
        save_adapter(out, model, tuned.trainer.prompts, final)
    return TrainOutcome(out, result, final, memory)


def _case_records(cases: list[TrainCase], datas: list[FewShotData], case_slices: list[list[int]],
                  parent: Optional[_Parent]) -> list[dict]:
    """The parent's cases, then this run's: file name, sha256 of the image, labelled slices, segments, marks."""
    generation = parent.metadata.generation + 1 if parent else 0
    records = list(parent.metadata.cases) if parent else []
    for case, data, slices in zip(cases, datas, case_slices):
        stack = np.stack([pp.take_slice(data.labels, data.axis, s) for s in slices])
        held = [s.name for s in data.segments if (stack == s.label).any()]
        lengths = lengths_to_record(drawn_lengths(data.labels, data.segments, data.axis, slices, data.spacing))
        records.append(case_record(Path(case.image).name, file_sha256(case.image), slices, held, generation, lengths,
                                   data.absent))
    return records


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
    absent: dict[str, list[int]] = field(default_factory=dict)   # adapter segment name -> slices marked without it


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
        on_gpu = _memory_setting(job.config.device, job.config.precision)["on_gpu"]
        memory = propagation_memory(info.voxels, info.bytes_per_component, len(segments), slices,
                                    box_mode=job.config.mode == "box", with_labels=job.labels is not None,
                                    model_id=metadata.base_model, method=metadata.method,
                                    input_size=int(metadata.input_size),
                                    batch_size=encoder_batch_size(job.config.batch_size, on_gpu), on_gpu=on_gpu)
        check_memory(memory, f"Propagating {len(segments)} segment{'s' if len(segments) != 1 else ''} over this "
                             f"{' x '.join(map(str, info.size))} volume",
                     "propagate part of the volume (--range FIRST:LAST), or close other programs")
    image, geometry = read_image(job.image)
    check_image_values(image)
    axis = adapter_axis_in(metadata.axis, metadata.plane, geometry.direction)  # the adapter's plane in this volume
    if job.config.slice_range is not None:
        check_slice_range(job.config.slice_range, pp.slice_count(image.shape, axis),
                          describe_axis(axis, metadata.plane), PropagationInputError)
    check_absent_slices(job.absent, segments, axis, image.shape)   # names and slice numbers, before the model
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
    adapted = AdaptedModel.from_file(loaded, segments)
    result = propagate(adapted, image, geometry.spacing, axis, job.config, user_labels, labelled, on_progress,
                       should_stop, job.absent)
    if not result.interrupted and should_stop is not None and should_stop():
        result.interrupted = True  # a stop during the last slices or the clean-up: still write nothing
    written = segments + [k.segment for k in kept]
    if not result.interrupted:
        if is_layered(drawn):
            result.labels, written = layers_with_drawn_slices(
                result.labels, segments, user_labels, labelled, axis, result.segment_masks,
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
