"""From a CT/MR volume to model inputs, and from model outputs back to the slice grid.

Three steps, each exact and tested on its own:

1. Slicing: a (z, y, x) volume is cut along one voxel axis (k, j, i; see
   :mod:`slices` for axis names and planes); a slice keeps its in-plane
   pixel spacing.
2. Intensity: CT through a window (presets or level/width), MR through robust
   percentiles of the whole volume; the mapping is stored with the adapter so
   training and propagation see the same contrast. Each slice is then min-max
   scaled to [0, 1], as LiteMedSAM was trained.
3. Slice geometry: the long *physical* side is resized to the model input (so
   anisotropic pixels become square), zero-padded bottom/right. Resizing uses
   edge-aligned sampling (``align_corners=False``) both ways, so a mask mapped
   to the input and back lands on the same pixels (no half-voxel shift).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .slices import ARRAY_AXES, array_axis, occupied_slices  # noqa: F401 - occupied_slices: one definition, there

# Engine axis keys -> array axis (k, j, i and, as before adapter format 2, axial/coronal/sagittal for k/j/i).
SLICE_AXES = ARRAY_AXES

# (level, width) in Hounsfield units.
CT_WINDOWS = {
    "soft_tissue": (40.0, 400.0),
    "abdomen": (50.0, 350.0),
    "liver": (60.0, 160.0),
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}


# --------------------------------------------------------------------------- slicing

def take_slice(volume: np.ndarray, axis: str, index: int) -> np.ndarray:
    """The 2D slice ``index`` of a (z, y, x) volume along ``axis`` (layers of a (layers, z, y, x) map stay in front)."""
    return np.take(volume, index, axis=array_axis(axis) - 3)


def put_slice(volume: np.ndarray, axis: str, index: int, values: np.ndarray) -> None:
    """Write a 2D slice back into a (z, y, x) volume in place."""
    selector = [slice(None)] * 3
    selector[array_axis(axis)] = index
    volume[tuple(selector)] = values


def slice_count(shape: tuple[int, ...], axis: str) -> int:
    """Slices along ``axis`` of a (z, y, x) or (layers, z, y, x) shape."""
    return int(shape[array_axis(axis) - 3])


def slice_spacing(spacing_xyz: tuple[float, float, float], axis: str) -> float:
    """Distance between neighbouring slices along ``axis``, from the volume spacing given as (x, y, z)."""
    return float(spacing_xyz[2 - array_axis(axis)])


def slice_pixel_spacing(spacing_xyz: tuple[float, float, float], axis: str) -> tuple[float, float]:
    """(row, column) spacing of a slice, from the volume spacing given as (x, y, z)."""
    sx, sy, sz = spacing_xyz
    return ((sy, sx), (sz, sx), (sz, sy))[array_axis(axis)]


# --------------------------------------------------------------------------- intensity

@dataclass(frozen=True)
class IntensityMapping:
    """How raw voxel values become [0, 1]: a fixed CT window or volume percentiles (MR)."""

    kind: str = "percentile"          # "window" or "percentile"
    level: Optional[float] = None
    width: Optional[float] = None
    preset: Optional[str] = None
    low_percentile: float = 0.5
    high_percentile: float = 99.5

    def value_range(self, volume: np.ndarray) -> tuple[float, float]:
        """The raw values mapped to 0 and 1 for this volume."""
        if self.kind == "window":
            return self.level - self.width / 2.0, self.level + self.width / 2.0
        finite = volume[np.isfinite(volume)]
        if finite.size == 0:
            raise ValueError("The image holds no finite intensity values")
        sample = finite if finite.size <= 2_000_000 else finite[:: finite.size // 2_000_000 + 1]
        # float64: interpolating between extreme float32 values must not overflow.
        low, high = np.percentile(sample.astype(np.float64), [self.low_percentile, self.high_percentile])
        if high <= low:
            low, high = float(finite.min()), float(finite.max())
        return float(low), float(high)

    def apply(self, volume: np.ndarray) -> np.ndarray:
        """Map a whole volume to float32 in [0, 1] (NaN and -Inf become 0, +Inf 1)."""
        with np.errstate(over="ignore"):  # float64 values beyond float32 become +-inf, then 1 or 0
            values = np.asarray(volume, dtype=np.float32)
        low, high = self.value_range(values)
        span = high - low
        # A range too narrow for float32 to resolve (or empty) maps like a constant image: to 0.
        limits = np.finfo(np.float32)
        resolvable = span > 4 * float(limits.eps) * max(abs(low), abs(high)) and 1.0 / span < float(limits.max)
        scale = np.float32(1.0 / span) if resolvable else np.float32(0.0)
        mapped = np.nan_to_num(values, nan=low, posinf=high, neginf=low)  # a copy, modified in place below
        np.clip(mapped, low, high, out=mapped)
        mapped -= np.float32(low)  # in [0, span]: no inf - inf, no 0 * inf
        mapped *= scale
        return np.clip(mapped, 0.0, 1.0, out=mapped)

    def describe(self) -> str:
        if self.kind == "window":
            name = f"{self.preset} " if self.preset else ""
            return f"CT window {name}(level {self.level:g}, width {self.width:g})"
        return f"percentiles {self.low_percentile:g}-{self.high_percentile:g}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "IntensityMapping":
        return cls(**{k: values[k] for k in cls.__dataclass_fields__ if k in values})


def looks_like_ct(volume: np.ndarray) -> bool:
    """CT in Hounsfield units has air near -1000; MR never goes far below zero."""
    finite = volume[np.isfinite(volume)]
    return finite.size > 0 and float(np.percentile(finite, 1)) < -500.0


def parse_intensity(spec: str, volume: Optional[np.ndarray] = None) -> IntensityMapping:
    """``auto`` | ``mr`` | ``ct`` | a CT preset name | ``LEVEL,WIDTH`` -> mapping.

    ``auto`` picks the soft-tissue window for CT-like volumes and percentiles
    otherwise (it needs the volume).
    """
    spec = spec.strip().lower()
    if spec == "auto":
        if volume is None:
            raise ValueError("'auto' intensity needs the volume")
        spec = "ct" if looks_like_ct(volume) else "mr"
    if spec in ("mr", "percentile"):
        return IntensityMapping()
    if spec == "ct":
        spec = "soft_tissue"
    if spec in CT_WINDOWS:
        level, width = CT_WINDOWS[spec]
        return IntensityMapping(kind="window", level=level, width=width, preset=spec)
    parts = spec.split(",")
    if len(parts) == 2:
        try:
            level, width = float(parts[0]), float(parts[1])
        except ValueError:
            pass
        else:
            if width <= 0:
                raise ValueError("A CT window needs a positive width")
            return IntensityMapping(kind="window", level=level, width=width)
    raise ValueError(f"Unknown intensity setting '{spec}'; use auto, mr, ct, LEVEL,WIDTH or one of "
                     + ", ".join(CT_WINDOWS))


def rescale_slice(slice01: np.ndarray) -> np.ndarray:
    """Min-max scale one slice to [0, 1]; a constant slice stays as it is."""
    low, high = float(slice01.min()), float(slice01.max())
    if high - low < 1e-6:
        return slice01.astype(np.float32)
    return ((slice01 - low) / (high - low)).astype(np.float32)


# --------------------------------------------------------------------------- slice geometry (slice grid -> model input)

@dataclass(frozen=True)
class SliceGeometry:
    """How one slice grid (rows, cols) with pixel spacing maps into the square model input."""

    rows: int
    cols: int
    row_spacing: float
    col_spacing: float
    input_size: int

    @property
    def resized_shape(self) -> tuple[int, int]:
        """(rows, cols) in the model input: long physical side = input size, aspect kept."""
        height_mm, width_mm = self.rows * self.row_spacing, self.cols * self.col_spacing
        longest = max(height_mm, width_mm)
        rows = max(1, int(round(self.input_size * height_mm / longest)))
        cols = max(1, int(round(self.input_size * width_mm / longest)))
        return min(rows, self.input_size), min(cols, self.input_size)

    @property
    def scale(self) -> tuple[float, float]:
        """Input pixels per slice pixel along (rows, cols)."""
        rows, cols = self.resized_shape
        return rows / self.rows, cols / self.cols

    def boxes_to_input(self, boxes: np.ndarray) -> np.ndarray:
        """Boxes (N, 4) x0, y0, x1, y1 in slice pixel indices -> the input frame.

        Pixel centres map exactly: index i sits at (i + 0.5) * scale - 0.5,
        which is the index convention the prompt encoder expects.
        """
        row_scale, col_scale = self.scale
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        scales = np.array([col_scale, row_scale, col_scale, row_scale])
        return (boxes + 0.5) * scales - 0.5

    def points_to_input(self, points: np.ndarray) -> np.ndarray:
        """Points (..., 2) as (x, y) slice pixel indices -> the input frame."""
        row_scale, col_scale = self.scale
        points = np.asarray(points, dtype=np.float64)
        return (points + 0.5) * np.array([col_scale, row_scale]) - 0.5


def slice_geometry_for(shape: tuple[int, int], spacing: tuple[float, float], input_size: int) -> SliceGeometry:
    """The :class:`SliceGeometry` of a (rows, cols) slice with (row, col) pixel spacing, for a model input size."""
    return SliceGeometry(int(shape[0]), int(shape[1]), float(spacing[0]), float(spacing[1]), int(input_size))


def slice_to_input(slice01: np.ndarray, slice_geometry: SliceGeometry) -> torch.Tensor:
    """A [0, 1] slice -> (3, S, S) float tensor: resized, zero-padded bottom/right, three channels."""
    rows, cols = slice_geometry.resized_shape
    image = torch.from_numpy(np.ascontiguousarray(slice01, dtype=np.float32))[None, None]
    downsampling = rows < slice_geometry.rows or cols < slice_geometry.cols
    image = F.interpolate(image, size=(rows, cols), mode="bilinear", align_corners=False, antialias=downsampling)
    image = image.clamp_(0.0, 1.0)
    padded = torch.zeros(1, 1, slice_geometry.input_size, slice_geometry.input_size)
    padded[..., :rows, :cols] = image
    return padded[0].expand(3, -1, -1).contiguous()


def mask_to_input(mask: np.ndarray, slice_geometry: SliceGeometry, output_size: Optional[int] = None) -> torch.Tensor:
    """A binary slice mask -> (S', S') float target in the (padded) input frame.

    ``output_size`` is the resolution of the logits the loss compares with
    (the decoder's low-resolution output); it defaults to the input size.
    """
    output_size = output_size or slice_geometry.input_size
    factor = output_size / slice_geometry.input_size
    rows, cols = slice_geometry.resized_shape
    rows, cols = max(1, int(round(rows * factor))), max(1, int(round(cols * factor)))
    target = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    target = F.interpolate(target, size=(rows, cols), mode="bilinear", align_corners=False,
                           antialias=rows < slice_geometry.rows or cols < slice_geometry.cols)
    padded = torch.zeros(output_size, output_size)
    padded[:rows, :cols] = binarize_keeping_small(target[0, 0]).float()
    return padded


def binarize_keeping_small(coverage: torch.Tensor) -> torch.Tensor:
    """Pixels at least half covered; a structure smaller than half a pixel keeps its most covered pixel(s).

    A radiologist's mark of a few voxels must survive resizing to the model's
    grid: a segment that vanished there could neither train nor be prompted.
    """
    kept = coverage >= 0.5
    peak = coverage.max()
    if peak > 0 and not kept.any():
        kept = coverage >= peak
    return kept


def logits_to_slice(logits: torch.Tensor, slice_geometry: SliceGeometry) -> torch.Tensor:
    """Decoder logits (N, 1, L, L) over the padded input -> (N, rows, cols) logits on the slice grid."""
    size = slice_geometry.input_size
    rows, cols = slice_geometry.resized_shape
    logits = logits.float()
    if logits.shape[-1] != size:
        logits = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)
    logits = logits[..., :rows, :cols]
    logits = F.interpolate(logits, size=(slice_geometry.rows, slice_geometry.cols), mode="bilinear",
                           align_corners=False)
    return logits[:, 0]


def mask_box(mask: np.ndarray, margin: float = 0.0) -> Optional[np.ndarray]:
    """Tight box x0, y0, x1, y1 (pixel indices) around a 2D mask, grown by ``margin`` pixels; None if empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    height, width = mask.shape
    return np.array([
        max(0.0, cols[0] - margin), max(0.0, rows[0] - margin),
        min(width - 1.0, cols[-1] + margin), min(height - 1.0, rows[-1] + margin),
    ])
