"""One promptable-segmentation interface over every SAM-family model we ship.

LiteMedSAM and the segment_anything ViTs share the prompt encoder and mask
decoder design but differ in input convention (LiteMedSAM: [0, 1] RGB;
SAM: 0-255 RGB normalised with ImageNet mean/std, padding applied after the
normalisation). :class:`PromptableSegmenter` hides that difference so the
predictor, training and propagation never ask which model they run.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


class PromptableSegmenter(nn.Module):
    """Image encoder + prompt encoder + mask decoder with the model's input convention."""

    def __init__(self, model_id: str, image_encoder: nn.Module, prompt_encoder: nn.Module,
                 mask_decoder: nn.Module, input_size: int, imagenet_normalization: bool) -> None:
        super().__init__()
        self.model_id = model_id
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.input_size = int(input_size)
        self.imagenet_normalization = imagenet_normalization
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.weights_sha256: Optional[str] = None

    @property
    def embedding_size(self) -> tuple[int, int]:
        return tuple(self.prompt_encoder.image_embedding_size)

    def normalize(self, images: torch.Tensor, valid_hw: tuple[int, int]) -> torch.Tensor:
        """Map padded [0, 1] images (B, 3, S, S) to the encoder's input.

        ``valid_hw`` is the unpadded (height, width); the padding is zero in
        the model's own input space, as ``Sam.preprocess`` does.
        """
        if not self.imagenet_normalization:
            return images
        normalized = (images * 255.0 - self.pixel_mean) / self.pixel_std
        height, width = valid_hw
        keep = torch.zeros_like(normalized[:1, :1])
        keep[..., :height, :width] = 1.0
        return normalized * keep

    def encode(self, images: torch.Tensor, valid_hw: tuple[int, int]) -> torch.Tensor:
        """Image embeddings (B, 256, h, w) of padded [0, 1] images (B, 3, S, S)."""
        return self.image_encoder(self.normalize(images, valid_hw))

    def frozen_prefix_depth(self) -> int:
        """How many leading TinyViT stages (after the patch embedding) have nothing to train.

        Their output depends only on the input image, so training computes it
        once per augmented slice instead of at every step. Zero for encoders
        without stages (the ViTs) or when the first stage trains.
        """
        layers = getattr(self.image_encoder, "layers", None)
        patch_embed = getattr(self.image_encoder, "patch_embed", None)
        if layers is None or patch_embed is None or any(p.requires_grad for p in patch_embed.parameters()):
            return 0
        depth = 0
        for layer in layers[:-1]:
            if any(p.requires_grad for p in layer.parameters()):
                break
            depth += 1
        return depth

    def encode_prefix(self, images: torch.Tensor, valid_hw: tuple[int, int], depth: int) -> torch.Tensor:
        """Input-only features: the patch embedding and the first ``depth`` stages (``depth`` > 0)."""
        features = self.image_encoder.patch_embed(self.normalize(images, valid_hw))
        for layer in self.image_encoder.layers[:depth]:
            features = layer(features)
        return features

    def encode_rest(self, features: torch.Tensor, depth: int, recompute: bool = False) -> torch.Tensor:
        """Finish :meth:`encode_prefix`: the remaining stages and the neck, as TinyViT's forward does.

        ``recompute`` (training only) keeps just each block's input for the
        backward pass and runs the block again there: the same gradients, a
        third less peak memory for the demo's training (3.81 -> 2.62 GB) for
        13% more training time, since the attention maps of every block at
        once are what make a CPU training step's peak.
        """
        for layer in self.image_encoder.layers[depth:]:
            features = _recomputed(layer, features) if recompute and torch.is_grad_enabled() else layer(features)
        height, width = self.embedding_size
        features = features.view(features.shape[0], height, width, -1).permute(0, 3, 1, 2)
        return self.image_encoder.neck(features)

    def embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """Sparse embeddings (N, 2, 256) of boxes (N, 4) given as x0, y0, x1, y1 in the input frame."""
        sparse, _ = self.prompt_encoder(points=None, boxes=boxes.reshape(-1, 4), masks=None)
        return sparse

    def embed_points(self, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sparse embeddings of point prompts (N, P, 2) with labels (N, P) (1 = inside, 0 = outside)."""
        sparse, _ = self.prompt_encoder(points=(points, labels), boxes=None, masks=None)
        return sparse

    def decode(self, embedding: torch.Tensor, sparse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks for N prompts on ONE image.

        ``embedding`` is (1, 256, h, w), ``sparse`` (N, T, 256). Returns
        low-resolution logits (N, 1, 4h, 4w) and predicted IoU (N, 1), with
        ``multimask_output=False`` as the fine-tuned prompts expect.
        """
        count = sparse.shape[0]
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
            count, -1, *self.embedding_size)
        return self.mask_decoder(
            image_embeddings=embedding,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )


def _recomputed(layer: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """A TinyViT stage with each block under activation checkpointing (non-reentrant: frozen inputs are fine)."""
    from torch.utils.checkpoint import checkpoint

    blocks = getattr(layer, "blocks", None)
    if blocks is None:
        return checkpoint(layer, features, use_reentrant=False)
    for block in blocks:
        features = checkpoint(block, features, use_reentrant=False)
    return layer.downsample(features) if getattr(layer, "downsample", None) is not None else features
