"""Pairing segments of two label maps: by name where both carry names, by value otherwise, never re-paired."""

from __future__ import annotations

import numpy as np
import pytest

from SALTSegmentLib.segment_matching import carries_names, match_segments
from SALTSegmentLib.volume_io import Segment

ADAPTER = [Segment(1, "Thalamus_L"), Segment(2, "Thalamus_R")]


def test_names_decide_even_when_values_are_swapped():
    drawn = [Segment(2, "Thalamus_L"), Segment(1, "Thalamus_R"), Segment(7, "Lesion")]
    match = match_segments(drawn, ADAPTER)
    assert match.by == "name"
    labels = np.array([0, 1, 2, 7], np.uint16)
    np.testing.assert_array_equal(match.relabel(labels), [0, 2, 1, 0])
    assert [s.name for s in match.unmatched_source] == ["Lesion"] and match.missing_target == []


def test_a_missing_name_is_missing_and_the_rest_keep_their_pairs():
    match = match_segments([Segment(1, "Thalamus_R")], ADAPTER)
    assert [(s.name, t.name) for s, t in match.pairs] == [("Thalamus_R", "Thalamus_R")]
    assert [s.name for s in match.missing_target] == ["Thalamus_L"]
    np.testing.assert_array_equal(match.relabel(np.array([1, 2], np.uint16)), [2, 0])


@pytest.mark.parametrize("names", [["Segment_1", "Segment_2"], ["Segment_1", "Segment_5"]])
def test_label_maps_without_names_pair_by_value(names):
    drawn = [Segment(1, names[0]), Segment(5, names[1])]
    assert not carries_names(drawn)
    match = match_segments(drawn, ADAPTER)
    assert match.by == "value" and match.describe() == "1 -> Thalamus_L"
    assert [s.label for s in match.unmatched_source] == [5] and [s.name for s in match.missing_target] == ["Thalamus_R"]


def test_forced_rules():
    drawn = [Segment(1, "Liver")]
    assert match_segments(drawn, ADAPTER, "name").pairs == []
    assert match_segments(drawn, ADAPTER, "value").pairs == [(drawn[0], ADAPTER[0])]
    with pytest.raises(ValueError, match="Unknown segment matching 'colour'"):
        match_segments(drawn, ADAPTER, "colour")
