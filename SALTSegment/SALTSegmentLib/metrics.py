"""Segmentation metrics: Dice and 95th-percentile Hausdorff distance, per segment and per slice.

Arrays are (z, y, x) as SimpleITK returns them; spacing is (x, y, z) in mm
like ``sitk.Image.GetSpacing()``. Surface distances use SimpleITK's Maurer
distance transform so anisotropic voxels are measured in millimetres.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Collection, Optional, Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .label_layers import segment_mask, spatial_shape
from .slices import array_axis
from .volume_io import Segment


# Face (6-)connectivity: a voxel is on the surface when a face neighbour is background.
_FACE_NEIGHBOURS = ndimage.generate_binary_structure(3, 1)


def _binary(mask: np.ndarray) -> np.ndarray:
    return np.asarray(mask).astype(bool, copy=False)


def _require_same_shape(pred: np.ndarray, ref: np.ndarray) -> None:
    if np.shape(pred) != np.shape(ref):
        raise ValueError(f"Prediction shape {np.shape(pred)} differs from reference shape {np.shape(ref)}; "
                         "both must lie on the same voxel grid")


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice overlap of two binary masks; two empty masks agree perfectly (1.0)."""
    _require_same_shape(pred, ref)
    p, r = _binary(pred), _binary(ref)
    total = int(p.sum()) + int(r.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, r).sum()) / total


def _surface(mask: np.ndarray) -> np.ndarray:
    """Mask voxels with a background face neighbour (voxels at the array border count as surface)."""
    return mask & ~ndimage.binary_erosion(mask, structure=_FACE_NEIGHBOURS, border_value=0)


def _distance_to(surface: np.ndarray, spacing_zyx: tuple[float, float, float]) -> np.ndarray:
    """Distance in mm from every voxel to the nearest voxel of ``surface``."""
    image = sitk.GetImageFromArray(surface.astype(np.uint8))
    image.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    distance = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False,
                                            useImageSpacing=True)
    # Surface voxels enclosed by other surface voxels come out negative: they are on the surface too.
    return np.maximum(sitk.GetArrayFromImage(distance), 0.0)


def _check_spacing(spacing_xyz: Sequence[float]) -> tuple[float, float, float]:
    spacing = tuple(float(s) for s in spacing_xyz)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"Spacing must be three positive numbers (x, y, z) in mm, got {tuple(spacing_xyz)}")
    return spacing


def hd95(pred: np.ndarray, ref: np.ndarray, spacing_xyz: Sequence[float]) -> float:
    """95th percentile of the pooled symmetric surface distances, in mm.

    Returns 0.0 when both masks are empty and NaN when exactly one is (the
    distance is undefined, not large). Work is cropped to the bounding box of
    both masks, which leaves every surface-to-surface distance unchanged.
    """
    _require_same_shape(pred, ref)
    spacing = _check_spacing(spacing_xyz)
    p, r = _binary(pred), _binary(ref)
    if p.ndim != 3:
        raise ValueError(f"HD95 needs 3D (z, y, x) masks, got {p.ndim}D")
    p_any, r_any = bool(p.any()), bool(r.any())
    if not p_any and not r_any:
        return 0.0
    if p_any != r_any:
        return float("nan")
    union = p | r
    box = tuple(slice(int(idx.min()), int(idx.max()) + 1) for idx in np.nonzero(union))
    p, r = p[box], r[box]
    p_surface, r_surface = _surface(p), _surface(r)
    spacing_zyx = spacing[::-1]
    distances = np.concatenate([
        _distance_to(r_surface, spacing_zyx)[p_surface],
        _distance_to(p_surface, spacing_zyx)[r_surface],
    ])
    return float(np.percentile(distances, 95))


@dataclass
class SegmentScore:
    """3D scores of one segment."""

    label: int
    name: str
    dice: float
    hd95_mm: float
    ref_voxels: int
    pred_voxels: int
    missing: bool = False   # the prediction has no segment of this name: scored Dice 0, never re-paired


@dataclass
class SliceScore:
    """Dice of one segment on one slice, to spot where propagation drifts."""

    segment: str
    axis: str
    index: int
    dice: float
    ref_pixels: int
    pred_pixels: int


@dataclass
class EvaluationReport:
    """Per-segment and per-slice scores with their means over segments."""

    segments: list[SegmentScore]
    slices: list[SliceScore]
    mean_dice: float
    mean_hd95_mm: float

    def to_dict(self) -> dict:
        """Plain nested dict (NaN kept as float; writers decide how to encode it)."""
        return {
            "segments": [asdict(s) for s in self.segments],
            "slices": [asdict(s) for s in self.slices],
            "mean_dice": float(self.mean_dice),
            "mean_hd95_mm": float(self.mean_hd95_mm),
        }


def _nan_mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def evaluate_label_maps(pred: np.ndarray, ref: np.ndarray, segments: list[Segment],
                        spacing_xyz: Sequence[float], axis: str = "axial",
                        exclude_slices: Optional[set[int]] = None,
                        missing: Collection[str] = ()) -> EvaluationReport:
    """Score a predicted label map against a reference, segment by segment.

    ``exclude_slices`` (indices along ``axis``) are left out of every score,
    including the per-slice rows, so slices the user labelled by hand do not
    inflate the accuracy of the propagated ones. Segments named in
    ``missing`` are absent from the prediction: Dice 0 and no HD95, whatever
    the reference holds, so a missing segment never looks perfect. Either
    map may hold layers (overlapping segments); each segment is scored on
    its own voxels.
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.ndim not in (3, 4) or ref.ndim not in (3, 4):
        raise ValueError(f"Label maps must be 3D (z, y, x) or layered (layers, z, y, x), got {pred.ndim}D")
    shape = spatial_shape(pred)
    if shape != spatial_shape(ref):
        raise ValueError(f"Prediction shape {shape} differs from reference shape {spatial_shape(ref)}; "
                         "both must lie on the same voxel grid")
    spacing = _check_spacing(spacing_xyz)
    dim = array_axis(axis)
    kept = np.ones(shape[dim], dtype=bool)
    if exclude_slices:
        bad = [i for i in exclude_slices if not 0 <= int(i) < shape[dim]]
        if bad:
            raise ValueError(f"Excluded slice indices {sorted(bad)} are outside 0..{shape[dim] - 1} "
                             f"along the {axis} axis")
        kept[[int(i) for i in exclude_slices]] = False
    keep_shape = [1, 1, 1]
    keep_shape[dim] = -1
    keep = kept.reshape(keep_shape)
    other_axes = tuple(a for a in range(3) if a != dim)

    segment_scores, slice_scores = [], []
    for segment in segments:
        r = segment_mask(ref, segment) & keep
        if segment.name in missing:
            segment_scores.append(SegmentScore(label=int(segment.label), name=segment.name, dice=0.0,
                                               hd95_mm=float("nan"), ref_voxels=int(r.sum()), pred_voxels=0,
                                               missing=True))
            continue
        p = segment_mask(pred, segment) & keep
        segment_scores.append(SegmentScore(
            label=int(segment.label), name=segment.name, dice=dice(p, r), hd95_mm=hd95(p, r, spacing),
            ref_voxels=int(r.sum()), pred_voxels=int(p.sum())))
        p_counts = p.sum(axis=other_axes)
        r_counts = r.sum(axis=other_axes)
        overlap = (p & r).sum(axis=other_axes)
        for index in np.nonzero((p_counts + r_counts) > 0)[0]:
            slice_scores.append(SliceScore(
                segment=segment.name, axis=axis, index=int(index),
                dice=2.0 * int(overlap[index]) / (int(p_counts[index]) + int(r_counts[index])),
                ref_pixels=int(r_counts[index]), pred_pixels=int(p_counts[index])))
    mean_dice = float(np.mean([s.dice for s in segment_scores])) if segment_scores else float("nan")
    return EvaluationReport(segments=segment_scores, slices=slice_scores, mean_dice=mean_dice,
                            mean_hd95_mm=_nan_mean([s.hd95_mm for s in segment_scores]))


def _number(value: float, digits: int) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def format_table(report: EvaluationReport) -> str:
    """Aligned plain-text table of the segment scores and their mean, for a terminal."""
    header = ("Segment", "Dice", "HD95 mm", "Ref voxels", "Pred voxels")
    rows = [(s.name, _number(s.dice, 4), _number(s.hd95_mm, 2), str(s.ref_voxels),
             "missing" if s.missing else str(s.pred_voxels)) for s in report.segments]
    rows.append(("Mean", _number(report.mean_dice, 4), _number(report.mean_hd95_mm, 2), "", ""))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])]
        return "  ".join([first, *rest]).rstrip()

    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    return "\n".join([line(header), rule, *[line(row) for row in rows[:-1]], rule, line(rows[-1])])
