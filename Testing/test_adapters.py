"""Adapter layers: identity at init, literal-formula equivalence, paths, gradients,
merging, canonical SVD and configs. Small random layers only (CPU, seconds)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from SALTSegmentLib.adapters import (
    AdapterLayer,
    LoRAConfig,
    LoRAConv2d,
    LoRALinear,
    SALTConfig,
    SALTConv2d,
    SALTLinear,
    SSAMConfig,
    SSAMConv2d,
    SSAMLinear,
    canonical_svd,
    resolve_rank,
)


pytestmark = pytest.mark.usefixtures("one_thread")


CONVS = {
    "plain": dict(in_channels=4, out_channels=6, kernel_size=3),
    "stride_pad": dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1),
    "groups_dilation": dict(in_channels=4, out_channels=6, kernel_size=(3, 2), groups=2, dilation=2, padding=2),
}

LINEAR_FACTORIES = {
    "salt_diagonal": lambda base: SALTLinear(base, rank=0.5, lora_rank=3, clamp="diagonal"),
    "salt_reference": lambda base: SALTLinear(base, rank=5, lora_rank=3, clamp="reference"),
    "lora": lambda base: LoRALinear(base, rank=3, alpha=6.0),
    "ssam": lambda base: SSAMLinear(base),
}
CONV_FACTORIES = {
    "salt_diagonal": lambda base: SALTConv2d(base, rank=0.5, lora_rank=2, clamp="diagonal"),
    "salt_reference": lambda base: SALTConv2d(base, rank=3, lora_rank=2, clamp="reference"),
    "lora": lambda base: LoRAConv2d(base, rank=2),
    "ssam": lambda base: SSAMConv2d(base),
}


def make_linear(dtype: torch.dtype = torch.float32, out_features: int = 14, in_features: int = 10) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(in_features, out_features, dtype=dtype)


def make_conv(case: str, dtype: torch.dtype = torch.float32) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(**CONVS[case], dtype=dtype)


def conv_input(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(2, 4, 9, 8, dtype=dtype, generator=torch.Generator().manual_seed(1))


def reference_conv(layer: AdapterLayer, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    b = layer.base
    return F.conv2d(x, weight, b.bias, b.stride, b.padding, b.dilation, b.groups)


@torch.no_grad()
def randomize_(layer: AdapterLayer, seed: int = 3) -> None:
    """Random values in every trainable tensor, chosen so the ReLUs clip something."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(layer.base.weight.dtype)

    if isinstance(layer, (LoRALinear, LoRAConv2d)):
        layer.lora_a.copy_(rand(*layer.lora_a.shape))
        layer.lora_b.copy_(rand(*layer.lora_b.shape))
        return
    s_top = layer.S[: layer.rank]
    layer.scale.copy_(1.0 + 0.5 * rand(layer.rank))
    layer.shift.copy_(s_top.mean() * rand(layer.rank))
    layer.shift[::3] = -1.5 * layer.scale[::3].abs() * s_top[::3] - 0.01
    assert (layer.scale * s_top + layer.shift < 0).any(), "test setup: the top-r ReLU must clip something"
    if layer.residual_x is not None:
        layer.residual_x.copy_(0.7 * rand(*layer.residual_x.shape))
        layer.residual_y.copy_(0.7 * rand(*layer.residual_y.shape))


def literal_weight(layer: AdapterLayer) -> torch.Tensor:
    """The method's formula written densely from U, S, Vh (independent of the layer code)."""
    w = layer.base.weight
    if isinstance(layer, (LoRALinear, LoRAConv2d)):
        return w + (layer.alpha / layer.rank) * (layer.lora_b @ layer.lora_a).reshape(w.shape)
    U, S, Vh, r = layer.U, layer.S, layer.Vh, layer.rank
    top = torch.relu(layer.scale * S[:r] + layer.shift)
    if layer.residual_x is None:
        dense = U[:, :r] @ torch.diag(top) @ Vh[:r]
    elif layer.clamp == "diagonal":
        m_res = torch.diag(S[r:]) + layer.residual_x @ layer.residual_y
        dense = U[:, :r] @ torch.diag(top) @ Vh[:r] + U[:, r:] @ m_res @ Vh[r:]
    else:
        m = torch.block_diag(
            torch.diag(layer.scale * S[:r] + layer.shift),
            torch.diag(S[r:]) + layer.residual_x @ layer.residual_y,
        )
        assert (m < 0).any()
        dense = U @ torch.relu(m) @ Vh
    return dense.reshape(w.shape)


@pytest.mark.parametrize("rank,k,expected", [(760, 768, 760), (0.99, 768, 760), (0.065, 768, 50), (1.0, 128, 128),
                                             (0.99, 128, 127), (0.065, 128, 8), (900, 768, 768), (0, 9, 0)])
def test_resolve_rank(rank, k, expected):
    assert resolve_rank(rank, k) == expected


@pytest.mark.parametrize("bad", [-1, 0.0, 1.5, -0.2, True, "3"])
def test_resolve_rank_rejects(bad):
    with pytest.raises((ValueError, TypeError)):
        resolve_rank(bad, 10)


@pytest.mark.parametrize("method", sorted(LINEAR_FACTORIES))
def test_linear_equals_base_at_init(method):
    base = make_linear()
    layer = LINEAR_FACTORIES[method](base)
    assert layer.base is base and not any(p.requires_grad for p in base.parameters())
    x = torch.randn(3, 5, 10)
    expected = base(x)
    assert torch.equal(layer.effective_weight(), base.weight)
    if isinstance(layer, LoRALinear):
        assert torch.equal(layer(x), expected)
    else:
        for path in ("activation", "weight"):
            layer.force_path = path
            assert torch.equal(layer(x), expected), path


@pytest.mark.parametrize("case", sorted(CONVS))
@pytest.mark.parametrize("method", sorted(CONV_FACTORIES))
def test_conv_equals_base_at_init(method, case):
    base = make_conv(case)
    layer = CONV_FACTORIES[method](base)
    x = conv_input()
    assert torch.equal(layer.effective_weight(), base.weight)
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("method", sorted(LINEAR_FACTORIES))
def test_linear_matches_literal_formula(method):
    base = make_linear(torch.float64)
    layer = LINEAR_FACTORIES[method](base)
    randomize_(layer)
    weight = layer.effective_weight()
    torch.testing.assert_close(weight, literal_weight(layer), rtol=0, atol=1e-10)
    assert not torch.allclose(weight, base.weight, atol=1e-3)
    x = torch.randn(2, 7, 10, dtype=torch.float64)
    expected = x @ weight.T + base.bias
    if isinstance(layer, LoRALinear):
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-10)
        return
    outputs = {}
    for path in ("activation", "weight"):
        layer.force_path = path
        outputs[path] = layer(x)
        torch.testing.assert_close(outputs[path], expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(outputs["activation"], outputs["weight"], rtol=0, atol=1e-10)


@pytest.mark.parametrize("case", sorted(CONVS))
@pytest.mark.parametrize("method", sorted(CONV_FACTORIES))
def test_conv_matches_literal_formula(method, case):
    base = make_conv(case, torch.float64)
    layer = CONV_FACTORIES[method](base)
    randomize_(layer)
    weight = layer.effective_weight()
    assert weight.shape == base.weight.shape
    torch.testing.assert_close(weight, literal_weight(layer), rtol=0, atol=1e-10)
    x = conv_input(torch.float64)
    torch.testing.assert_close(layer(x), reference_conv(layer, x, weight), rtol=0, atol=1e-10)


def test_float32_paths_agree_and_selection_follows_token_count():
    base = make_linear(out_features=48, in_features=16)
    layer = SALTLinear(base, rank=8, lora_rank=2)
    randomize_(layer)
    assert layer.uses_activation_path(1)
    assert not layer.uses_activation_path(100_000)
    x = torch.randn(4, 30, 16)
    layer.force_path = "activation"
    a = layer(x)
    layer.force_path = "weight"
    w = layer(x)
    layer.force_path = None
    torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), x @ layer.effective_weight().T + base.bias, rtol=1e-5, atol=1e-5)


def _trainable(layer: AdapterLayer) -> dict[str, nn.Parameter]:
    return dict(layer.adapter_parameters())


@pytest.mark.parametrize("path", ["activation", "weight", "conv"])
@pytest.mark.parametrize("method", ["salt_diagonal", "salt_reference", "ssam", "lora"])
def test_gradients_reach_every_trainable_tensor(method, path):
    if path == "conv":
        layer = CONV_FACTORIES[method](make_conv("stride_pad"))
        x = conv_input()
    else:
        layer = LINEAR_FACTORIES[method](make_linear())
        if hasattr(layer, "force_path"):
            layer.force_path = path
        x = torch.randn(3, 6, 10)
    randomize_(layer)
    params = _trainable(layer)
    expected_names = {"lora": {"lora_a", "lora_b"}, "ssam": {"scale", "shift"}}.get(
        method, {"scale", "shift", "residual_x", "residual_y"}
    )
    assert set(params) == expected_names
    assert all(p.requires_grad for p in params.values())
    target = torch.randn_like(layer(x))
    (layer(x) * target).sum().backward()
    for name, param in params.items():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in layer.base.parameters())


def test_salt_parameters_shapes_and_init():
    layer = SALTLinear(make_linear(out_features=20, in_features=12), rank=0.75, lora_rank=4)
    assert (layer.rank, layer.k, layer.lora_rank) == (9, 12, 4)
    assert layer.U.shape == (20, 12) and layer.S.shape == (12,) and layer.Vh.shape == (12, 12)
    assert torch.equal(layer.scale, torch.ones(9)) and torch.equal(layer.shift, torch.zeros(9))
    assert layer.residual_x.shape == (3, 4) and layer.residual_x.abs().sum() > 0
    assert layer.residual_y.shape == (4, 3) and not layer.residual_y.any()
    assert set(dict(layer.named_buffers())) == {"U", "S", "Vh"}
    assert not any(k in layer.state_dict() for k in ("U", "S", "Vh")), "U/S/Vh are derived, never saved"
    full = SALTLinear(make_linear(), rank=1.0, lora_rank=4)
    assert full.residual_x is None and full.lora_rank == 0
    with pytest.raises(ValueError):
        SALTLinear(make_linear(), rank=3, lora_rank=2, clamp="elementwise")
    with pytest.raises(TypeError):
        SALTLinear(make_conv("plain"), rank=3, lora_rank=2)


@pytest.mark.parametrize("method", sorted(LINEAR_FACTORIES))
def test_merge_linear(method):
    layer = LINEAR_FACTORIES[method](make_linear())
    randomize_(layer)
    merged = layer.merge()
    assert type(merged) is nn.Linear
    assert merged.weight.dtype == layer.base.weight.dtype and merged.weight.device == layer.base.weight.device
    assert torch.equal(merged.bias, layer.base.bias)
    x = torch.randn(5, 10)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(merged(x), layer.base(x), atol=1e-3)


@pytest.mark.parametrize("method", sorted(CONV_FACTORIES))
def test_merge_conv(method):
    layer = CONV_FACTORIES[method](make_conv("groups_dilation"))
    randomize_(layer)
    merged = layer.merge()
    assert type(merged) is nn.Conv2d and merged.groups == 2 and merged.dilation == (2, 2)
    x = conv_input()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-5)


def test_canonical_svd_is_reproducible_and_sign_fixed():
    torch.manual_seed(5)
    w64 = torch.randn(24, 16, dtype=torch.float64)
    first, second = canonical_svd(w64), canonical_svd(w64.clone())
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    U, S, Vh = first
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, w64, rtol=0, atol=1e-12)
    pivots = U.abs().argmax(dim=0)
    assert (U[pivots, torch.arange(U.shape[1])] > 0).all()
    U32, S32, Vh32 = canonical_svd(w64.float())
    assert U32.dtype == torch.float32
    torch.testing.assert_close(U32.double(), U, rtol=0, atol=1e-5)
    torch.testing.assert_close(S32.double(), S, rtol=0, atol=1e-5)
    torch.testing.assert_close(Vh32.double(), Vh, rtol=0, atol=1e-5)
    wide = w64.T.contiguous()
    Uw, Sw, Vhw = canonical_svd(wide)
    assert Uw.shape == (16, 16) and Vhw.shape == (16, 24)
    torch.testing.assert_close(Uw @ torch.diag(Sw) @ Vhw, wide, rtol=0, atol=1e-12)


@pytest.mark.parametrize("clamp", ["diagonal", "reference"])
def test_same_adapter_gives_same_outputs_from_float32_and_float64_bases(clamp):
    base64 = make_linear(torch.float64)
    base32 = nn.Linear(10, 14)
    with torch.no_grad():
        base32.weight.copy_(base64.weight)
        base32.bias.copy_(base64.bias)
    layer64 = SALTLinear(base64, rank=6, lora_rank=3, clamp=clamp)
    layer32 = SALTLinear(base32, rank=6, lora_rank=3, clamp=clamp)
    randomize_(layer64)
    with torch.no_grad():
        for (name, p32), (_, p64) in zip(layer32.adapter_parameters(), layer64.adapter_parameters()):
            p32.copy_(p64)
    x = torch.randn(4, 10, dtype=torch.float64)
    torch.testing.assert_close(layer32(x.float()).double(), layer64(x), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(layer64(x), base64(x), atol=1e-2)


@pytest.mark.parametrize("cls", [SALTConfig, LoRAConfig, SSAMConfig])
def test_config_json_round_trip(cls):
    config = cls()
    restored = cls.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert isinstance(restored.trainable, tuple)
    with pytest.raises(TypeError, match="no field"):
        cls.from_dict({**config.to_dict(), "bogus": 1})


def test_salt_config_defaults_are_paper_ranks():
    config = SALTConfig()
    assert resolve_rank(config.attention_rank, 768) == 760
    assert resolve_rank(config.mlp_rank, 768) == 50
    assert config.lora_rank == 4 and config.clamp == "diagonal" and config.scope == "image_encoder"
    assert SALTConfig(attention_targets=["qkv"]).attention_targets == ("qkv",)
    with pytest.raises(ValueError):
        SALTConfig(clamp="other")
    with pytest.raises(ValueError):
        SALTConfig(mlp_rank=1.5)
