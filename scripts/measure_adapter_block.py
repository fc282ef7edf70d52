"""Forward+backward time of one SAM ViT-B encoder block with SALT, LoRA and a dense SALT.

Why: SALT's forward must cost about what LoRA's does, not what a dense per-call
rebuild of U ReLU(M) V^T costs. Variants run in the same process with interleaved
repetitions; medians are printed as plain lines and one JSON line.

    .venv/bin/python scripts/measure_adapter_block.py [--grids 16 64] [--reps 9]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Block
from torch import nn

from SALTSegmentLib.adapters import SALTLinear, inject_adapters


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


def build_variants(seed: int = 0) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    base = Block(dim=768, num_heads=12, mlp_ratio=4.0, qkv_bias=True, use_rel_pos=False, window_size=0)
    salt = copy.deepcopy(base)
    layers = inject_adapters(salt, "salt", attention_rank=760, mlp_rank=50, lora_rank=4, trainable=("norm",))
    with torch.no_grad():
        for layer in layers.values():
            layer.residual_y.normal_(0.0, 1e-2)
    dense = copy.deepcopy(salt)
    for name in layers:
        parent, _, child = name.rpartition(".")
        module = dense.get_submodule(parent)
        setattr(module, child, DenseSALTLinear(getattr(module, child)))
    lora = copy.deepcopy(base)
    inject_adapters(lora, "lora", rank=4, trainable=("norm",))
    variants = {"salt": salt, "lora": lora, "dense_salt": dense}
    for path in ("activation", "weight"):
        pinned = copy.deepcopy(salt)
        for module in pinned.modules():
            if isinstance(module, SALTLinear):
                module.force_path = path
        variants[f"salt_{path}_path"] = pinned
    return variants


def step(block: nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    block(x).square().mean().backward()
    elapsed = time.perf_counter() - start
    block.zero_grad(set_to_none=True)
    return elapsed * 1000.0


def run(grid: int, batch: int, reps: int, warmup: int) -> dict:
    variants = build_variants()
    x = torch.randn(batch, grid, grid, 768, generator=torch.Generator().manual_seed(1))
    tokens = batch * grid * grid
    paths = {
        name: ("activation" if layer.uses_activation_path(tokens) else "weight")
        for name, layer in variants["salt"].named_modules()
        if isinstance(layer, SALTLinear)
    }
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(warmup + reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            elapsed = step(variants[name], x)
            if rep >= warmup:
                times[name].append(elapsed)
    medians = {name: statistics.median(values) for name, values in times.items()}
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
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", type=int, nargs="+", default=[16], help="token grid sides (16: 256 input)")
    parser.add_argument("--batch", type=int, default=2, help="batch for the 16x16 grid; larger grids use 1")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(2)
    for grid in args.grids:
        result = run(grid, args.batch if grid <= 16 else 1, args.reps, args.warmup)
        print(f"grid {grid}x{grid}, batch {result['batch']} ({result['tokens']} tokens), {result['threads']} threads, "
              f"{result['reps']} interleaved reps, forward+backward of one ViT-B block:")
        for name, value in result["median_ms"].items():
            print(f"  {name:22s} {value:9.2f} ms (median)")
        counts = {p: list(result["salt_paths_auto"].values()).count(p) for p in ("activation", "weight")}
        print(f"  SALT auto path choice: {counts}")
        print(f"  SALT/LoRA = {result['ratios']['salt/lora']:.3f}   dense/SALT = {result['ratios']['dense_salt/salt']:.3f}")
        print(json.dumps(result))


if __name__ == "__main__":
    main()
