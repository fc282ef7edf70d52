"""Promptable prediction on one slice: embed once, then answer box, point or token prompts.

Like ``segment_anything.SamPredictor``, the predictor owns preprocessing and
the image-embedding cache; coordinates are slice pixel indices in and logits
on the slice grid out (see :mod:`preprocessing` for the exact mapping).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from . import preprocessing as pp
from .devices import autocast
from .models import PromptableSegmenter


class SlicePredictor:
    """Segment one 2D slice with box, point or learned-token prompts."""

    def __init__(self, model: PromptableSegmenter, autocast_dtype: Optional[torch.dtype] = None) -> None:
        self.model = model
        self.autocast_dtype = autocast_dtype
        self.slice_geometry: Optional[pp.SliceGeometry] = None
        self.embedding: Optional[torch.Tensor] = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _autocast(self):
        return autocast(self.device, self.autocast_dtype)

    @torch.inference_mode()
    def set_slice(self, slice01: np.ndarray, pixel_spacing: tuple[float, float] = (1.0, 1.0)) -> None:
        """Embed a slice already mapped to [0, 1] (see ``IntensityMapping``); min-max scaled here."""
        self.slice_geometry = pp.slice_geometry_for(slice01.shape, pixel_spacing, self.model.input_size)
        image = pp.slice_to_input(pp.rescale_slice(slice01), self.slice_geometry)[None].to(self.device)
        with self._autocast():
            self.embedding = self.model.encode(image, self.slice_geometry.resized_shape).float()

    def _require_slice(self) -> None:
        if self.embedding is None:
            raise RuntimeError("Call set_slice() before predicting")

    @torch.inference_mode()
    def decode(self, sparse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (N, rows, cols) on the slice grid and predicted IoU (N,) for N sparse prompts."""
        self._require_slice()
        with self._autocast():
            logits, iou = self.model.decode(self.embedding, sparse.to(self.device))
        return pp.logits_to_slice(logits.float(), self.slice_geometry), iou.float()[:, 0]

    @torch.inference_mode()
    def predict_boxes(self, boxes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Boxes (N, 4) as x0, y0, x1, y1 slice pixel indices."""
        self._require_slice()
        boxes_input = torch.as_tensor(self.slice_geometry.boxes_to_input(boxes), dtype=torch.float32,
                                      device=self.device)
        return self.decode(self.model.embed_boxes(boxes_input))

    @torch.inference_mode()
    def predict_points(self, points: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Points (N, P, 2) as (x, y) slice pixel indices with labels (N, P): 1 inside, 0 outside."""
        self._require_slice()
        points_input = torch.as_tensor(self.slice_geometry.points_to_input(points), dtype=torch.float32,
                                       device=self.device)
        labels = torch.as_tensor(labels, dtype=torch.int64, device=self.device)
        return self.decode(self.model.embed_points(points_input, labels))

    @torch.inference_mode()
    def predict_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Learned prompt tokens (K, T, 256), one row per segment."""
        return self.decode(tokens)
