"""Checks made before a job starts: can the output be written (and is it no input), will the job fit in memory.

They run before any model is loaded, so a bad output path or a volume too
large for this machine costs the user seconds, not a training run.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import psutil

MEMORY_LIMIT_ENV = "SALTSEGMENT_MEMORY_LIMIT_BYTES"
ADAPTER_SUFFIX = ".safetensors"
# Extensions SimpleITK writes label maps to (checked before any work, not after it).
LABEL_MAP_SUFFIXES = (".seg.nrrd", ".nrrd", ".nhdr", ".nii.gz", ".nii", ".mha", ".mhd")


class InsufficientMemoryError(ValueError):
    """The job would not fit in the memory available (estimated before it starts)."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


def _with_hint(error: BaseException, hint: str) -> BaseException:
    error.hint = hint  # read by the CLI's one-line error report
    return error


def check_output_path(path: str | os.PathLike) -> Path:
    """Refuse an output path that cannot be written, before any work is done."""
    out = Path(path)
    parent = out.parent
    if not parent.exists():
        raise _with_hint(FileNotFoundError(errno.ENOENT, "Output folder does not exist", str(parent)),
                         "create the folder first, or choose another output path")
    if not parent.is_dir():
        raise _with_hint(NotADirectoryError(errno.ENOTDIR, "Output folder is a file, not a folder", str(parent)),
                         "choose an output path inside a folder")
    if out.is_dir():
        raise _with_hint(IsADirectoryError(errno.EISDIR, "Output path is a folder; give a file name", str(out)),
                         "add a file name to the output path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise _with_hint(PermissionError(errno.EACCES, "Output folder is not writable", str(parent)),
                         "choose an output folder you can write to")
    return out


def _same_file(first: Path, second: Path) -> bool:
    """Same file by identity (hard and symbolic links, ``./`` and ``..`` spellings), or by resolved path."""
    try:
        if first.exists() and second.exists():
            return os.path.samefile(first, second)
    except OSError:
        pass
    return os.path.normcase(os.path.realpath(first)) == os.path.normcase(os.path.realpath(second))


def _inside_folder(path: Path, folder: Path) -> bool:
    return path.exists() and folder.is_dir() and _same_file(path.parent, folder)


def check_output_is_not_an_input(out: Path, inputs: dict[str, Optional[str | os.PathLike]]) -> None:
    """Refuse an output that would overwrite an input file (or a detached volume's data file, either side).

    ``inputs`` maps each option (``--image``) to its path, None when not given.
    A DICOM folder given as an input protects the files inside it.
    """
    from .volume_io import files_of_volume, files_written_for

    for option, value in inputs.items():
        if value is None:
            continue
        source = Path(value)
        protected = [source] if source.is_dir() else files_of_volume(source)
        for written in files_written_for(out):
            if any(_same_file(written, existing) for existing in protected) or _inside_folder(written, source):
                what = "is" if written == out else f"writes {written.name}, which is"
                raise _with_hint(ValueError(f"The output {out} {what} the {option} input ({value}); "
                                            "writing it would destroy the input"),
                                 "choose another --out path; inputs are never overwritten")


def check_adapter_suffix(path: Path) -> None:
    if not path.name.lower().endswith(ADAPTER_SUFFIX):
        raise _with_hint(ValueError(f"Cannot write an adapter to '{path.name}': adapter files end in {ADAPTER_SUFFIX}"),
                         f"name the output like adapter{ADAPTER_SUFFIX}")


def check_label_map_suffix(path: Path) -> None:
    if not path.name.lower().endswith(LABEL_MAP_SUFFIXES):
        raise _with_hint(ValueError(f"Cannot write a label map to '{path.name}': unknown file type"),
                         "end the output name with .seg.nrrd (keeps segment names), .nrrd, .nii.gz or .mha")


# --------------------------------------------------------------------------- memory
#
# Peak resident memory of a job, term by term. Measured (2 CPU threads, bf16
# autocast) as the peak RSS of real ``saltsegment train`` / ``propagate``
# processes (os.wait4, ru_maxrss) by ``scripts/measure_memory.py`` on the
# embedded sample and on a 512 x 512 x 60 CT-sized volume with LiteMedSAM, and
# in-process for SAM ViT-B (random weights) at 256 and 512 px; the ViT-B
# terms at 1024 px and the ViT-L/H ones are extrapolated from those. Re-run the
# script after changing training or propagation and update the constants.
# Measured peak / estimate in MiB (LiteMedSAM, SALT, batch 2, 5 labelled slices):
# train (40 steps) sample 4354 / 4034, CT 3918 / 4092; propagate sample auto
# 1763 / 1657, box 1990 / 1911; CT auto 1947 / 2145, box 2082 / 2490.
# With the encoder's activations recomputed in the backward pass (the CPU
# default since), train (10 steps): sample 2690 / 2833, CT 2672 / 2891,
# sample with 15 labelled slices 3052 / 3343.

_MIB = 1 << 20
# Python, torch, SimpleITK, scipy and the package itself, imported.
RUNTIME_BYTES = 800 * _MIB
# A loaded base model: its modules' code, the weights and the checkpoint they were read from.
MODEL_CODE_BYTES = 200 * _MIB
MODEL_BYTES_PER_PARAMETER = 8
# What a method keeps beside the weights (SVD factors of adapted layers, gradients and optimiser moments).
METHOD_BYTES_PER_PARAMETER = {"salt": 7, "ssam": 7, "lora": 1, "decoder": 2, "full": 16}
# What a training step holds whatever the batch (autograd bookkeeping, optimiser, allocator slack).
TRAINING_STEP_FIXED_BYTES = 450 * _MIB
# Activations of one training sample (forward and backward, the few segments decoded per slice) and of
# encoding one slice without gradients (propagation encodes slices in chunks). LiteMedSAM runs at 256 px.
LITE_TRAINING_SAMPLE_BYTES = 1100 * _MIB
LITE_TRAINING_SAMPLE_RECOMPUTED_BYTES = 490 * _MIB   # TrainingConfig.recompute_activations (CPU default)
LITE_INFERENCE_SLICE_BYTES = 120 * _MIB
# ViT-B, fitted as a fixed part, a part per token (16 px patch) and, for the global-attention blocks, a part
# per token pair; ViT-L/H scale with depth x width.
VIT_B_TRAINING_SAMPLE = (510 * _MIB, 0.38 * _MIB, 192)
VIT_B_INFERENCE_SLICE = (20 * _MIB, 0.082 * _MIB, 48)
VIT_SIZE_FACTOR = {"sam_vit_b": 1.0, "medsam_vit_b": 1.0, "sam_vit_l": 24 * 1024 / (12 * 768),
                   "sam_vit_h": 32 * 1280 / (12 * 768)}
# The bank's encoder features per augmented copy: TinyViT's frozen first stages' output (16384 x 128 at
# 256 px, in the autocast dtype); for the ViTs the float32 input image itself.
_TINYVIT_PREFIX_VALUES = 16384 * 128
# Per copy and segment: the low-resolution target (bool, 256 x 256) and, while the bank is built, the
# input-resolution mask and its augmented copy (float32).
_LOW_RES_TARGET_BYTES = 256 * 256


@dataclass(frozen=True)
class MemoryEstimate:
    """A job's expected peak resident memory, by named term (bytes), so a refusal can say what dominates."""

    terms: dict[str, int]

    @property
    def total(self) -> int:
        return int(sum(self.terms.values()))

    def to_dict(self) -> dict:
        """MiB per term and in total, as the CLI's result event reports it."""
        return {"total_mib": round(self.total / _MIB), **{name: round(value / _MIB) for name, value in self.terms.items()}}

    def describe(self) -> str:
        largest = sorted(self.terms.items(), key=lambda item: -item[1])[:3]
        return ", ".join(f"{name.replace('_', ' ')} {_gib(value)}" for name, value in largest)


def _model_terms(model_id: str, method: str) -> dict[str, int]:
    """Runtime, model and method terms."""
    from .models import get_spec

    parameters = get_spec(model_id).parameters_millions * 1e6
    return {"runtime": RUNTIME_BYTES,
            "model": int(MODEL_CODE_BYTES + parameters * MODEL_BYTES_PER_PARAMETER),
            "adapter_state": int(parameters * METHOD_BYTES_PER_PARAMETER.get(method, 16))}


def _activation_bytes(model_id: str, input_size: int, training: bool, recomputed: bool = False) -> int:
    """Activations of one training sample, or of encoding one slice, for a model at ``input_size``.

    ``recomputed``: the encoder's blocks are run again in the backward pass
    instead of kept (LiteMedSAM's TinyViT stages; the ViTs keep theirs).
    """
    if model_id == "lite_medsam":
        if not training:
            return LITE_INFERENCE_SLICE_BYTES
        return LITE_TRAINING_SAMPLE_RECOMPUTED_BYTES if recomputed else LITE_TRAINING_SAMPLE_BYTES
    fixed, per_token, per_pair = VIT_B_TRAINING_SAMPLE if training else VIT_B_INFERENCE_SLICE
    tokens = (input_size // 16) ** 2
    return int((fixed + per_token * tokens + per_pair * tokens ** 2) * VIT_SIZE_FACTOR.get(model_id, 1.0))


def training_memory(voxels: int, read_bytes: int, labelled_slices: int, segments: int, *,
                    model_id: str = "lite_medsam", method: str = "salt", input_size: int = 256,
                    batch_size: int = 2, copies_per_slice: int = 6, half_precision: bool = True,
                    on_gpu: bool = False, recompute_activations: bool = True) -> MemoryEstimate:
    """Peak memory of a training run: model, volume, the augmented bank, the activations of a step.

    The bank holds ``copies_per_slice`` augmented copies of every labelled
    slice; it grows with the labelled slices and, through the masks, with
    the segments. On a GPU the step's activations live in GPU memory.
    """
    terms = _model_terms(model_id, method)
    if model_id == "lite_medsam":
        features = _TINYVIT_PREFIX_VALUES * (2 if half_precision else 4)
    else:
        features = 3 * input_size ** 2 * 4
    copy_bytes = features + segments * (_LOW_RES_TARGET_BYTES + 2 * 4 * input_size ** 2)
    step = TRAINING_STEP_FIXED_BYTES + batch_size * _activation_bytes(model_id, input_size, training=True,
                                                                      recomputed=recompute_activations)
    terms.update(
        volume=int(voxels) * (read_bytes + 4 + 2 + 2),  # as read, float32 image, labels as read and as uint16
        augmented_bank=int(labelled_slices * copies_per_slice * copy_bytes),
        training_step=0 if on_gpu else int(step))
    return MemoryEstimate(terms)


def propagation_memory(voxels: int, read_bytes: int, segments: int, slices: int, *, box_mode: bool,
                       with_labels: bool, model_id: str = "lite_medsam", method: str = "salt",
                       input_size: int = 256, batch_size: int = 4, on_gpu: bool = False) -> MemoryEstimate:
    """Peak memory of a propagation: model, volume, per-segment probability maps, label maps, embeddings.

    Per voxel: the image and its mapped copy; float16 probabilities for
    every segment; the arg-max (int64), maximum, confidence mask, output
    label map and the clean-up's components; with ``--labels``, the user's
    map, its re-expression and masks. Box mode keeps one embedding per slice.
    """
    terms = _model_terms(model_id, method)
    embedding_side = input_size // 4 if model_id == "lite_medsam" else input_size // 16
    encoded_together = min(batch_size, max(int(slices), 1))
    terms.update(
        volume=int(voxels) * (read_bytes + 4 + 4),
        probability_maps=int(voxels) * int(segments) * 2,
        label_maps=int(voxels) * (8 + 2 + 1 + 2 + 2 + 4),
        drawn_labels=int(voxels) * (2 + 2 + 2 + 1) if with_labels else 0,
        embeddings=int(slices) * 256 * embedding_side ** 2 * 4 if box_mode else 0,  # float32 even under autocast
        encoder=0 if on_gpu else encoded_together * _activation_bytes(model_id, input_size, training=False))
    return MemoryEstimate(terms)


def available_memory_bytes() -> Optional[int]:
    """Memory a job may use: ``SALTSEGMENT_MEMORY_LIMIT_BYTES`` if set, else what is free plus what this
    process already holds (the estimate counts it); None if the system does not say."""
    override = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    if override:
        try:
            return int(float(override))
        except ValueError:
            raise ValueError(f"{MEMORY_LIMIT_ENV} must be a number of bytes, not '{override}'") from None
    try:
        return int(psutil.virtual_memory().available + psutil.Process().memory_info().rss)
    except (OSError, RuntimeError):
        return None


def _gib(value: float) -> str:
    return f"{value / 1024 ** 3:.1f} GiB" if value >= 1024 ** 3 else f"{value / 1024 ** 2:.0f} MiB"


def check_memory(estimate: MemoryEstimate, what: str, hint: str) -> None:
    """Refuse a job whose estimated peak exceeds the memory available (no check when that is unknown)."""
    available = available_memory_bytes()
    if available is not None and estimate.total > available:
        raise InsufficientMemoryError(f"{what} needs about {_gib(estimate.total)} of memory "
                                      f"({estimate.describe()}) but only {_gib(available)} is available", hint)
