"""Checks made before a job starts: can the output be written, and will the job fit in memory.

They run before any model is loaded, so a bad output path or a volume too
large for this machine costs the user seconds, not a training run.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

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
# Peak resident memory of a job, term by term. The constants were measured on
# LiteMedSAM (2 CPU threads, bf16 autocast) as the peak RSS of real
# ``saltsegment train`` / ``propagate`` processes (os.wait4, ru_maxrss) by
# ``scripts/measure_memory.py``, on the embedded sample and on a 512 x 512 x 60
# CT-sized volume; re-run it after changing training or propagation and
# update the constants. The terms for the SAM ViTs are scaled from the
# LiteMedSAM ones and are rougher.

_MIB = 1 << 20
# Python, torch, SimpleITK, scipy and the package itself, imported.
RUNTIME_BYTES = 800 * _MIB
# A loaded base model: its modules' code, the weights and the checkpoint they were read from.
MODEL_CODE_BYTES = 200 * _MIB
MODEL_BYTES_PER_PARAMETER = 8
# What a method keeps beside the weights (SVD factors of adapted layers, gradients and optimiser moments).
METHOD_BYTES_PER_PARAMETER = {"salt": 5, "ssam": 5, "lora": 1, "decoder": 2, "full": 16}
VIT_B_PARAMETERS = 93.7e6
# Activations of one training sample (forward and backward, the few segments decoded per slice) at 256 px,
# and what a step holds whatever the batch (autograd bookkeeping, optimiser, allocator slack).
TRAINING_SAMPLE_BYTES = {"lite_medsam": 1100 * _MIB, "vit": 1100 * _MIB}
TRAINING_STEP_FIXED_BYTES = 450 * _MIB
# Activations of encoding one slice without gradients (propagation encodes slices in chunks) at 256 px.
INFERENCE_SLICE_BYTES = {"lite_medsam": 150 * _MIB, "vit": 150 * _MIB}
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


def _model_terms(model_id: str, method: str, input_size: int) -> tuple[dict[str, int], bool, float]:
    """Runtime, model and method terms; whether it is TinyViT; how its activations scale from 256 px."""
    from .models import get_spec

    spec = get_spec(model_id)
    parameters = spec.parameters_millions * 1e6
    tiny = model_id == "lite_medsam"
    # ViT activations grow with the encoder's size (depth x width, roughly its parameters) and the input area.
    scale = (input_size / 256) ** 2 * (1.0 if tiny else parameters / VIT_B_PARAMETERS)
    terms = {"runtime": RUNTIME_BYTES,
             "model": int(MODEL_CODE_BYTES + parameters * MODEL_BYTES_PER_PARAMETER),
             "adapter_state": int(parameters * METHOD_BYTES_PER_PARAMETER.get(method, 16))}
    return terms, tiny, scale


def training_memory(voxels: int, read_bytes: int, labelled_slices: int, segments: int, *,
                    model_id: str = "lite_medsam", method: str = "salt", input_size: int = 256,
                    batch_size: int = 2, copies_per_slice: int = 6, half_precision: bool = True,
                    on_gpu: bool = False) -> MemoryEstimate:
    """Peak memory of a training run: model, volume, the augmented bank, the activations of a step.

    The bank holds ``copies_per_slice`` augmented copies of every labelled
    slice; it grows with the labelled slices and, through the masks, with
    the segments. On a GPU the step's activations live in GPU memory.
    """
    terms, tiny, scale = _model_terms(model_id, method, input_size)
    features = _TINYVIT_PREFIX_VALUES * (2 if half_precision else 4) if tiny else 3 * input_size ** 2 * 4
    copy_bytes = features + segments * (_LOW_RES_TARGET_BYTES + 2 * 4 * input_size ** 2)
    family = "lite_medsam" if tiny else "vit"
    terms.update(
        volume=int(voxels) * (read_bytes + 4 + 2 + 2),  # as read, float32 image, labels as read and as uint16
        augmented_bank=int(labelled_slices * copies_per_slice * copy_bytes),
        training_step=0 if on_gpu else int((TRAINING_STEP_FIXED_BYTES + batch_size * TRAINING_SAMPLE_BYTES[family])
                                           * scale))
    return MemoryEstimate(terms)


def propagation_memory(voxels: int, read_bytes: int, segments: int, slices: int, *, box_mode: bool,
                       with_labels: bool, model_id: str = "lite_medsam", method: str = "salt",
                       input_size: int = 256, batch_size: int = 4, half_precision: bool = True,
                       on_gpu: bool = False) -> MemoryEstimate:
    """Peak memory of a propagation: model, volume, per-segment probability maps, label maps, embeddings.

    Per voxel: the image and its mapped copy; float16 probabilities for
    every segment; the arg-max (int64), maximum, confidence mask, output
    label map and the clean-up's components; with ``--labels``, the user's
    map, its re-expression and masks. Box mode keeps one embedding per slice.
    """
    terms, tiny, scale = _model_terms(model_id, method, input_size)
    embedding_side = input_size // 4 if tiny else input_size // 16
    family = "lite_medsam" if tiny else "vit"
    terms.update(
        volume=int(voxels) * (read_bytes + 4 + 4),
        probability_maps=int(voxels) * int(segments) * 2,
        label_maps=int(voxels) * (8 + 2 + 1 + 2 + 2 + 4),
        drawn_labels=int(voxels) * (2 + 2 + 2 + 1) if with_labels else 0,
        embeddings=int(slices) * 256 * embedding_side ** 2 * (2 if half_precision else 4) if box_mode else 0,
        encoder=0 if on_gpu else int(min(batch_size, max(int(slices), 1)) * INFERENCE_SLICE_BYTES[family] * scale))
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
        import psutil

        return int(psutil.virtual_memory().available + psutil.Process().memory_info().rss)
    except (ImportError, OSError, RuntimeError):
        return None


def _gib(value: float) -> str:
    return f"{value / 1024 ** 3:.1f} GiB" if value >= 1024 ** 3 else f"{value / 1024 ** 2:.0f} MiB"


def check_memory(estimate: MemoryEstimate, what: str, hint: str) -> None:
    """Refuse a job whose estimated peak exceeds the memory available (no check when that is unknown)."""
    available = available_memory_bytes()
    if available is not None and estimate.total > available:
        raise InsufficientMemoryError(f"{what} needs about {_gib(estimate.total)} of memory "
                                      f"({estimate.describe()}) but only {_gib(available)} is available", hint)
