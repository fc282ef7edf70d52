"""Canonical SVD and the spectral adapter layer shared by SALT and S-SAM.

With W = U diag(s) V^T (thin SVD, k = min(out, in)) the adapted weight is

    W~ = U_r diag(ReLU(scale * s_r + shift)) V_r^T + U_res M_res V_res^T,
    M_res = diag(s_res) + X Y          (X: r' x d, Y: d x r', r' = k - r)

S-SAM is the special case r = k (no residual term). The layer never rebuilds
U M V^T: it adds a correction to the frozen base weight, written as a sum of
factored terms ``left @ core @ right`` (see :meth:`SpectralAdapter.correction_terms`):

* top-r term: ``U_r diag(ReLU(scale*s_r + shift) - s_r) V_r^T`` (zero at init);
* residual, clamp="diagonal": ``(U_res X)(Y V_res^T)`` (rank d, zero at init);
* residual, clamp="reference": ``U_res (ReLU(diag(s_res) + X Y) - diag(s_res)) V_res^T``,
  the authors' elementwise ReLU on the whole spectrum matrix (zero at init).

So the layer equals its base exactly at init, and the cost of the correction scales
with r (+ d) rather than with a dense k x k rebuild.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterLayer, add_low_rank

CLAMP_MODES = ("diagonal", "reference")


def resolve_rank(rank: int | float, k: int) -> int:
    """Number of singular values to adapt: an int, or a fraction of ``k`` in (0, 1].

    Fractions let one config fit layers of different widths; the result is rounded
    to the nearest integer and clamped to [0, k].
    """
    if isinstance(rank, bool) or not isinstance(rank, numbers.Real):
        raise TypeError(f"rank must be an int or a float fraction, got {rank!r}")
    if isinstance(rank, numbers.Integral):
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        return min(int(rank), k)
    if not 0.0 < rank <= 1.0:
        raise ValueError(f"a float rank is a fraction of k and must lie in (0, 1], got {rank}")
    return max(0, min(k, math.floor(rank * k + 0.5)))


def canonical_svd(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``weight`` (flattened to 2-D) that is reproducible across devices.

    U and V are recomputed from the base weights whenever an adapter is loaded, so
    the decomposition must not depend on where it runs: it is always done in float64
    on the CPU, and each singular pair gets a fixed sign (the largest-magnitude entry
    of every left singular vector is positive, the matching row of Vh flips along).
    Returns U (out x k), S (k,), Vh (k x in) in the weight's dtype and device.
    """
    matrix = weight.detach().reshape(weight.shape[0], -1).to(device="cpu", dtype=torch.float64)
    if matrix.shape[0] < matrix.shape[1]:
        # LAPACK is several times slower on wide matrices than on their transpose.
        v, s, uh = torch.linalg.svd(matrix.T, full_matrices=False)
        u, vh = uh.T, v.T
    else:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    pivot = u.abs().argmax(dim=0)
    signs = torch.sign(u.gather(0, pivot.unsqueeze(0)).squeeze(0))
    signs[signs == 0] = 1.0
    u = u * signs
    vh = vh * signs.unsqueeze(1)
    to = dict(device=weight.device, dtype=weight.dtype)
    return u.to(**to).contiguous(), s.to(**to).contiguous(), vh.to(**to).contiguous()


class SpectralAdapter(AdapterLayer):
    """Adapt the top-``rank`` singular values (scale/shift + ReLU) and, optionally,
    the residual spectrum with a rank-``lora_rank`` term X Y.

    Parameters: ``scale`` (r,) = 1, ``shift`` (r,) = 0, and when r < k and d > 0,
    ``residual_x`` (r' x d, Kaiming-uniform like a LoRA factor, so the zero-initialised
    ``residual_y`` gets useful gradients) and ``residual_y`` (d x r') = 0.
    Buffers ``U``, ``S``, ``Vh`` are derived from the base weight and not saved
    (call :meth:`recompute_svd` if the base weight is replaced).

    Linear forward, per call, takes the cheaper of two exact paths by a flop
    estimate (:meth:`uses_activation_path`):

    * activation path: ``base(x) + sum ((x @ right^T) core) @ left^T``, cheap for few
      tokens and small r (the sum and the addition are one GEMM);
    * weight path: ``F.linear(x, W + dW, b)`` with dW built once, cheap for many
      tokens (the dW build is amortised; training also pays one weight gradient).

    Conv2d always uses the weight path (the kernel is applied by ``F.conv2d``).
    Set ``force_path`` to "activation" or "weight" to pin a path (tests, benchmarks).
    """

    def __init__(self, base: nn.Module, rank: int | float, lora_rank: int, clamp: str = "diagonal") -> None:
        super().__init__(base)
        if clamp not in CLAMP_MODES:
            raise ValueError(f"clamp must be one of {CLAMP_MODES}, got {clamp!r}")
        if isinstance(lora_rank, bool) or not isinstance(lora_rank, numbers.Integral) or lora_rank < 0:
            raise ValueError(f"lora_rank must be an int >= 0, got {lora_rank!r}")
        self.clamp = clamp
        self.force_path: str | None = None
        weight = self.base.weight
        k = min(weight.shape[0], weight[0].numel())
        self.rank = resolve_rank(rank, k)
        residual = k - self.rank
        self.lora_rank = int(lora_rank) if residual > 0 else 0
        self.register_buffer("U", torch.empty(0), persistent=False)
        self.register_buffer("S", torch.empty(0), persistent=False)
        self.register_buffer("Vh", torch.empty(0), persistent=False)
        self.recompute_svd()
        factory = dict(device=weight.device, dtype=weight.dtype)
        self.scale = nn.Parameter(torch.ones(self.rank, **factory))
        self.shift = nn.Parameter(torch.zeros(self.rank, **factory))
        if self.lora_rank > 0:
            self.residual_x = nn.Parameter(torch.empty(residual, self.lora_rank, **factory))
            nn.init.kaiming_uniform_(self.residual_x, a=math.sqrt(5))
            self.residual_y = nn.Parameter(torch.zeros(self.lora_rank, residual, **factory))
        else:
            self.residual_x = None
            self.residual_y = None

    @torch.no_grad()
    def recompute_svd(self) -> None:
        """(Re)derive the frozen U, S, Vh from the current base weight."""
        self.U, self.S, self.Vh = canonical_svd(self.base.weight)

    @property
    def k(self) -> int:
        return self.S.numel()

    def correction_terms(self) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
        """Factored correction dW = sum(left @ core @ right) over the returned terms.

        ``core`` is None (identity), a vector (diagonal) or a square matrix.
        """
        r = self.rank
        terms = []
        if r > 0:
            s_top = self.S[:r]
            delta = F.relu(self.scale * s_top + self.shift) - s_top
            terms.append((self.U[:, :r], delta, self.Vh[:r]))
        if self.residual_x is not None:
            u_res, vh_res = self.U[:, r:], self.Vh[r:]
            if self.clamp == "diagonal":
                terms.append((u_res @ self.residual_x, None, self.residual_y @ vh_res))
            else:
                s_res = torch.diag(self.S[r:])
                core = F.relu(s_res + self.residual_x @ self.residual_y) - s_res
                terms.append((u_res, core, vh_res))
        return terms

    def delta_weight(self) -> torch.Tensor:
        out_features, fan_in = self.base_weight_2d().shape
        delta = None
        for left, core, right in self.correction_terms():
            if core is None:
                term = left @ right
            elif core.dim() == 1:
                term = (left * core) @ right
            elif out_features <= fan_in:
                term = (left @ core) @ right
            else:
                term = left @ (core @ right)
            delta = term if delta is None else delta + term
        if delta is None:
            return torch.zeros_like(self.base.weight)
        return delta.view_as(self.base.weight)

    def _activation_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x)`` plus every correction term through its factors, each term's GEMM accumulating into the
        output (:func:`add_low_rank`; the left factors are not stacked: at attention ranks U_r is as large as
        the weight, and copying it on every call cost more than it saved)."""
        out = self.base(x)
        for left, core, right in self.correction_terms():
            hidden = F.linear(x, right)
            if core is not None:
                hidden = hidden * core if core.dim() == 1 else F.linear(hidden, core)
            out = add_low_rank(out, hidden, left)
        return out

    def uses_activation_path(self, tokens: int) -> bool:
        """Flop estimate: is the activation path cheaper than the weight path here?

        Per correction term of width m: the activation path costs tokens * m * (in + out)
        (+ tokens * m^2 for a matrix core), the weight path out * m * in to build dW
        (+ m^2 * min(out, in)). When training, the activation path's backward costs
        about the same again (twice for the residual X Y term, whose factors train),
        and the weight path pays its build again plus the weight gradient of the whole
        linear (tokens * out * in).
        """
        if self.force_path is not None:
            return self.force_path == "activation"
        out_features, fan_in = self.base_weight_2d().shape
        training = torch.is_grad_enabled() and any(p.requires_grad for _, p in self.adapter_parameters())
        terms = []  # (width, matrix core, factors carry gradients)
        if self.rank:
            terms.append((self.rank, False, False))
        if self.residual_x is not None:
            if self.clamp == "reference":
                terms.append((self.k - self.rank, True, False))
            else:
                terms.append((self.lora_rank, False, True))
        activation = weight = 0
        for m, square, trained_factors in terms:
            act = tokens * m * (fan_in + out_features) + (tokens * m * m if square else 0)
            activation += act * ((3 if trained_factors else 2) if training else 1)
            weight += out_features * m * fan_in + (m * m * min(out_features, fan_in) if square else 0)
        # dW, W + dW and their gradients: a few memory-bound passes over out x in.
        passes = 8 if training else 4
        if training:
            weight = 2 * weight + tokens * out_features * fan_in
        return activation <= weight + passes * out_features * fan_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_conv:
            return self.apply_weight(x, self.base.weight + self.delta_weight())
        tokens = x.numel() // max(x.shape[-1], 1)
        if self.uses_activation_path(tokens):
            return self._activation_forward(x)
        return self.apply_weight(x, self.base.weight + self.delta_weight())

    def extra_repr(self) -> str:
        return f"k={self.k}, rank={self.rank}, lora_rank={self.lora_rank}, clamp={self.clamp!r}"
