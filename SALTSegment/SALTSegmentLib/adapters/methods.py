"""The fine-tuning methods, each defined once: one :class:`MethodSpec` per method in :data:`METHOD_SPECS`.

As peft maps each tuner type to its config and model classes, a spec holds
everything the engine needs to know about a method: its config class (whose
``build_layer`` is the layer factory) or, for methods without adapter layers,
what it makes trainable; its default learning rate; the options of each rank
preset. Its name and panel label come from the torch-free
:mod:`SALTSegmentLib.host.choices`, which the CLI, the worker driver and the
Slicer panel read; a test checks that both list the same methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from torch import nn

from ..host.choices import METHOD_LABELS, RANK_PRESETS
from .base import AdapterConfig
from .lora import LoRAConfig
from .salt import SALTConfig
from .ssam import SSAMConfig


def _train_decoder(model: nn.Module) -> None:
    model.requires_grad_(False)
    model.mask_decoder.requires_grad_(True)


def _train_everything(model: nn.Module) -> None:
    model.requires_grad_(True)


@dataclass(frozen=True)
class MethodSpec:
    """One fine-tuning method.

    Exactly one of ``config_class`` (adapter layers injected into the image
    encoder, see :func:`~SALTSegmentLib.adapters.inject_adapters`) and
    ``make_trainable`` (no adapter layers: which base parameters train) is set.
    """

    name: str
    learning_rate: float                                   # default AdamW step size (``--learning-rate`` overrides)
    rank_presets: Mapping[str, Mapping[str, Any]]          # preset name (host.choices.RANK_PRESETS) -> config fields
    config_class: Optional[type[AdapterConfig]] = None
    make_trainable: Optional[Callable[[nn.Module], None]] = None

    @property
    def label(self) -> str:
        """The name the Slicer panel shows."""
        return dict(METHOD_LABELS)[self.name]

    @property
    def injects_adapters(self) -> bool:
        return self.config_class is not None

    def preset_options(self, preset: str) -> dict[str, Any]:
        """The config fields of a rank preset (``small``, ``default``, ``large``)."""
        try:
            return dict(self.rank_presets[preset])
        except KeyError:
            raise ValueError(f"Unknown rank preset '{preset}'; choose {', '.join(RANK_PRESETS)}") from None


_NO_RANK: Mapping[str, Mapping[str, Any]] = {preset: {} for preset in RANK_PRESETS}

# Adapters and prompt tokens are small and start at the identity, so they take a large step size; the whole
# decoder (4M weights) or the whole model diverge at it. "default" is the paper's rank-4 row (SALT: the top 99%
# of singular values scaled/shifted in attention, 6.5% in the MLP, residual rank 4; LoRA: rank 4).
METHOD_SPECS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("salt", 3e-3, {"default": {}, "small": {"attention_rank": 0.5, "mlp_rank": 0.03, "lora_rank": 2},
                              "large": {"lora_rank": 32}}, config_class=SALTConfig),
    MethodSpec("lora", 3e-3, {"default": {}, "small": {"rank": 2}, "large": {"rank": 32}}, config_class=LoRAConfig),
    MethodSpec("ssam", 3e-3, _NO_RANK, config_class=SSAMConfig),
    MethodSpec("decoder", 3e-4, _NO_RANK, make_trainable=_train_decoder),
    MethodSpec("full", 1e-4, _NO_RANK, make_trainable=_train_everything),
)}


def method_spec(method: str) -> MethodSpec:
    """The spec of ``method``; a clear error for an unknown name."""
    try:
        return METHOD_SPECS[method]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown method '{method}'; choose one of {', '.join(METHOD_SPECS)}") from None


def preset_options(method: str, preset: str) -> dict[str, Any]:
    """The method options of a rank preset (``small``, ``default``, ``large``)."""
    return method_spec(method).preset_options(preset)
