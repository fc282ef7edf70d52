"""Metrics on masks whose Dice and surface distances are known by construction."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis.extra.numpy import arrays

from SALTSegmentLib.metrics import (
    EvaluationReport,
    dice,
    evaluate_label_maps,
    format_table,
    hd95,
)
from SALTSegmentLib.volume_io import Segment


def cube(shape=(20, 20, 20), start=(2, 2, 2), size=10) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


def sphere(radius: float, shape=(36, 36, 36)) -> np.ndarray:
    z, y, x = np.indices(shape)
    centre = [(n - 1) / 2 for n in shape]
    return (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius ** 2


def test_dice_of_offset_cubes_is_exact():
    a = cube(start=(2, 2, 2))
    b = cube(start=(4, 2, 2))  # shifted 2 voxels along z: overlap 8 x 10 x 10
    assert dice(a, b) == pytest.approx(2 * 800 / 2000)


def test_dice_empty_cases():
    empty = np.zeros((4, 4, 4), dtype=bool)
    assert dice(empty, empty) == 1.0
    assert dice(empty, cube((4, 4, 4), (0, 0, 0), 2)) == 0.0


def test_dice_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        dice(np.zeros((3, 3, 3)), np.zeros((3, 3, 4)))


def test_hd95_concentric_spheres():
    assert hd95(sphere(12), sphere(10), (1.0, 1.0, 1.0)) == pytest.approx(2.0, abs=0.5)


def test_hd95_uses_anisotropic_spacing():
    box = np.zeros((10, 30, 30), dtype=bool)
    box[2:5, 5:25, 5:25] = True
    shifted = np.roll(box, 1, axis=0)
    assert hd95(box, shifted, (1.0, 1.0, 3.0)) == pytest.approx(3.0, abs=0.3)
    # The same shift along x (spacing 1 mm) is only 1 mm.
    assert hd95(box, np.roll(box, 1, axis=2), (1.0, 1.0, 3.0)) == pytest.approx(1.0, abs=0.2)


def test_hd95_identical_and_empty():
    a = sphere(6, (16, 16, 16))
    assert hd95(a, a, (0.7, 0.7, 2.5)) == 0.0
    empty = np.zeros_like(a)
    assert hd95(empty, empty, (1, 1, 1)) == 0.0
    assert math.isnan(hd95(a, empty, (1, 1, 1)))
    assert math.isnan(hd95(empty, a, (1, 1, 1)))


def test_evaluate_excluded_slice_holds_all_error():
    ref = np.zeros((6, 12, 12), dtype=np.uint8)
    ref[1:5, 3:9, 3:9] = 1
    ref[2:4, 4:6, 4:6] = 2
    pred = ref.copy()
    pred[3, 0:2, 0:2] = 1          # false positive only on slice 3
    pred[3, 4:6, 4:6] = 0          # missed label 2 on slice 3
    segments = [Segment(1, "liver"), Segment(2, "tumour")]

    full = evaluate_label_maps(pred, ref, segments, (1, 1, 2))
    assert full.segments[0].dice < 1.0 and full.segments[1].dice < 1.0
    worst = [s for s in full.slices if s.index == 3]
    assert worst and all(s.dice < 1.0 for s in worst)

    scored = evaluate_label_maps(pred, ref, segments, (1, 1, 2), axis="axial", exclude_slices={3})
    assert [s.dice for s in scored.segments] == [1.0, 1.0]
    assert [s.hd95_mm for s in scored.segments] == [0.0, 0.0]
    assert scored.mean_dice == 1.0
    assert all(s.index != 3 for s in scored.slices)
    assert scored.segments[1].ref_voxels == 4


def test_evaluate_along_other_axes_and_slice_rows():
    ref = np.zeros((4, 5, 6), dtype=np.uint8)
    ref[:, :, 2] = 1
    pred = np.zeros_like(ref)
    pred[:, :, 3] = 1
    report = evaluate_label_maps(pred, ref, [Segment(1, "wall")], (1, 1, 1), axis="sagittal")
    assert [(s.index, s.dice, s.ref_pixels, s.pred_pixels) for s in report.slices] == [
        (2, 0.0, 20, 0), (3, 0.0, 0, 20)]
    coronal = evaluate_label_maps(pred, ref, [Segment(1, "wall")], (1, 1, 1), axis="coronal",
                                  exclude_slices={0, 1, 2, 3, 4})
    assert coronal.segments[0].dice == 1.0 and coronal.slices == []


def test_evaluate_rejects_bad_input():
    a = np.zeros((3, 3, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="shape"):
        evaluate_label_maps(a, np.zeros((3, 3, 4), dtype=np.uint8), [Segment(1, "x")], (1, 1, 1))
    with pytest.raises(ValueError, match="axis"):
        evaluate_label_maps(a, a, [Segment(1, "x")], (1, 1, 1), axis="oblique")
    with pytest.raises(ValueError, match="outside"):
        evaluate_label_maps(a, a, [Segment(1, "x")], (1, 1, 1), exclude_slices={3})


def test_mean_hd95_skips_nan_and_table_lists_segments():
    ref = np.zeros((8, 8, 8), dtype=np.uint8)
    ref[2:6, 2:6, 2:6] = 1
    ref[0, 0, 0] = 2
    pred = ref.copy()
    pred[0, 0, 0] = 0  # segment 2 missed entirely -> HD95 undefined
    report = evaluate_label_maps(pred, ref, [Segment(1, "kidney"), Segment(2, "cyst")], (1, 1, 1))
    assert isinstance(report, EvaluationReport)
    assert math.isnan(report.segments[1].hd95_mm)
    assert report.mean_hd95_mm == 0.0
    assert report.mean_dice == pytest.approx(0.5)
    table = format_table(report)
    lines = table.splitlines()
    assert "kidney" in table and "cyst" in table and "n/a" in table
    assert lines[-1].startswith("Mean")
    assert len({len(line) for line in lines[:2]}) == 1  # header and rule align
    assert report.to_dict()["segments"][0]["name"] == "kidney"


masks = arrays(dtype=bool, shape=(3, 4, 5))


@settings(max_examples=60, deadline=None)
@given(masks, masks)
def test_dice_symmetric_and_bounded(a, b):
    value = dice(a, b)
    assert value == dice(b, a)
    assert 0.0 <= value <= 1.0
    if a.any():
        assert dice(a, a) == 1.0


def test_a_segment_missing_from_the_prediction_scores_zero_and_is_named():
    ref = np.zeros((6, 10, 10), np.uint8)
    ref[1:3, 2:5, 2:5] = 1
    ref[4:6, 6:9, 6:9] = 2
    segments = [Segment(1, "kept"), Segment(2, "absent")]
    report = evaluate_label_maps(ref.copy(), ref, segments, (1.0, 1.0, 1.0), missing={"absent"})
    scores = {s.name: s for s in report.segments}
    assert scores["kept"].dice == 1.0 and not scores["kept"].missing
    assert scores["absent"].dice == 0.0 and scores["absent"].missing and math.isnan(scores["absent"].hd95_mm)
    assert scores["absent"].ref_voxels == 18 and report.mean_dice == 0.5
    assert "missing" in format_table(report).splitlines()[3]
