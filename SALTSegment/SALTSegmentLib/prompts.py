"""Learned per-segment prompt tokens.

The paper prompts SAM with a CLIP text embedding through a small affine layer;
we have no text model, so each segment owns a few learned tokens that go into
the decoder as sparse prompt embeddings. They start as the prompt encoder's
embedding of the segment's typical box on the labelled slices: at step 0 a
token already means "the structure around here", which the frozen decoder
understands, so fine-tuning refines a good prompt instead of discovering one.
"""

from __future__ import annotations

import torch
from torch import nn

from .models import PromptableSegmenter

TOKENS_PER_SEGMENT = 2  # a box embeds as two corner tokens


class SegmentPrompts(nn.Module):
    """Trainable sparse prompt tokens, (segments, tokens, 256)."""

    def __init__(self, segment_count: int, embed_dim: int = 256, tokens_per_segment: int = TOKENS_PER_SEGMENT):
        super().__init__()
        self.tokens = nn.Parameter(torch.zeros(segment_count, tokens_per_segment, embed_dim))

    @property
    def segment_count(self) -> int:
        return self.tokens.shape[0]

    @torch.no_grad()
    def init_from_boxes(self, model: PromptableSegmenter, boxes_input: torch.Tensor) -> None:
        """Start each segment's tokens at the embedding of its box (K, 4) in the model input frame."""
        if self.tokens.shape[1] != 2:
            raise ValueError("Box initialisation needs two tokens per segment")
        self.tokens.copy_(model.embed_boxes(boxes_input.float()).to(self.tokens))

    def forward(self, segment_indices: torch.Tensor) -> torch.Tensor:
        return self.tokens[segment_indices]
