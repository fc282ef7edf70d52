"""The adapter file: one ``.safetensors`` with the trainable tensors and their metadata.

Only what training changed is stored (adapter layers, trainable norms and
pos_embed, the learned prompt tokens): a few MB. The metadata says what is
needed to use the file again: the base model and the sha256 of its weights,
the method and its config, input size, intensity mapping, slice axis,
segments, and a training summary. Loading refuses a file made for other base
weights or another format version, with a message naming what it needs.
safetensors holds no code, and the metadata is parsed as JSON, never evaluated.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from . import __version__
from .adaptation import apply_method
from .adapters import adapter_state_dict, load_adapter_state_dict
from .atomic_files import atomic_path
from .models import PromptableSegmenter, load_model
from .preprocessing import SLICE_AXES, IntensityMapping
from .prompts import SegmentPrompts
from .volume_io import Segment

FORMAT_NAME = "saltsegment-adapter"
FORMAT_VERSION = 1
PROMPT_KEY = "prompts.tokens"
_MAX_HEADER_BYTES = 64 << 20


class AdapterFileError(ValueError):
    """An adapter file is unreadable, foreign, of another version, or for another base model."""

    def __init__(self, message: str, hint: Optional[str] = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint  # the CLI prints it under the message


_NOT_AN_ADAPTER = "pass the .safetensors file written by 'saltsegment train' (train again if it was damaged)"


@dataclass
class AdapterMetadata:
    """Everything needed to reuse an adapter on a new volume."""

    base_model: str
    base_weights_sha256: str
    input_size: int
    method: str
    method_config: dict
    intensity: dict
    axis: str
    segments: list[dict]
    training: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    package_version: str = __version__
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    @property
    def segment_list(self) -> list[Segment]:
        return [Segment(label=int(s["label"]), name=str(s["name"]), color=tuple(s["color"])) for s in self.segments]

    @property
    def intensity_mapping(self) -> IntensityMapping:
        return IntensityMapping.from_dict(self.intensity)

    @staticmethod
    def segments_to_dicts(segments: list[Segment]) -> list[dict]:
        return [{"label": s.label, "name": s.name, "color": list(s.color)} for s in segments]


def save_adapter(path: str | os.PathLike, model: PromptableSegmenter, prompts: SegmentPrompts,
                 metadata: AdapterMetadata) -> Path:
    """Write the trainable tensors and metadata atomically (a crash never leaves half a file)."""
    from safetensors.torch import save_file

    tensors = adapter_state_dict(model)
    tensors[PROMPT_KEY] = prompts.tokens.detach().to("cpu", torch.float32).contiguous()
    header = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
              "saltsegment": json.dumps(asdict(metadata))}
    path = Path(path)
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=header)
    return path


def _read_header(path: Path) -> dict[str, Any]:
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
    """The metadata of an adapter file as a plain dict, without torch (for listings in Slicer)."""
    path = Path(path)
    metadata = _read_header(path).get("__metadata__") or {}
    if metadata.get("format") != FORMAT_NAME or "saltsegment" not in metadata:
        raise AdapterFileError(f"{path} is a safetensors file but not a SALTSegment adapter", _NOT_AN_ADAPTER)
    try:
        version = int(metadata.get("format_version", "0"))
    except ValueError:
        version = -1
    if version != FORMAT_VERSION:
        raise AdapterFileError(
            f"{path} uses adapter format version {metadata.get('format_version')}; this SALTSegment "
            f"({__version__}) reads version {FORMAT_VERSION}",
            "use the SALTSegment version that wrote it, or train the adapter again with this one")
    try:
        values = json.loads(metadata["saltsegment"])
    except json.JSONDecodeError:
        raise AdapterFileError(f"{path} has corrupt adapter metadata", _NOT_AN_ADAPTER) from None
    if not isinstance(values, dict):
        raise AdapterFileError(f"{path} has corrupt adapter metadata", _NOT_AN_ADAPTER)
    return values


def _metadata_from_dict(path: Path, values: dict[str, Any]) -> AdapterMetadata:
    known = set(AdapterMetadata.__dataclass_fields__)
    try:
        return AdapterMetadata(**{k: v for k, v in values.items() if k in known})
    except TypeError as error:
        raise AdapterFileError(f"{path} lacks adapter metadata fields: {error}", _NOT_AN_ADAPTER) from None


def load_adapter_metadata(path: str | os.PathLike) -> AdapterMetadata:
    """The checked metadata of an adapter file, without loading any model (cheap: reads the header)."""
    path = Path(path)
    metadata = _metadata_from_dict(path, read_adapter_metadata(path))
    try:
        metadata.segment_list, metadata.intensity_mapping  # noqa: B018 - parse them now, not mid-run
        if not metadata.segments:
            raise ValueError("no segments")
        if metadata.axis not in SLICE_AXES:
            raise ValueError(f"unknown axis {metadata.axis!r}")
        int(metadata.input_size)
    except (KeyError, TypeError, ValueError) as error:
        raise AdapterFileError(f"{path} has corrupt adapter metadata ({error})", _NOT_AN_ADAPTER) from None
    return metadata


@dataclass
class LoadedAdapter:
    """An adapted model ready for propagation."""

    model: PromptableSegmenter
    prompts: SegmentPrompts
    metadata: AdapterMetadata


def load_adapter(path: str | os.PathLike, weights: Optional[str | os.PathLike] = None,
                 model: Optional[PromptableSegmenter] = None) -> LoadedAdapter:
    """Rebuild the adapted model of an adapter file on the CPU.

    The base model comes from the registry (``weights`` overrides its file) or
    is ``model`` (fresh, not yet adapted). Its weights fingerprint must match
    the one the adapter was trained on.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    metadata = load_adapter_metadata(path)
    if model is None:
        model = load_model(metadata.base_model, weights=weights, input_size=metadata.input_size)
    if model.model_id != metadata.base_model or model.input_size != metadata.input_size:
        raise AdapterFileError(
            f"{path} was trained on {metadata.base_model} at {metadata.input_size} px, not on "
            f"{model.model_id} at {model.input_size} px")
    if model.weights_sha256 != metadata.base_weights_sha256:
        raise AdapterFileError(
            f"{path} was trained on {metadata.base_model} weights with sha256 "
            f"{metadata.base_weights_sha256[:12]}..., but the loaded weights are "
            f"{(model.weights_sha256 or 'unknown')[:12]}...; use the same base weights file")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise AdapterFileError(f"{path} is corrupt or truncated: {error}", _NOT_AN_ADAPTER) from None
    if PROMPT_KEY not in tensors:
        raise AdapterFileError(f"{path} holds no prompt tokens")
    tokens = tensors.pop(PROMPT_KEY)
    apply_method(model, metadata.method, metadata.method_config)
    try:
        load_adapter_state_dict(model, tensors, strict=True)
    except RuntimeError as error:
        raise AdapterFileError(f"{path} does not fit {metadata.base_model}: {error}") from None
    if tokens.shape[0] != len(metadata.segments):
        raise AdapterFileError(f"{path} has {tokens.shape[0]} prompts for {len(metadata.segments)} segments")
    prompts = SegmentPrompts(tokens.shape[0], tokens.shape[2], tokens.shape[1])
    with torch.no_grad():
        prompts.tokens.copy_(tokens)
    return LoadedAdapter(model.eval(), prompts.eval(), metadata)
