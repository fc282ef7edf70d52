"""LoRA baseline layers (W + (alpha / rank) B A, B = 0 at init) and their config."""

from __future__ import annotations

import dataclasses
import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterConfig, AdapterLayer, add_low_rank


class _LoRA(AdapterLayer):
    """Shared LoRA factors: ``lora_a`` (rank x fan_in, Kaiming-uniform) and
    ``lora_b`` (out x rank, zero) so the layer equals its base at init."""

    def __init__(self, base: nn.Module, rank: int = 4, alpha: float | None = None) -> None:
        super().__init__(base)
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
            raise ValueError(f"LoRA rank must be an int >= 1, got {rank!r}")
        self.rank = int(rank)
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = self.alpha / self.rank
        out_features, fan_in = self.base_weight_2d().shape
        factory = dict(device=self.base.weight.device, dtype=self.base.weight.dtype)
        self.lora_a = nn.Parameter(torch.empty(self.rank, fan_in, **factory))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.lora_b = nn.Parameter(torch.zeros(out_features, self.rank, **factory))

    def delta_weight(self) -> torch.Tensor:
        return ((self.lora_b * self.scaling) @ self.lora_a).view_as(self.base.weight)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


class LoRALinear(_LoRA):
    """LoRA on an ``nn.Linear``; the low-rank update is applied to the activations."""

    def __init__(self, base: nn.Linear, rank: int = 4, alpha: float | None = None) -> None:
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base).__name__}")
        super().__init__(base, rank, alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return add_low_rank(self.base(x), F.linear(x, self.lora_a), self.lora_b, alpha=self.scaling)


class LoRAConv2d(_LoRA):
    """LoRA on an ``nn.Conv2d`` kernel flattened to (out, in/groups * kh * kw); the
    forward applies base kernel + update with the base's conv geometry."""

    def __init__(self, base: nn.Conv2d, rank: int = 4, alpha: float | None = None) -> None:
        if not isinstance(base, nn.Conv2d):
            raise TypeError(f"LoRAConv2d wraps nn.Conv2d, got {type(base).__name__}")
        super().__init__(base, rank, alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply_weight(x, self.effective_weight())


@dataclasses.dataclass
class LoRAConfig(AdapterConfig):
    """Where and how to inject LoRA; ``alpha`` None means alpha = rank (scaling 1)."""

    rank: int = 4
    alpha: float | None = None
    targets: tuple[str, ...] = ("qkv", "proj", "lin1", "lin2", "fc1", "fc2")
    trainable: tuple[str, ...] = ("norm", "pos_embed")
    scope: str = "image_encoder"

    method = "lora"

    def build_layer(self, name: str, module: nn.Module) -> AdapterLayer:
        return (LoRAConv2d if isinstance(module, nn.Conv2d) else LoRALinear)(module, rank=self.rank, alpha=self.alpha)
