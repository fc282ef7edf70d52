"""Fine-tuning methods (one spec each, :mod:`.methods`), adapter layers (SALT, LoRA, S-SAM), their configs,
and model-level helpers (inject, save, load, merge)."""

from .base import AdapterConfig, AdapterLayer
from .injection import (
    AdapterLoadResult,
    adapter_state_dict,
    apply_method,
    encoder_is_frozen,
    inject_adapters,
    load_adapter_state_dict,
    make_config,
    mark_trainable,
    merge_adapters,
    trainable_parameter_count,
)
from .lora import LoRAConfig, LoRAConv2d, LoRALinear
from .methods import METHOD_SPECS, MethodSpec, method_spec, preset_options
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
    "METHOD_SPECS",
    "MethodSpec",
    "SALTConfig",
    "SALTConv2d",
    "SALTLinear",
    "SSAMConfig",
    "SSAMConv2d",
    "SSAMLinear",
    "SpectralAdapter",
    "adapter_state_dict",
    "apply_method",
    "canonical_svd",
    "encoder_is_frozen",
    "inject_adapters",
    "load_adapter_state_dict",
    "make_config",
    "mark_trainable",
    "merge_adapters",
    "method_spec",
    "preset_options",
    "resolve_rank",
    "trainable_parameter_count",
]
