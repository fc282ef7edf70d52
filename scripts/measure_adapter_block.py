"""Forward+backward time of one SAM ViT-B encoder block with SALT, LoRA and a dense SALT.

Why: SALT's forward must cost about what LoRA's does, not what a dense per-call
rebuild of U ReLU(M) V^T costs. And the low-rank terms go into the base output
through one GEMM (``adapters.base.add_low_rank``): the ``*_separate_sum``
variants are the forward as it was before, every term, its scaling and the
sums as separate ops. Variants run in the same process with interleaved
repetitions; medians are printed as plain lines and one JSON line.

    .venv/bin/python scripts/measure_adapter_block.py [--grids 16 64] [--reps 9]

``--lite-medsam`` times the real workload instead: LiteMedSAM's image encoder
(pretrained weights, 256 px, batch 2, the stages after the conv stage, as a
training step runs them) with SALT and with LoRA, each with the one-GEMM
forward and with separate sums.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Block
from torch import nn

from SALTSegmentLib.adapters import SALTLinear, apply_method, inject_adapters
from SALTSegmentLib.adapters.lora import LoRALinear


class DenseSALTLinear(nn.Module):
    """The naive SALT forward: rebuild W = U ReLU(M) Vh densely on every call
    (M = blockdiag(diag(scale*s_r + shift), diag(s_res) + X Y)); shares the tensors
    of an existing SALTLinear."""

    def __init__(self, salt: SALTLinear) -> None:
        super().__init__()
        self.salt = salt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, r = self.salt.S, self.salt.rank
        top = torch.diag(self.salt.scale * s[:r] + self.salt.shift)
        res = torch.diag(s[r:]) + self.salt.residual_x @ self.salt.residual_y
        weight = self.salt.U @ torch.relu(torch.block_diag(top, res)) @ self.salt.Vh
        return F.linear(x, weight, self.salt.base.bias)


class SeparateSumLinear(nn.Module):
    """The activation path as it was: each low-rank term computed, scaled and summed on its own (shares the
    tensors of an existing SALTLinear or LoRALinear)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if isinstance(layer, LoRALinear):
            return layer.base(x) + F.linear(F.linear(x, layer.lora_a), layer.lora_b) * layer.scaling
        total = None
        for left, core, right in layer.correction_terms():
            hidden = F.linear(x, right)
            if core is not None:
                hidden = hidden * core if core.dim() == 1 else F.linear(hidden, core)
            term = F.linear(hidden, left)
            total = term if total is None else total + term
        out = layer.base(x)
        return out if total is None else out + total


def _wrapped(block: nn.Module, kind: type, wrapper: type) -> nn.Module:
    """A copy of ``block`` with every ``kind`` layer wrapped in ``wrapper``."""
    block = copy.deepcopy(block)
    for name, module in list(block.named_modules()):
        if isinstance(module, kind):
            parent, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent), child, wrapper(module))
    return block


@torch.no_grad()
def _perturb_(model: nn.Module) -> None:
    """Give every adapter a non-zero correction (SALT's residual Y, LoRA's B start at zero)."""
    for layer in model.modules():
        for name in ("residual_y", "lora_b"):
            if getattr(layer, name, None) is not None:
                getattr(layer, name).normal_(0.0, 1e-2)


def build_variants(seed: int = 0) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    base = Block(dim=768, num_heads=12, mlp_ratio=4.0, qkv_bias=True, use_rel_pos=False, window_size=0)
    salt = copy.deepcopy(base)
    inject_adapters(salt, "salt", attention_rank=760, mlp_rank=50, lora_rank=4, trainable=("norm",))
    _perturb_(salt)
    lora = copy.deepcopy(base)
    inject_adapters(lora, "lora", rank=4, trainable=("norm",))
    _perturb_(lora)
    variants = {"salt": salt, "lora": lora, "dense_salt": _wrapped(salt, SALTLinear, DenseSALTLinear),
                "salt_activation_separate_sum": _wrapped(salt, SALTLinear, SeparateSumLinear),
                "lora_separate_sum": _wrapped(lora, LoRALinear, SeparateSumLinear)}
    for path in ("activation", "weight"):
        pinned = copy.deepcopy(salt)
        for module in pinned.modules():
            if isinstance(module, SALTLinear):
                module.force_path = path
        variants[f"salt_{path}_path"] = pinned
    return variants


def interleaved_medians(variants: dict[str, nn.Module], forward: Callable[[nn.Module], torch.Tensor],
                        reps: int, warmup: int) -> dict[str, float]:
    """Median milliseconds of ``forward(variant)`` + backward per variant, the order rotated every repetition."""
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(warmup + reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            model = variants[name]
            start = time.perf_counter()
            forward(model).square().mean().backward()
            elapsed = time.perf_counter() - start
            model.zero_grad(set_to_none=True)
            if rep >= warmup:
                times[name].append(elapsed * 1000.0)
    return {name: statistics.median(values) for name, values in times.items()}


def run(grid: int, batch: int, reps: int, warmup: int) -> dict:
    variants = build_variants()
    x = torch.randn(batch, grid, grid, 768, generator=torch.Generator().manual_seed(1))
    tokens = batch * grid * grid
    paths = {
        name: ("activation" if layer.uses_activation_path(tokens) else "weight")
        for name, layer in variants["salt"].named_modules()
        if isinstance(layer, SALTLinear)
    }
    medians = interleaved_medians(variants, lambda block: block(x), reps, warmup)
    return {
        "grid": grid,
        "batch": batch,
        "tokens": tokens,
        "threads": torch.get_num_threads(),
        "reps": reps,
        "salt_paths_auto": paths,
        "median_ms": {name: round(value, 2) for name, value in medians.items()},
        "ratios": {
            "salt/lora": round(medians["salt"] / medians["lora"], 3),
            "dense_salt/salt": round(medians["dense_salt"] / medians["salt"], 3),
            "salt_activation_path/separate_sum": round(medians["salt_activation_path"]
                                                       / medians["salt_activation_separate_sum"], 3),
            "lora/separate_sum": round(medians["lora"] / medians["lora_separate_sum"], 3),
        },
    }


def run_lite_medsam(reps: int, warmup: int) -> dict:
    """Forward+backward of LiteMedSAM's encoder past its conv stage, one GEMM against separate sums."""
    from SALTSegmentLib.models import load_model

    variants: dict[str, nn.Module] = {}
    for method, kind in (("salt", SALTLinear), ("lora", LoRALinear)):
        torch.manual_seed(0)
        model = load_model("lite_medsam")
        apply_method(model, method)
        _perturb_(model)
        variants[method] = model
        variants[f"{method}_separate_sum"] = _wrapped(model, kind, SeparateSumLinear)
    images = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    depth = variants["salt"].frozen_prefix_depth()
    with torch.no_grad():
        features = variants["salt"].encode_prefix(images, (256, 256), depth)
    medians = interleaved_medians(variants, lambda model: model.encode_rest(features, depth), reps, warmup)
    return {"reps": reps, "threads": torch.get_num_threads(),
            "median_ms": {name: round(value, 1) for name, value in medians.items()},
            "ratios": {f"{method}/separate_sum": round(medians[method] / medians[f"{method}_separate_sum"], 3)
                       for method in ("salt", "lora")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", type=int, nargs="+", default=[16], help="token grid sides (16: 256 input)")
    parser.add_argument("--batch", type=int, default=2, help="batch for the 16x16 grid; larger grids use 1")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--lite-medsam", action="store_true",
                        help="LiteMedSAM's encoder (SALT and LoRA, one GEMM against separate sums) instead")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.lite_medsam:
        result = run_lite_medsam(args.reps, args.warmup)
        print(f"LiteMedSAM encoder past the conv stage, batch 2 at 256 px, forward+backward, {result['threads']} "
              f"threads, {result['reps']} interleaved reps:")
        for name, value in result["median_ms"].items():
            print(f"  {name:22s} {value:9.1f} ms (median)")
        print("  one GEMM / separate sums: " + ", ".join(f"{k.split('/')[0]} {v:.3f}"
                                                        for k, v in result["ratios"].items()))
        print(json.dumps(result))
        return
    for grid in args.grids:
        result = run(grid, args.batch if grid <= 16 else 1, args.reps, args.warmup)
        print(f"grid {grid}x{grid}, batch {result['batch']} ({result['tokens']} tokens), {result['threads']} threads, "
              f"{result['reps']} interleaved reps, forward+backward of one ViT-B block:")
        for name, value in result["median_ms"].items():
            print(f"  {name:22s} {value:9.2f} ms (median)")
        counts = {p: list(result["salt_paths_auto"].values()).count(p) for p in ("activation", "weight")}
        print(f"  SALT auto path choice: {counts}")
        ratios = result["ratios"]
        print(f"  SALT/LoRA = {ratios['salt/lora']:.3f}   dense/SALT = {ratios['dense_salt/salt']:.3f}   "
              f"one GEMM / separate sums: SALT activation path {ratios['salt_activation_path/separate_sum']:.3f}, "
              f"LoRA {ratios['lora/separate_sum']:.3f}")
        print(json.dumps(result))


if __name__ == "__main__":
    main()
