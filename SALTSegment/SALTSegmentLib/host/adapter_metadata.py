"""An adapter file's metadata, read and checked without torch (the JSON header of the safetensors file).

A safetensors file starts with 8 bytes (little-endian header length) and a
JSON header that names every tensor with its dtype, shape and byte range,
plus a ``__metadata__`` string map; SALTSegment keeps its metadata there as
JSON. This module reads that header only, so Slicer's process can list the
adapter library without importing torch, and :func:`load_adapter_metadata`
checks everything the header can tell (values, labels, names, the method
against its tensors) before any model is built. The tensors themselves are
read by :mod:`SALTSegmentLib.adapter_file` in the worker.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .. import __version__
from ..slices import LEGACY_VOXEL_AXIS
from .choices import ADAPTER_METHODS, METHODS, MODEL_IDS, PLANES, VOXEL_AXES

FORMAT_NAME = "saltsegment-adapter"
# 2: "axis" is the voxel axis (i, j, k) of the training slices and "plane" their anatomical plane.
# 1: "axis" was axial/coronal/sagittal for the voxel axes k/j/i; still read (see _upgrade_version_1).
# Format 2 files may carry "cases" and "lineage" (added later, optional): older readers ignore them.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
PROMPT_KEY = "prompts.tokens"
MAX_LABEL = 65535  # label maps are written as uint16
_MAX_HEADER_BYTES = 64 << 20
_NOT_AN_ADAPTER = "pass the .safetensors file written by 'saltsegment train' (train again if it was damaged)"
_EDITED = "the file's metadata was changed after training: use the file 'saltsegment train' wrote, or train again"


class AdapterFileError(ValueError):
    """An adapter file is unreadable, foreign, of another version, or for another base model."""

    def __init__(self, message: str, hint: Optional[str] = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint  # the CLI prints it under the message


@dataclass
class AdapterMetadata:
    """Everything needed to reuse an adapter on a new volume."""

    base_model: str
    base_weights_sha256: str
    input_size: int
    method: str
    method_config: dict
    intensity: dict
    axis: str                       # voxel axis (i, j, k) the training slices were cut along
    segments: list[dict]
    training: dict = field(default_factory=dict)
    plane: Optional[str] = None     # their anatomical plane; None in format 1 files (see SALTSegmentLib.slices)
    # Every volume the adapter learned from, its parents' included (see case_record); empty in older files.
    cases: list[dict] = field(default_factory=list)
    # Where a continued adapter comes from (see lineage_record); None for an adapter trained from scratch.
    lineage: Optional[dict] = None
    format_version: int = FORMAT_VERSION
    package_version: str = __version__
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    @property
    def segment_list(self):
        """The segments as :class:`~SALTSegmentLib.volume_io.Segment` (label, name, colour)."""
        from ..volume_io import Segment

        return [Segment(label=int(s["label"]), name=str(s["name"]), color=tuple(s["color"])) for s in self.segments]

    @property
    def segment_names(self) -> list[str]:
        return [str(s["name"]) for s in self.segments]

    @property
    def intensity_mapping(self):
        """The :class:`~SALTSegmentLib.preprocessing.IntensityMapping` (engine side: imports torch)."""
        from ..preprocessing import IntensityMapping

        return IntensityMapping.from_dict(self.intensity)

    @staticmethod
    def segments_to_dicts(segments) -> list[dict]:
        return [{"label": s.label, "name": s.name, "color": list(s.color)} for s in segments]

    @property
    def generation(self) -> int:
        """0 for an adapter trained from scratch, 1 for its continuation, and so on."""
        return int(self.lineage["generation"]) if self.lineage else 0

    def history(self) -> str:
        """One line for the adapter library: the volumes it learned from, and what it continues."""
        names = [case["name"] for case in self.cases]
        volumes = (f"learned from {len(names)} volume{'s' if len(names) != 1 else ''} ({', '.join(names)})"
                   if names else "volumes not recorded")
        if not self.lineage:
            return volumes
        return (f"{volumes}; generation {self.generation}, continues {self.lineage['parent_sha256'][:12]} "
                f"(added {', '.join(self.lineage['cases_added']) or 'no volume'})")


def case_record(name: str, sha256: str, labelled_slices: list[int], segments: list[str],
                generation: int = 0, lengths: Optional[dict[str, dict]] = None,
                absent: Optional[dict[str, list[int]]] = None) -> dict:
    """A volume an adapter learned from: its file name, the sha256 of the image, the slices and segments used.

    ``generation`` is the lineage generation of the adapter that added it;
    ``lengths`` how long each segment was drawn (``structure_length``), which
    a one-slice propagation with this adapter uses as a bound; ``absent`` the
    slices marked without a segment, which it learned as negatives for that
    segment alone (records written before marks existed have none).
    """
    return {"name": name, "sha256": sha256, "labelled_slices": [int(s) for s in labelled_slices],
            "segments": list(segments), "generation": int(generation), "lengths": dict(lengths or {}),
            "absent": {str(k): sorted(int(i) for i in v) for k, v in (absent or {}).items()}}


def lineage_record(parent_sha256: str, parent: "AdapterMetadata", cases_added: list[str],
                   segments_added: list[str]) -> dict:
    """How a continued adapter descends from ``parent`` (the file with sha256 ``parent_sha256``)."""
    ancestors = list(parent.lineage["ancestors"]) if parent.lineage else []
    return {"parent_sha256": parent_sha256, "parent_created": parent.created,
            "generation": parent.generation + 1, "ancestors": ancestors + [parent_sha256],
            "cases_added": list(cases_added), "segments_added": list(segments_added)}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a folder's files (a DICOM series: relative names and contents, sorted)."""
    import hashlib

    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for item in files:
        if item != path:
            digest.update(item.relative_to(path).as_posix().encode("utf-8") + b"\0")
        with open(item, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a safetensors file, checked to describe exactly the bytes the file holds."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise AdapterFileError(f"{path} is too short to be an adapter file", _NOT_AN_ADAPTER)
            (length,) = struct.unpack("<Q", prefix)
            if length > min(size - 8, _MAX_HEADER_BYTES):
                raise AdapterFileError(f"{path} is not a safetensors file (or it is truncated)", _NOT_AN_ADAPTER)
            header = json.loads(handle.read(length).decode("utf-8"))
    except FileNotFoundError:
        raise AdapterFileError(f"Adapter file not found: {path}", "check the --adapter path") from None
    except IsADirectoryError:
        raise AdapterFileError(f"{path} is a folder, not an adapter file", _NOT_AN_ADAPTER) from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AdapterFileError(f"{path} is not a safetensors file (unreadable header)", _NOT_AN_ADAPTER) from None
    if not isinstance(header, dict):
        raise AdapterFileError(f"{path} is not a safetensors file", _NOT_AN_ADAPTER)
    try:  # the tensors must end where the file ends: a cut-off copy is caught here, before any model loads
        end = max([int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"],
                  default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise AdapterFileError(f"{path} is not a safetensors file (malformed header)", _NOT_AN_ADAPTER) from None
    if 8 + length + end != size:
        raise AdapterFileError(f"{path} is truncated or corrupt ({size:,} bytes; its header describes "
                               f"{8 + length + end:,})", _NOT_AN_ADAPTER)
    return header


def read_adapter_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of an adapter file as a plain dict (format and version checked, values not)."""
    path = Path(path)
    return _metadata_values(path, read_header(path))


def _metadata_values(path: Path, header: dict[str, Any]) -> dict[str, Any]:
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME or "saltsegment" not in metadata:
        raise AdapterFileError(f"{path} is a safetensors file but not a SALTSegment adapter", _NOT_AN_ADAPTER)
    try:
        version = int(metadata.get("format_version", "0"))
    except (TypeError, ValueError):
        version = -1
    if version not in READABLE_VERSIONS:
        raise AdapterFileError(
            f"{path} uses adapter format version {metadata.get('format_version')}; this SALTSegment "
            f"({__version__}) reads versions {', '.join(map(str, READABLE_VERSIONS))}",
            "use the SALTSegment version that wrote it, or train the adapter again with this one")
    try:
        values = json.loads(metadata["saltsegment"])
    except (TypeError, json.JSONDecodeError):
        raise AdapterFileError(f"{path} has corrupt adapter metadata", _NOT_AN_ADAPTER) from None
    if not isinstance(values, dict):
        raise AdapterFileError(f"{path} has corrupt adapter metadata", _NOT_AN_ADAPTER)
    return _upgrade_version_1(values) if version == 1 else values


def _upgrade_version_1(values: dict[str, Any]) -> dict[str, Any]:
    """Format 1 metadata in format 2 terms: its plane-named "axis" was a voxel axis (axial = k, ...), no plane."""
    values = dict(values)
    axis = values.get("axis")
    if isinstance(axis, str) and axis in LEGACY_VOXEL_AXIS:
        values["axis"] = LEGACY_VOXEL_AXIS[axis]
    values["plane"] = None
    return values


def load_adapter_metadata(path: str | os.PathLike) -> AdapterMetadata:
    """The fully checked metadata of an adapter file (reads the header only; no model, no torch).

    Every problem found is named in one :class:`AdapterFileError`, so an
    edited or damaged file is refused before any work starts.
    """
    path = Path(path)
    header = read_header(path)
    values = _metadata_values(path, header)
    known = set(AdapterMetadata.__dataclass_fields__)
    try:
        metadata = AdapterMetadata(**{k: v for k, v in values.items() if k in known})
    except TypeError as error:
        raise AdapterFileError(f"{path} lacks adapter metadata fields: {error}", _NOT_AN_ADAPTER) from None
    tensors = {key: entry for key, entry in header.items() if key != "__metadata__"}
    problems = metadata_problems(metadata, tensors)
    if problems:
        raise AdapterFileError(f"{path} has corrupt adapter metadata: " + "; ".join(problems), _EDITED)
    return metadata


def metadata_problems(metadata: AdapterMetadata, tensors: dict[str, dict]) -> list[str]:
    """Everything wrong with ``metadata`` and the tensor table of its file (empty when all is well)."""
    problems: list[str] = []
    if metadata.base_model not in MODEL_IDS:
        problems.append(f"unknown base model {metadata.base_model!r} (known: {', '.join(MODEL_IDS)})")
    if not _is_int(metadata.input_size) or metadata.input_size <= 0:
        problems.append(f"input size {metadata.input_size!r} is not a positive whole number")
    if metadata.axis not in VOXEL_AXES:
        problems.append(f"unknown axis {metadata.axis!r} (a voxel axis: {', '.join(VOXEL_AXES)})")
    if metadata.plane is not None and metadata.plane not in PLANES:
        problems.append(f"unknown plane {metadata.plane!r} (use one of {', '.join(PLANES)})")
    problems += _intensity_problems(metadata.intensity)
    problems += _segment_problems(metadata.segments)
    problems += _case_problems(metadata.cases)
    problems += _lineage_problems(metadata.lineage)
    problems += _method_problems(metadata.method, metadata.method_config, tensors)
    prompt = tensors.get(PROMPT_KEY)
    if prompt is None:
        problems.append(f"no {PROMPT_KEY} tensor (the learned prompts)")
    elif isinstance(metadata.segments, list):
        shape = prompt.get("shape") if isinstance(prompt, dict) else None
        if not (isinstance(shape, list) and len(shape) == 3):
            problems.append(f"{PROMPT_KEY} has shape {shape}, not (segments, tokens, width)")
        elif shape[0] != len(metadata.segments):
            problems.append(f"{shape[0]} learned prompt(s) for {len(metadata.segments)} segment(s)")
    return problems


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _intensity_problems(intensity: Any) -> list[str]:
    if not isinstance(intensity, dict):
        return ["the intensity mapping is not a table of values"]
    kind = intensity.get("kind", "percentile")
    if kind == "window":
        level, width = intensity.get("level"), intensity.get("width")
        if not (_is_number(level) and _is_number(width) and width > 0):
            return [f"intensity window level {level!r} / width {width!r} is not a number and a positive width"]
        return []
    if kind == "percentile":
        low, high = intensity.get("low_percentile", 0.5), intensity.get("high_percentile", 99.5)
        if not (_is_number(low) and _is_number(high) and 0 <= low < high <= 100):
            return [f"intensity percentiles {low!r}-{high!r} are not 0 <= low < high <= 100"]
        return []
    return [f"unknown intensity mapping {kind!r} (window or percentile)"]


def _segment_problems(segments: Any) -> list[str]:
    if not isinstance(segments, list) or not segments:
        return ["no segments"]
    problems, labels, names = [], [], []
    for number, segment in enumerate(segments, start=1):
        if not isinstance(segment, dict):
            problems.append(f"segment {number} is not a table of values")
            continue
        label, name, color = segment.get("label"), segment.get("name"), segment.get("color")
        what = f"segment {number}" + (f" ({name})" if isinstance(name, str) and name else "")
        if not _is_int(label):
            problems.append(f"{what} has no whole-number label")
        elif not 1 <= label <= MAX_LABEL:
            problems.append(f"{what} has label {label}, outside 1..{MAX_LABEL}")
        else:
            labels.append(label)
        if not isinstance(name, str) or not name.strip():
            problems.append(f"segment {number} has no name")
        else:
            names.append(name)
        if not (isinstance(color, (list, tuple)) and len(color) == 3
                and all(_is_number(c) and 0 <= c <= 1 for c in color)):
            problems.append(f"{what} has colour {color!r}, not three values in 0..1")
    for label in sorted({v for v in labels if labels.count(v) > 1}):
        problems.append(f"label {label} is used by {labels.count(label)} segments")
    for name in sorted({v for v in names if names.count(v) > 1}):
        problems.append(f"the name {name!r} is used by {names.count(name)} segments")
    return problems


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _is_text_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _case_problems(cases: Any) -> list[str]:
    if not isinstance(cases, list):
        return ["the list of training cases is not a list"]
    problems = []
    for number, case in enumerate(cases, start=1):
        if not isinstance(case, dict):
            problems.append(f"training case {number} is not a table of values")
            continue
        what = f"training case {number}"
        if not isinstance(case.get("name"), str) or not case["name"]:
            problems.append(f"{what} has no file name")
        if not _is_sha256(case.get("sha256")):
            problems.append(f"{what} has no sha256 of its image")
        slices = case.get("labelled_slices")
        if not (isinstance(slices, list) and all(_is_int(s) and s >= 0 for s in slices)):
            problems.append(f"{what} lists labelled slices {slices!r}, not slice numbers")
        if not _is_text_list(case.get("segments", [])):
            problems.append(f"{what} lists segments that are not names")
        if not (_is_int(case.get("generation", 0)) and case.get("generation", 0) >= 0):
            problems.append(f"{what} has generation {case.get('generation')!r}, not a whole number")
        problems += [f"{what} {p}" for p in _length_problems(case.get("lengths", {}))]
    return problems


LENGTH_KEYS = ("span_mm", "gap_mm", "radius_mm")


def _length_problems(lengths: Any) -> list[str]:
    """A case's drawn structure lengths (structure_length.py): millimetre values per segment."""
    if not isinstance(lengths, dict):
        return ["keeps structure lengths that are not a table of values"]
    return [f"keeps a length of {name!r} that is not {', '.join(LENGTH_KEYS)} in millimetres"
            for name, values in lengths.items()
            if not isinstance(values, dict) or not all(_is_number(values.get(k)) and values[k] >= 0 for k in LENGTH_KEYS)]


def _lineage_problems(lineage: Any) -> list[str]:
    if lineage is None:
        return []
    if not isinstance(lineage, dict):
        return ["the lineage is not a table of values"]
    problems = []
    if not _is_sha256(lineage.get("parent_sha256")):
        problems.append("the lineage names no parent adapter sha256")
    ancestors = lineage.get("ancestors")
    if not (isinstance(ancestors, list) and ancestors and all(_is_sha256(a) for a in ancestors)):
        problems.append("the lineage's ancestors are not adapter sha256 values")
    generation = lineage.get("generation")
    if not (_is_int(generation) and generation >= 1):
        problems.append(f"the lineage generation {generation!r} is not a whole number of at least 1")
    elif isinstance(ancestors, list) and len(ancestors) != generation:
        problems.append(f"the lineage lists {len(ancestors)} ancestors for generation {generation}")
    if isinstance(ancestors, list) and ancestors and ancestors[-1] != lineage.get("parent_sha256"):
        problems.append("the lineage's last ancestor is not its parent")
    for key in ("cases_added", "segments_added"):
        if not _is_text_list(lineage.get(key)):
            problems.append(f"the lineage's {key.replace('_', ' ')} are not names")
    return problems


# Parameter names each adapter layer type adds (see SALTSegmentLib/adapters).
_SPECTRAL = ("scale", "shift")
_RESIDUAL = ("residual_x", "residual_y")
_LORA = ("lora_a", "lora_b")


def _method_problems(method: Any, config: Any, tensors: dict[str, dict]) -> list[str]:
    if method not in METHODS:
        return [f"unknown method {method!r} (use one of {', '.join(METHODS)})"]
    if not isinstance(config, dict):
        return [f"the {method} configuration is not a table of values"]
    keys = [key for key in tensors if key != PROMPT_KEY]
    kinds = {key.rsplit(".", 1)[-1] for key in keys}
    if method in ADAPTER_METHODS:
        expected = {"salt": _SPECTRAL, "ssam": _SPECTRAL, "lora": _LORA}[method]
        foreign = {"salt": _LORA, "ssam": _LORA + _RESIDUAL, "lora": _SPECTRAL + _RESIDUAL}[method]
        if not set(expected) <= kinds or kinds & set(foreign):
            return [f"the method says {method} but the tensors are those of "
                    f"{_method_of_tensors(kinds, keys)}"]
        return []
    if config:
        return [f"method {method} takes no options, but the file lists {sorted(config)}"]
    if kinds & set(_SPECTRAL + _RESIDUAL + _LORA):
        return [f"the method says {method} but the tensors are those of {_method_of_tensors(kinds, keys)}"]
    if method == "decoder" and any(not key.startswith("mask_decoder.") for key in keys):
        return ["the method says decoder but the file holds tensors outside the mask decoder"]
    if method == "full" and not any(key.startswith("image_encoder.") for key in keys):
        return ["the method says full but the file holds no image encoder tensors"]
    return []


def _method_of_tensors(kinds: set[str], keys: list[str]) -> str:
    if set(_LORA) <= kinds:
        return "lora"
    if set(_SPECTRAL) <= kinds:
        return "salt" if set(_RESIDUAL) & kinds else "ssam"
    if keys and all(key.startswith("mask_decoder.") for key in keys):
        return "decoder"
    return "full fine-tuning" if keys else "no method (no tensors)"
