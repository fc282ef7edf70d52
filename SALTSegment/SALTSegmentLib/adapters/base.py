"""Interface shared by every adapter layer, and the base of the method configs.

Adapters wrap a frozen ``nn.Linear`` or ``nn.Conv2d`` (kept as ``.base``) and add a
trainable weight correction. Everything that only depends on "base weight + delta"
(dense effective weight, merging back into a plain layer, applying a weight to an
input with the base's geometry) lives here so the methods only define their delta.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

ConfigT = TypeVar("ConfigT", bound="AdapterConfig")


def add_low_rank(out: torch.Tensor, hidden: torch.Tensor, left: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``out + alpha * hidden @ left^T`` as one GEMM that accumulates into (a copy of) ``out``.

    ``out`` is a linear layer's output (..., out), ``hidden`` the input already
    projected on the low-rank factors (..., m), ``left`` (out, m). On
    TinyViT's token grids the output is far larger than the factors: written
    as separate ops, the product, its scaling and the sum each pass over it
    (and, for the backward, keep their own copies); here the GEMM writes it once.
    """
    flat = torch.addmm(out.reshape(-1, out.shape[-1]), hidden.reshape(-1, hidden.shape[-1]), left.t(), alpha=alpha)
    return flat.view(out.shape)


class AdapterLayer(nn.Module):
    """A frozen ``nn.Linear``/``nn.Conv2d`` plus a trainable weight correction.

    Subclasses implement :meth:`delta_weight` (the correction, in the base weight's
    shape) and ``forward``; the dense helpers here are for tests, merging and
    saving, not for the training forward.
    """

    base: nn.Linear | nn.Conv2d

    def __init__(self, base: nn.Module) -> None:
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"adapters wrap nn.Linear or nn.Conv2d, got {type(base).__name__}")
        super().__init__()
        base.requires_grad_(False)
        self.base = base

    @property
    def is_conv(self) -> bool:
        return isinstance(self.base, nn.Conv2d)

    def base_weight_2d(self) -> torch.Tensor:
        """The frozen weight as an (out, fan_in) matrix (conv kernels flattened)."""
        return self.base.weight.reshape(self.base.weight.shape[0], -1)

    def delta_weight(self) -> torch.Tensor:
        """Trainable correction to the base weight, in the base weight's shape."""
        raise NotImplementedError

    def effective_weight(self) -> torch.Tensor:
        """Dense adapted weight (base weight + correction), base weight's shape."""
        return self.base.weight + self.delta_weight()

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Run the base layer's operation (bias, stride, padding, ...) with another weight."""
        if self.is_conv:
            return self.base._conv_forward(x, weight, self.base.bias)
        return F.linear(x, weight, self.base.bias)

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """A plain copy of the base layer whose weight is the adapted weight."""
        merged = copy.deepcopy(self.base)
        merged.weight = nn.Parameter(
            self.effective_weight().detach().to(self.base.weight.dtype).clone(),
            requires_grad=False,
        )
        return merged

    def adapter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Parameters that belong to the adapter itself (not to ``.base``)."""
        for name, param in self.named_parameters():
            if not name.startswith("base."):
                yield name, param

    def adapter_parameter_count(self) -> int:
        return sum(p.numel() for _, p in self.adapter_parameters())


@dataclasses.dataclass
class AdapterConfig:
    """Base of the per-method configs: the layer factory, JSON round-trip helpers and field checks.

    The fields are the metadata saved next to an adapter file, so they must stay
    plain JSON values; sequences are normalised to tuples so a config rebuilt from
    JSON (where tuples became lists) compares equal to the original.
    """

    method = "base"

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, list):
                setattr(self, field.name, tuple(value))
            elif isinstance(value, str) and field.name.endswith(("targets", "trainable")):
                setattr(self, field.name, (value,))

    def build_layer(self, name: str, module: nn.Module) -> AdapterLayer:
        """The adapter layer that replaces the target ``module`` (full name ``name``): the method's layer factory."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[ConfigT], data: dict[str, Any]) -> ConfigT:
        """Rebuild a config from :meth:`to_dict` output (possibly via JSON)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TypeError(f"{cls.__name__} has no field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def replace(self: ConfigT, **overrides: Any) -> ConfigT:
        """Copy with some fields replaced; unknown names raise a clear error."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field(s) {unknown}; known fields: {sorted(known)}")
        return dataclasses.replace(self, **overrides)
