"""The quality benchmark's bookkeeping: which slices are scored, the labelling protocols, merged runs.

The runs themselves (training and propagation on the development set) are
too slow for the suite; these are the parts whose mistakes would silently
change the published numbers.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from SALTSegmentLib.bench.cases import NEAR_END_INSET, BenchCase, consecutive_slices, slices_inside
from SALTSegmentLib.bench.quality import (QualityResults, QualityRun, evidence_table, merge_results,
                                          quality_table, true_ends_shape_dice, unlabelled_dice,
                                          write_quality_outputs)
from SALTSegmentLib.interpolation import fill_between_slices
from SALTSegmentLib.volume_io import Segment, VolumeGeometry


def _case() -> BenchCase:
    reference = np.zeros((20, 16, 16), np.uint8)
    reference[4:15, 4:10, 4:10] = 1          # a block on slices 4..14
    reference[8:12, 11:14, 11:14] = 2        # a small one on slices 8..11
    geometry = VolumeGeometry((1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    return BenchCase("toy", np.zeros(reference.shape, np.float32), geometry, reference,
                     [Segment(1, "block"), Segment(2, "small")], "k", "anatomy", "MR")


def _run(case: str, method: str, dice: float) -> QualityRun:
    return QualityRun(case, "per_structure", 3, [5, 9, 13], method, 0, {"block": dice, "small": dice - 0.1},
                      {"block": 0.6, "small": 0.4}, 3, 4, [], None, 10.0, 5.0)


def test_labelled_slices_are_not_scored():
    case = _case()
    prediction = case.reference.copy()
    prediction[9] = 0                          # wrong only on a slice the user drew
    assert unlabelled_dice(prediction, case, [9]) == {"block": 1.0, "small": 1.0}
    assert unlabelled_dice(prediction, case, [5])["block"] < 1.0


def test_per_structure_protocol_draws_inside_each_structure_and_leaves_its_ends():
    case = _case()
    labelled = case.labelled_slices(3)
    assert {6, 9, 12} <= set(labelled)         # block 4..14: three slices spread inside, ends not drawn
    assert 4 not in labelled and 14 not in labelled
    assert any(8 <= s <= 11 for s in labelled)  # the small one is drawn too
    drawn = case.drawn(labelled)
    assert set(np.flatnonzero(drawn.any(axis=(1, 2)))) == set(labelled)


def test_near_ends_protocol_draws_from_two_slices_inside_each_end():
    case = _case()
    assert {4 + NEAR_END_INSET, 9, 14 - NEAR_END_INSET} <= set(case.labelled_slices(3, "near_ends"))
    labelled = case.labelled_slices(2, "near_ends")
    # block 4..14: its two drawn slices NEAR_END_INSET inside its ends, where even drawing puts them at 7 and 11
    assert {4 + NEAR_END_INSET, 14 - NEAR_END_INSET} <= set(labelled)
    assert {7, 11} <= set(case.labelled_slices(2)) and not {7, 11} & set(labelled)
    # the small one (8..11) is too short to leave two slices at its ends: drawn as the even protocol draws it
    assert set(labelled) - {4 + NEAR_END_INSET, 14 - NEAR_END_INSET} == {9, 10}


def test_random_protocol_stays_inside_each_structure_and_repeats():
    case = _case()
    labelled = case.labelled_slices(3, "random")
    assert labelled == case.labelled_slices(3, "random")   # repeatable: the same slices for every method
    assert all(5 <= s <= 13 for s in labelled)             # never the block's end slices 4 and 14
    assert len([s for s in labelled if (case.reference[s] == 1).any()]) >= 3   # three on the block
    with pytest.raises(ValueError, match="near_ends"):
        case.labelled_slices(3, "inset")


def test_consecutive_protocol_draws_neighbouring_slices_around_each_middle():
    case = _case()
    # block 4..14: three neighbours around its middle slice 9; the small one (8..11) as the even protocol draws it
    assert case.labelled_slices(3, "consecutive") == [8, 9, 10]
    assert case.labelled_slices(2, "consecutive") == [9, 10]
    assert consecutive_slices(0, 30, 4) == [14, 15, 16, 17]
    assert consecutive_slices(0, 3, 3) == slices_inside(0, 3, 3)     # too short to leave its ends: evenly


def test_the_true_ends_oracle_carries_the_drawn_shape_to_where_each_structure_ends():
    case = _case()
    labelled = case.labelled_slices(3)
    drawn = case.drawn(labelled)
    fill = unlabelled_dice(fill_between_slices(drawn, "k"), case, labelled)
    true_ends = true_ends_shape_dice(case, drawn, labelled)
    assert true_ends["block"] > fill["block"] + 0.05      # slices 4-5 and 13-14 that Fill cannot reach
    # Drawn on its first and last slices as well, a structure has nowhere further to go: Fill's score.
    every_end = sorted(set(labelled) | {4, 14, 8, 11})
    drawn = case.drawn(every_end)
    assert true_ends_shape_dice(case, drawn, every_end) == unlabelled_dice(
        fill_between_slices(drawn, "k"), case, every_end)


def test_runs_made_apart_merge_into_one_table(tmp_path):
    first = QualityResults([_run("toy", "salt", 0.8)], {"toy": {"block": 0.7, "small": 0.5}})
    second = QualityResults([_run("other", "salt", 0.9), _run("other", "lora", 0.85)], {})
    documents = [json.loads(json.dumps(part.to_dict())) for part in (first, second)]
    merged = merge_results([QualityResults.from_dict(d) for d in documents])
    assert [(r.case, r.method) for r in merged.runs] == [("toy", "salt"), ("other", "salt"), ("other", "lora")]
    merged.runs[0].true_ends_shape = {"block": 0.9, "small": 0.5}
    merged.runs[2].oracle_box = {"block": 0.95, "small": 0.65}                    # lora on other, fine-tuned
    table = quality_table(merged)
    assert "| toy | 3 | 0.500 | 0.750 | - |" in table       # Fill between slices, salt, no lora run on toy
    # zero-shot oracle box, each method's oracle box after fine-tuning (none on toy), true-ends shape
    assert "| toy | 3 | 0.500 | 0.750 | - | 3/4 | 0.600 | - / - | 0.700 |" in table
    assert "| toy | 3 | block | 0.600 | 0.800 | - | 0.700 | - / - | 0.900 |" in table
    assert "| other | 3 | 0.500 | 0.850 | 0.800 | 3/4 | - | - / 0.800 | - |" in table
    assert "| other | 3 | small | 0.400 | 0.800 | 0.750 | - | - / 0.650 | - |" in table
    assert "nan" not in table                                 # nothing run is "-", never "nan"
    assert "| other | 3 | 0.500 | 0.850 | 0.800 | 3/4 |" in table      # ends of the first method only
    paths = write_quality_outputs(merged, tmp_path)
    assert [p.name for p in paths] == ["quality.json", "quality.md", "quality.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    assert len(json.loads(paths[0].read_text())["runs"]) == 3


def test_each_protocol_gets_its_own_rows(tmp_path):
    even = _run("toy", "salt", 0.8)
    near = dataclasses.replace(_run("toy", "salt", 0.6), protocol="near_ends")
    table = quality_table(QualityResults([even, near]))
    assert "| toy | 3 | 0.500 | 0.750 | 3/4 |" in table       # not averaged with the near-end run
    assert "| toy | 3, near ends | 0.500 | 0.550 | 3/4 |" in table
    assert "| toy | 3, near ends | block | 0.600 | 0.600 |" in table
    assert write_quality_outputs(QualityResults([even, near]), tmp_path)[2].stat().st_size > 0


def test_the_estimate_and_the_extra_slice_experiment_are_tabled_beside_what_the_run_scored(tmp_path):
    plain = _run("toy", "salt", 0.8)
    told = _run("other", "salt", 0.9)
    told.estimate = {"propagation": 0.91, "fill_between_slices": 0.62, "segments": [], "text": ""}
    told.suggestion = {"suggested_slices": {}, "even_slices": {}, "mean_dice": {"suggested": 0.88, "even": 0.86},
                       "dice": {}}
    assert evidence_table(QualityResults([plain])) == ""
    plain.estimate = {"propagation": None, "fill_between_slices": None, "segments": [], "text": "no quality estimate"}
    assert evidence_table(QualityResults([plain])) == ""      # one drawn slice: nothing to tell
    results = QualityResults.from_dict(json.loads(json.dumps(QualityResults([plain, told]).to_dict())))
    table = evidence_table(results)
    # measured 0.850 (mean of 0.9 and 0.8), estimated 0.910; Fill 0.500 measured, 0.620 estimated; extra slice
    assert "| other | 3 | salt | 0 | 0.850 | 0.910 | 0.500 | 0.620 | 0.880 | 0.860 |" in table
    assert "| toy |" not in table                          # a run with neither is left out
    markdown = write_quality_outputs(results, tmp_path)[1].read_text()
    assert markdown == quality_table(results) + "\n\n" + table + "\n"
    bare = write_quality_outputs(QualityResults([plain]), tmp_path / "bare")[1].read_text()
    assert bare == quality_table(QualityResults([plain])) + "\n"
