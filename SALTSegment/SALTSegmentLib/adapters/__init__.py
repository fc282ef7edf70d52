"""Adapter layers (SALT, LoRA, S-SAM), their configs, and model-level helpers."""

from .base import AdapterConfig, AdapterLayer
from .injection import (
    AdapterLoadResult,
    adapter_state_dict,
    inject_adapters,
    load_adapter_state_dict,
    make_config,
    mark_trainable,
    merge_adapters,
    trainable_parameter_count,
)
from .lora import LoRAConfig, LoRAConv2d, LoRALinear
from .salt import SALTConfig, SALTConv2d, SALTLinear
from .spectral import SpectralAdapter, canonical_svd, resolve_rank
from .ssam import SSAMConfig, SSAMConv2d, SSAMLinear

__all__ = [
    "AdapterConfig",
    "AdapterLayer",
    "AdapterLoadResult",
    "LoRAConfig",
    "LoRAConv2d",
    "LoRALinear",
    "SALTConfig",
    "SALTConv2d",
    "SALTLinear",
    "SSAMConfig",
    "SSAMConv2d",
    "SSAMLinear",
    "SpectralAdapter",
    "adapter_state_dict",
    "canonical_svd",
    "inject_adapters",
    "load_adapter_state_dict",
    "make_config",
    "mark_trainable",
    "merge_adapters",
    "resolve_rank",
    "trainable_parameter_count",
]
