"""segment_anything ViT-B/L/H at 1024 (native), 512 or 256 px input.

Smaller inputs cost far less on a CPU. The absolute ``pos_embed`` and the
relative-position tables of the global-attention blocks are resized when the
1024-px checkpoint is loaded; windowed blocks keep their 14x14 tables.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .segmenter import PromptableSegmenter
from .weights import load_state_dict_strict, read_state_dict

PATCH_SIZE = 16
NATIVE_INPUT = 1024
SUPPORTED_INPUTS = (256, 512, 1024)

# (embed dim, depth, heads, global attention block indexes) per segment_anything variant.
VIT_SHAPES = {
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}


def build_sam_vit(model_id: str, variant: str, input_size: int = NATIVE_INPUT,
                  weights: Optional[str | os.PathLike] = None) -> PromptableSegmenter:
    """Build a segment_anything ViT at ``input_size``; load ``weights`` (a 1024-px checkpoint) if given."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer

    if input_size not in SUPPORTED_INPUTS:
        raise ValueError(f"Input size {input_size} is not supported; choose one of {SUPPORTED_INPUTS}")
    embed_dim, depth, heads, global_blocks = VIT_SHAPES[variant]
    grid = input_size // PATCH_SIZE
    encoder = ImageEncoderViT(
        depth=depth, embed_dim=embed_dim, img_size=input_size, mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=heads, patch_size=PATCH_SIZE,
        qkv_bias=True, use_rel_pos=True, global_attn_indexes=global_blocks, window_size=14, out_chans=256,
    )
    prompt_encoder = PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid),
                                   input_image_size=(input_size, input_size), mask_in_chans=16)
    decoder = MaskDecoder(num_multimask_outputs=3,
                          transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                          transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256)
    model = PromptableSegmenter(model_id, encoder, prompt_encoder, decoder, input_size=input_size,
                                imagenet_normalization=True)
    if weights is not None:
        state = read_state_dict(weights, model_id)
        state = {k: v for k, v in state.items() if k not in ("pixel_mean", "pixel_std")}
        state = resize_position_tables(state, grid, global_blocks)
        load_state_dict_strict(model, state, weights, model_id)
    return model


def resize_position_tables(state: dict[str, torch.Tensor], grid: int,
                           global_blocks: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Fit a 1024-px checkpoint's position tables to a ``grid`` x ``grid`` token grid."""
    state = dict(state)
    key = "image_encoder.pos_embed"
    if key in state and state[key].shape[1] != grid:
        table = state[key].permute(0, 3, 1, 2).float()
        resized = F.interpolate(table, size=(grid, grid), mode="bicubic", align_corners=False)
        state[key] = resized.permute(0, 2, 3, 1).to(state[key].dtype)
    for block in global_blocks:
        for axis in ("h", "w"):
            key = f"image_encoder.blocks.{block}.attn.rel_pos_{axis}"
            if key in state and state[key].shape[0] != 2 * grid - 1:
                table = state[key].float().t().unsqueeze(0)
                resized = F.interpolate(table, size=2 * grid - 1, mode="linear", align_corners=False)
                state[key] = resized[0].t().to(state[key].dtype)
    return state

