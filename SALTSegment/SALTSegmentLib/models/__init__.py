"""Base models: the registry, the builders, weights handling and the common segmenter interface."""

from .registry import (MODEL_IDS, MODEL_REGISTRY, ModelSpec, UnknownModelError, cached_weights_path,
                       download_weights, get_spec, load_model, weights_available)
from .segmenter import PromptableSegmenter
from .weights import WeightsError

__all__ = [
    "MODEL_IDS", "MODEL_REGISTRY", "ModelSpec", "PromptableSegmenter", "UnknownModelError", "WeightsError",
    "cached_weights_path", "download_weights", "get_spec", "load_model", "weights_available",
]
