"""The end decision of box propagation and the appearance evidence it uses (no model needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from SALTSegmentLib.appearance import build_appearance
from SALTSegmentLib.box_mode import box_margin_pixels, closed_shape, compose_label_map, soft_mask
from SALTSegmentLib.extent import (END_APPEARANCE, END_EDGE, END_EMPTY, END_LENGTH, END_SHRANK, END_SIZE, END_SPACING,
                                   END_TAPER, ExtentRule, SegmentEnd, SegmentExtent, WalkStep, decide_end,
                                   drawn_densely, equivalent_radius_slices, halfway_limit, label_spacing,
                                   spacing_limit)

RULE = ExtentRule(spacing_bound=1.0, radius_bound=1.0, min_similarity=0.6, min_area_ratio=0.1, taper_bound=None)


def _walk(start, step, areas, similarities=None):
    similarities = similarities or [1.0] * len(areas)
    return [WalkStep(start + step * (d + 1), area, similarity)
            for d, (area, similarity) in enumerate(zip(areas, similarities))]


def test_the_walk_ends_where_the_evidence_says_and_says_why():
    assert decide_end(RULE, 20, _walk(20, 1, [90, 80, 0]), 100, END_EDGE) == SegmentEnd(22, END_EMPTY, 2)
    assert decide_end(RULE, 20, _walk(20, -1, [90, 5]), 100, END_EDGE) == SegmentEnd(19, END_SHRANK, 1)
    assert decide_end(RULE, 20, _walk(20, 1, [90, 80, 70], [0.9, 0.4, 1.0]), 100, END_EDGE) \
        == SegmentEnd(21, END_APPEARANCE, 1)
    # Nothing says stop: the walk ends where it had to, for the reason given.
    assert decide_end(RULE, 20, _walk(20, 1, [90, 80]), 100, END_SPACING) == SegmentEnd(22, END_SPACING, 2)
    assert decide_end(RULE, 20, [], 100, END_EDGE) == SegmentEnd(20, END_EDGE, 0)


def test_unknown_similarity_does_not_stop_a_walk():
    assert decide_end(RULE, 5, _walk(5, 1, [50, 50], [None, None]), 60, END_EDGE).slice == 7


def test_label_spacing_is_the_widest_gap_between_drawn_slices():
    assert label_spacing([10, 12, 20, 21]) == 8
    assert label_spacing([7]) is None


def test_spacing_limit_uses_the_gap_or_a_single_slice_radius():
    assert spacing_limit(RULE, {10: 100, 15: 100, 20: 100}, 20, 1.0, 1.0) == (5, END_SPACING)
    assert spacing_limit(ExtentRule(spacing_bound=0.5), {10: 100, 16: 100}, 16, 1.0, 1.0) == (3, END_SPACING)
    # One drawn slice: a round lesion of area 314 mm^2 (radius 10 mm) on 5 mm slices reaches 2 slices.
    assert equivalent_radius_slices(314, 1.0, 5.0) == pytest.approx(2.0, abs=0.01)
    assert spacing_limit(RULE, {33: 314}, 33, 1.0, 5.0) == (2, END_SIZE)
    assert spacing_limit(RULE, {33: 1}, 33, 1.0, 5.0) == (1, END_SIZE)          # never less than one slice


def test_slices_drawn_only_next_to_each_other_are_bounded_by_the_radius_not_by_a_gap_of_one():
    # Three neighbouring slices through the middle of a round lesion (1 mm slices): their gap of one slice says
    # nothing of its length; the outermost region's radius does (250 mm^2: 8.9 mm, x 0.75 = 6.7 slices).
    areas = {20: 250, 21: 314, 22: 250}
    assert spacing_limit(ExtentRule(), areas, 22, 1.0, 1.0) == (7, END_SIZE)
    assert spacing_limit(ExtentRule(), areas, 20, 1.0, 1.0) == (7, END_SIZE)
    # Every other slice of a region 11.3 slices in radius is still dense (the gap is under a fifth of it)...
    assert spacing_limit(ExtentRule(), {20: 400, 22: 400}, 22, 1.0, 1.0) == (8, END_SIZE)
    # ...of a region 4 slices in radius, or with the rule off, it is a spacing: the gap bounds it.
    assert spacing_limit(ExtentRule(), {20: 50, 22: 50}, 22, 1.0, 1.0) == (2, END_SPACING)
    assert spacing_limit(ExtentRule(dense_gap=None), {20: 400, 22: 400}, 22, 1.0, 1.0) == (2, END_SPACING)
    assert drawn_densely(ExtentRule(dense_gap=None), 1.0, 0.5)          # next to each other: always dense


def test_a_drawn_area_that_shrinks_towards_the_end_caps_the_reach_where_set():
    tapering = ExtentRule(spacing_bound=1.0, taper_bound=1.0)
    # 400 -> 100 pixels over 10 slices: at that rate nothing is left 3.3 slices past the last drawn slice.
    assert spacing_limit(tapering, {10: 400, 20: 100}, 20, 1.0, 1.0) == (3, END_TAPER)
    assert spacing_limit(tapering, {10: 400, 20: 100}, 10, 1.0, 1.0) == (10, END_SPACING)   # growing that way
    assert spacing_limit(tapering, {10: 400, 20: 390}, 20, 1.0, 1.0) == (10, END_SPACING)   # barely shrinking
    assert spacing_limit(RULE, {10: 400, 20: 100}, 20, 1.0, 1.0) == (10, END_SPACING)        # not set
    # The default takes half that distance: drawn small near the end, the end is near.
    assert spacing_limit(ExtentRule(), {10: 400, 20: 100}, 20, 1.0, 1.0) == (2, END_TAPER)
    assert spacing_limit(ExtentRule(), {10: 400, 20: 100}, 10, 1.0, 1.0) == (10, END_SPACING)


def test_the_training_cases_length_of_a_structure_bounds_the_walks():
    # The training cases drew it four radii long each way: one slice of radius 2 slices reaches 8.
    assert spacing_limit(RULE, {33: 314}, 33, 1.0, 5.0, known_reach_per_radius=4.0) == (8, END_LENGTH)
    # Two close slices (gap 2) of a structure of widest radius 2 slices: 16 slices long, 14 past the drawn ones.
    assert spacing_limit(RULE, {30: 314, 32: 314}, 32, 1.0, 5.0, known_reach_per_radius=4.0) == (7, END_LENGTH)
    # Drawn slices that already span the known length: the structure ends at them (a walk still takes one slice).
    assert spacing_limit(RULE, {20: 314, 40: 314}, 40, 1.0, 5.0, known_reach_per_radius=4.0) == (1, END_LENGTH)
    assert spacing_limit(RULE, {30: 314, 32: 314}, 32, 1.0, 5.0, known_reach_per_radius=0.1) == (1, END_LENGTH)


def test_a_known_length_replaces_the_drawings_guess_and_is_shared_by_the_radius_drawn_at_each_end():
    # Drawn on slices 10 and 30 (the drawing alone would reach 20 past each); known 8 radii of 2 slices each way:
    # 32 slices long, 12 of them beyond the drawn ones.
    assert spacing_limit(RULE, {10: 314, 30: 314}, 30, 1.0, 5.0, known_reach_per_radius=8.0) == (6, END_LENGTH)
    # Drawn a quarter as wide at one end (half the radius) as at the other: a third of the 12 there, two thirds
    # at the wide end (pixels of pi/4 mm^2: the widest, 400 pixels, is a disc of radius 10 mm, 2 slices).
    areas = {10: 100, 30: 400}
    assert spacing_limit(RULE, areas, 10, np.pi / 4, 5.0, known_reach_per_radius=8.0) == (4, END_LENGTH)
    assert spacing_limit(RULE, areas, 30, np.pi / 4, 5.0, known_reach_per_radius=8.0) == (8, END_LENGTH)


def test_the_shape_closes_just_past_each_end_even_at_the_edge_of_the_volume():
    z, y, x = np.mgrid[:20, :30, :30]
    ball = (z - 6) ** 2 + (y - 15) ** 2 + (x - 15) ** 2 < 10 ** 2
    drawn = np.zeros_like(ball)
    drawn[[3, 8]] = ball[[3, 8]]
    extent = SegmentExtent("x", SegmentEnd(0, END_EDGE, 3), SegmentEnd(12, END_SPACING, 4))
    shape = closed_shape(drawn, "k", [3, 8], extent)
    occupied = np.flatnonzero(shape.any(axis=(1, 2)))
    assert occupied[0] == 0 and occupied[-1] == 12
    assert np.array_equal(shape[[3, 8]], ball[[3, 8]])
    assert shape[0].sum() < shape[3].sum() and shape[12].sum() < shape[8].sum()   # closing towards the ends
    assert extent.to_dict()["first_reason"] == END_EDGE
    assert "slices 0-12" in extent.describe()


def test_box_margin_scales_with_the_structure():
    small = np.zeros((512, 512), bool)
    small[100:104, 100:104] = True
    large = np.zeros((512, 512), bool)
    large[100:300, 100:200] = True
    assert box_margin_pixels(small, 0.1) == 1.0                     # at least one pixel
    assert box_margin_pixels(large, 0.1) == pytest.approx(20.0)    # a tenth of the larger side


def test_soft_mask_is_a_half_on_the_boundary():
    mask = np.zeros((9, 9), bool)
    mask[2:7, 2:7] = True
    soft = soft_mask(mask)
    assert soft[4, 4] > 0.9 and soft[0, 0] < 0.1
    assert np.array_equal(soft > 0.5, mask)
    assert not soft_mask(np.zeros((3, 3), bool)).any()


def test_overlapping_masks_go_to_the_segment_they_are_deepest_in():
    a = np.zeros((3, 20, 20), bool)
    b = np.zeros((3, 20, 20), bool)
    a[:, 2:12, 2:12] = True
    b[:, 9:19, 9:19] = True
    labels = compose_label_map([a, None, b], [1, 2, 3], a.shape)
    assert set(np.unique(labels)) == {0, 1, 3}
    assert labels[1, 5, 5] == 1 and labels[1, 15, 15] == 3
    assert np.array_equal(labels > 0, a | b)


def test_appearance_scores_the_drawn_structure_above_its_surroundings():
    generator = torch.Generator().manual_seed(0)
    inside, outside = torch.randn(32, generator=generator), torch.randn(32, generator=generator)
    mask = np.zeros((16, 16), bool)
    mask[5:11, 5:11] = True
    embedding = torch.where(torch.from_numpy(mask)[None], inside[:, None, None], outside[:, None, None])
    embedding = embedding + 0.1 * torch.randn(32, 16, 16, generator=generator)
    appearance = build_appearance([embedding], [mask])
    assert appearance.reference > 0.9
    shifted = np.zeros_like(mask)
    shifted[0:4, 0:4] = True             # a region of the surroundings
    assert appearance.score(embedding, shifted) < 0.1
    assert appearance.score(embedding, np.zeros_like(mask)) is None
    assert build_appearance([embedding], [np.zeros_like(mask)]) is None


def test_a_walk_towards_a_slice_drawn_without_the_segment_goes_half_way():
    # Drawn on slice 10, drawn without it on slice 18: the end is slice 10 or one of the 7 between, the middle
    # of those 8 places is 3.5 slices out.
    assert halfway_limit(RULE, 7) == 4
    assert halfway_limit(RULE, 2) == 1 and halfway_limit(RULE, 1) == 1      # never less than one slice
    assert halfway_limit(RULE, 0) is None                                    # nothing between: nowhere to go
    assert halfway_limit(ExtentRule(halfway_bound=None), 7) is None          # off: up to that slice
