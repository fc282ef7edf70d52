"""How long a structure was drawn in an adapter's training cases, and how far that lets one drawn slice reach."""

from __future__ import annotations

import math

import numpy as np
import pytest

from SALTSegmentLib.host.adapter_metadata import _case_problems, case_record
from SALTSegmentLib.structure_length import (DrawnLength, drawn_lengths, lengths_from_records, lengths_to_record,
                                             reach_per_radius)
from SALTSegmentLib.volume_io import Segment

SEGMENTS = [Segment(1, "Long"), Segment(2, "Once")]


def _labels() -> np.ndarray:
    """(z, y, x) on 2 mm slices of 0.5 mm pixels: "Long" a 10 x 10 px square on slices 4-20, "Once" on slice 12 only."""
    labels = np.zeros((30, 40, 40), np.uint16)
    labels[4:21, 5:15, 5:15] = 1
    labels[12, 25:30, 25:30] = 2
    return labels


def test_drawn_lengths_measure_the_span_gap_and_widest_section_in_millimetres():
    lengths = drawn_lengths(_labels(), SEGMENTS, "k", [6, 12, 18], (0.5, 0.5, 2.0))
    assert set(lengths) == {"Long"}                  # drawn on one slice only: nothing to learn its length from
    long = lengths["Long"]
    assert long.span_mm == pytest.approx(24.0)       # slices 6 -> 18, 2 mm apart
    assert long.gap_mm == pytest.approx(12.0)
    assert long.radius_mm == pytest.approx(math.sqrt(100 * 0.25 / math.pi))


def test_a_structure_drawn_on_neighbouring_slices_records_no_length():
    """Three neighbouring slices are where the user drew, not how long the structure is (it runs 4-20)."""
    assert drawn_lengths(_labels(), SEGMENTS, "k", [11, 12, 13], (0.5, 0.5, 2.0)) == {}
    assert set(drawn_lengths(_labels(), SEGMENTS, "k", [10, 12, 14], (0.5, 0.5, 2.0))) == {"Long"}


def test_reach_per_radius_is_the_median_half_length_over_cases_in_radii():
    one = {"Long": DrawnLength(24.0, 12.0, 3.0)}      # half-length 12 + 0.5 x 12 = 18 mm -> 6 radii
    two = {"Long": DrawnLength(12.0, 6.0, 3.0)}       # 6 + 3 = 9 mm -> 3 radii
    three = {"Long": DrawnLength(30.0, 10.0, 5.0)}    # 15 + 5 = 20 mm -> 4 radii
    assert reach_per_radius([one, two, three], spacing_bound=0.5) == {"Long": pytest.approx(4.0)}
    assert reach_per_radius([], spacing_bound=0.5) == {}


def test_a_record_of_the_drawing_being_propagated_is_left_out():
    """An adapter trained on this very drawing records its length; that says nothing the drawing does not."""
    drawing = drawn_lengths(_labels(), SEGMENTS, "k", [6, 12, 18], (0.5, 0.5, 2.0))
    recorded = lengths_from_records([{"lengths": lengths_to_record(drawing)}])     # rounded as a file keeps it
    other = {"Long": DrawnLength(40.0, 10.0, 3.0)}                                   # another patient
    assert reach_per_radius(recorded, spacing_bound=0.5, drawing=drawing) == {}
    assert reach_per_radius(recorded + [other], spacing_bound=0.5, drawing=drawing) \
        == {"Long": pytest.approx(25 / 3)}
    alone = reach_per_radius(recorded, spacing_bound=0.5)
    assert alone == {"Long": pytest.approx(18 / drawing["Long"].radius_mm, rel=1e-3)}


def test_lengths_travel_in_the_case_records_and_are_checked():
    lengths = drawn_lengths(_labels(), SEGMENTS, "k", [6, 12, 18], (0.5, 0.5, 2.0))
    record = case_record("a.nrrd", "0" * 64, [6, 12, 18], ["Long", "Once"], lengths=lengths_to_record(lengths))
    assert _case_problems([record]) == []
    back = lengths_from_records([record, {"name": "old.nrrd"}])   # a case recorded before lengths existed
    assert back[0]["Long"].span_mm == pytest.approx(24.0) and back[1] == {}
    record["lengths"]["Long"]["gap_mm"] = -1
    assert any("Long" in problem for problem in _case_problems([record]))
