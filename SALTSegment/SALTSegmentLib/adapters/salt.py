"""SALT layers (Elsayed et al., 2025) and the SALT injection config.

SALT = scale/shift of the top-r singular values + a low-rank (d) term on the
residual spectrum; all the algebra lives in :mod:`.spectral`.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from .base import AdapterConfig
from .spectral import CLAMP_MODES, SpectralAdapter, resolve_rank


class SALTLinear(SpectralAdapter):
    """SALT on an ``nn.Linear``: ``rank`` adapted singular values (int, or fraction of
    k = min(out, in)), a rank-``lora_rank`` residual term, and the ReLU ``clamp`` mode
    ("diagonal": only the adapted top-r values; "reference": the authors' elementwise
    ReLU on the whole spectrum matrix)."""

    def __init__(self, base: nn.Linear, rank: int | float, lora_rank: int = 4, clamp: str = "diagonal") -> None:
        if not isinstance(base, nn.Linear):
            raise TypeError(f"SALTLinear wraps nn.Linear, got {type(base).__name__}")
        super().__init__(base, rank, lora_rank, clamp)


class SALTConv2d(SpectralAdapter):
    """SALT on an ``nn.Conv2d``: the same algebra on the kernel flattened to
    (out, in/groups * kh * kw); the forward applies the adapted kernel with the
    base's stride, padding, dilation and groups."""

    def __init__(self, base: nn.Conv2d, rank: int | float, lora_rank: int = 4, clamp: str = "diagonal") -> None:
        if not isinstance(base, nn.Conv2d):
            raise TypeError(f"SALTConv2d wraps nn.Conv2d, got {type(base).__name__}")
        super().__init__(base, rank, lora_rank, clamp)


@dataclasses.dataclass
class SALTConfig(AdapterConfig):
    """Where and how to inject SALT.

    Defaults are the paper's ViT-B ranks as fractions of the width (760/768 for
    attention, 50/768 for the MLP, d = 4), so the same config fits TinyViT.
    ``attention_targets``/``mlp_targets`` are last name components of linears inside
    ``scope``; ``trainable`` lists extra parameters to train ("norm": every LayerNorm,
    "pos_embed", or a regex on full parameter names).
    """

    attention_rank: int | float = 0.99
    mlp_rank: int | float = 0.065
    lora_rank: int = 4
    clamp: str = "diagonal"
    attention_targets: tuple[str, ...] = ("qkv", "proj")
    mlp_targets: tuple[str, ...] = ("lin1", "lin2", "fc1", "fc2")
    trainable: tuple[str, ...] = ("norm", "pos_embed")
    scope: str = "image_encoder"

    method = "salt"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.clamp not in CLAMP_MODES:
            raise ValueError(f"clamp must be one of {CLAMP_MODES}, got {self.clamp!r}")
        resolve_rank(self.attention_rank, 1)
        resolve_rank(self.mlp_rank, 1)
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(f"lora_rank must be an int >= 0, got {self.lora_rank!r}")

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self.attention_targets) + tuple(self.mlp_targets)

    def build_layer(self, name: str, module: nn.Module) -> SpectralAdapter:
        """SALT on one target: the attention rank for attention targets, the MLP rank otherwise."""
        last = name.rsplit(".", 1)[-1]
        rank = self.attention_rank if last in self.attention_targets or name in self.attention_targets \
            else self.mlp_rank
        layer = SALTConv2d if isinstance(module, nn.Conv2d) else SALTLinear
        return layer(module, rank=rank, lora_rank=self.lora_rank, clamp=self.clamp)
