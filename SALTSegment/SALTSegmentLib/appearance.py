"""Does a predicted region look like the structure the user drew? Evidence from the encoder's own features.

A box walk always finds *something* in its box: past the end of a structure
the decoder segments the neighbouring tissue with the same confidence. The
image embedding tells them apart better. For each segment we average the
(adapted) encoder's normalised features inside its drawn masks (the
structure's prototype) and in a thin ring around them (its surroundings, what
a walk drifts into). A region's score is the fraction of its pixels closer to
the prototype than to the surroundings; the drawn slices themselves calibrate
it (``reference``), so a threshold is relative to how this structure scores
where the user drew it, not an absolute constant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from scipy import ndimage

RING_WIDTH = 4   # embedding cells (16 input pixels at 256 px) around a drawn mask


def _normalised(embedding: torch.Tensor) -> torch.Tensor:
    """(C, h, w) -> unit-length feature per cell, float32."""
    embedding = embedding.float()
    return embedding / embedding.norm(dim=0, keepdim=True).clamp_min(1e-6)


@dataclass
class SegmentAppearance:
    """One segment's prototype and surroundings in feature space, with its score on the drawn slices."""

    prototype: torch.Tensor      # (C,)
    surroundings: torch.Tensor   # (C,)
    reference: float             # median score of the drawn masks

    def score(self, embedding: torch.Tensor, mask: np.ndarray) -> Optional[float]:
        """Fraction of the cells of ``mask`` (h, w, embedding grid) closer to the prototype; None if empty."""
        if not mask.any():
            return None
        features = _normalised(embedding)[:, torch.from_numpy(mask)]
        closer = self.prototype @ features > self.surroundings @ features
        return float(closer.float().mean())


def build_appearance(embeddings: list[torch.Tensor], masks: list[np.ndarray]) -> Optional[SegmentAppearance]:
    """Prototype and surroundings from drawn masks (on the embedding grid) and their slices' embeddings."""
    inside, around = [], []
    for embedding, mask in zip(embeddings, masks):
        if not mask.any():
            continue
        ring = ndimage.binary_dilation(mask, iterations=RING_WIDTH) & ~mask
        features = _normalised(embedding)
        inside.append(features[:, torch.from_numpy(mask)].mean(1))
        if ring.any():
            around.append(features[:, torch.from_numpy(ring)].mean(1))
    if not inside or not around:
        return None
    prototype = torch.stack(inside).mean(0)
    surroundings = torch.stack(around).mean(0)
    appearance = SegmentAppearance(prototype / prototype.norm(), surroundings / surroundings.norm(), 1.0)
    scores = [appearance.score(e, m) for e, m in zip(embeddings, masks) if m.any()]
    appearance.reference = float(np.median(scores))
    return appearance
