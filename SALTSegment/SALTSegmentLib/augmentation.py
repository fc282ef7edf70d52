"""Augmentation for a handful of labelled slices: small affine and intensity jitter.

No flips by default: left and right are different structures. The same
affine moves the image and its masks; masks are resampled bilinearly and
re-thresholded so thin structures are not eroded by nearest-neighbour jumps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .preprocessing import binarize_keeping_small


@dataclass(frozen=True)
class AugmentationConfig:
    rotation_degrees: float = 10.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    translation_fraction: float = 0.04
    gamma_range: tuple[float, float] = (0.8, 1.25)
    contrast_range: tuple[float, float] = (0.85, 1.15)
    brightness: float = 0.05
    horizontal_flip: bool = False


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def augment(image: torch.Tensor, masks: torch.Tensor, config: AugmentationConfig,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Jitter one sample: image (3, S, S) in [0, 1] and masks (K, S, S) in {0, 1}."""
    angle = math.radians(_uniform(generator, -config.rotation_degrees, config.rotation_degrees))
    scale = _uniform(generator, *config.scale_range)
    shift_x = _uniform(generator, -config.translation_fraction, config.translation_fraction) * 2
    shift_y = _uniform(generator, -config.translation_fraction, config.translation_fraction) * 2
    flip = -1.0 if config.horizontal_flip and float(torch.rand((), generator=generator)) < 0.5 else 1.0
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    theta = torch.tensor([[cos * flip, -sin, shift_x], [sin * flip, cos, shift_y]], dtype=image.dtype)[None]
    grid = F.affine_grid(theta, (1, 1, *image.shape[-2:]), align_corners=False)
    warped_image = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    coverage = F.grid_sample(masks[None].float(), grid, mode="bilinear", padding_mode="zeros",
                             align_corners=False)[0]
    # A tiny structure must not vanish in a copy: it would teach "absent here" where it is present.
    warped_masks = torch.stack([binarize_keeping_small(channel) for channel in coverage])

    gamma = _uniform(generator, *config.gamma_range)
    contrast = _uniform(generator, *config.contrast_range)
    brightness = _uniform(generator, -config.brightness, config.brightness)
    jittered = warped_image.clamp(0, 1) ** gamma
    jittered = ((jittered - 0.5) * contrast + 0.5 + brightness).clamp_(0, 1)
    return jittered, warped_masks.float()
