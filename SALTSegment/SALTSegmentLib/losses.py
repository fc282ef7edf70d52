"""Segmentation loss for few-shot fine-tuning: Dice + BCE, one term per (slice, segment) pair.

Averaging per pair (not per pixel over the batch) keeps a small structure's
Dice as loud as a large one's, and a segment absent from a labelled slice
(a true negative) contributes only its BCE term, which punishes any false
positive without a Dice that is undefined on an empty target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dice_bce_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Mean over pairs of BCE + (1 - soft Dice if the target is non-empty).

    ``logits`` and ``targets``: (N, H, W); returns a scalar.
    """
    logits = logits.float()
    targets = targets.float()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").flatten(1).mean(1)
    probabilities = torch.sigmoid(logits).flatten(1)
    flat_targets = targets.flatten(1)
    intersection = (probabilities * flat_targets).sum(1)
    dice = (2 * intersection + smooth) / (probabilities.sum(1) + flat_targets.sum(1) + smooth)
    present = (flat_targets.sum(1) > 0).float()
    return (bce + present * (1.0 - dice)).mean()
