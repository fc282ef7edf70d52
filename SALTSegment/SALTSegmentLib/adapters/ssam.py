"""S-SAM baseline layers: ReLU(scale * s + shift) on every singular value, no residual.

S-SAM is the spectral layer of :mod:`.spectral` with r = k (so no residual term).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from .base import AdapterConfig
from .spectral import SpectralAdapter


class SSAMLinear(SpectralAdapter):
    """S-SAM on an ``nn.Linear``: all min(out, in) singular values are adapted."""

    def __init__(self, base: nn.Linear) -> None:
        if not isinstance(base, nn.Linear):
            raise TypeError(f"SSAMLinear wraps nn.Linear, got {type(base).__name__}")
        super().__init__(base, rank=1.0, lora_rank=0)


class SSAMConv2d(SpectralAdapter):
    """S-SAM on an ``nn.Conv2d`` (kernel flattened to (out, in/groups * kh * kw))."""

    def __init__(self, base: nn.Conv2d) -> None:
        if not isinstance(base, nn.Conv2d):
            raise TypeError(f"SSAMConv2d wraps nn.Conv2d, got {type(base).__name__}")
        super().__init__(base, rank=1.0, lora_rank=0)


@dataclasses.dataclass
class SSAMConfig(AdapterConfig):
    """Where to inject S-SAM; fields as in :class:`~.salt.SALTConfig`."""

    targets: tuple[str, ...] = ("qkv", "proj", "lin1", "lin2", "fc1", "fc2")
    trainable: tuple[str, ...] = ("norm", "pos_embed")
    scope: str = "image_encoder"

    method = "ssam"

    def build_layer(self, name: str, module: nn.Module) -> SpectralAdapter:
        return (SSAMConv2d if isinstance(module, nn.Conv2d) else SSAMLinear)(module)
