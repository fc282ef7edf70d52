"""The adapter file: one ``.safetensors`` with the trainable tensors and their metadata.

Only what training changed is stored (adapter layers, trainable norms and
pos_embed, the learned prompt tokens): a few MB. The metadata says what is
needed to use the file again: the base model and the sha256 of its weights,
the method and its config, input size, intensity mapping, slice axis and plane,
segments, and a training summary. Loading refuses a file made for other base
weights or another format version, with a message naming what it needs.
safetensors holds no code, and the metadata is parsed as JSON, never evaluated.
The metadata itself (reading and checking it) lives in the torch-free
:mod:`~SALTSegmentLib.host.adapter_metadata`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from .adapters import adapter_state_dict, apply_method, load_adapter_state_dict
from .atomic_files import atomic_path
# The metadata is read without torch (Slicer lists the library with it); these names stay importable from here.
from .host.adapter_metadata import (FORMAT_NAME, FORMAT_VERSION, PROMPT_KEY, AdapterFileError,  # noqa: F401
                                    AdapterMetadata, load_adapter_metadata, read_adapter_metadata)
from .models import PromptableSegmenter, load_model
from .prompts import SegmentPrompts

_NOT_AN_ADAPTER = "pass the .safetensors file written by 'saltsegment train' (train again if it was damaged)"


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
