"""Box propagation with the real LiteMedSAM on a crop of the real sample (prompts at their box initialisation).

No training here: the prompts start as the embedding of each segment's box,
which is what an adapter starts from, so these tests check the mechanics
(drawn slices kept, ends decided with reasons, range, stop, estimate) on real
images in seconds rather than the quality of a fine-tuned model.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np
import pytest
import torch

from SALTSegmentLib import preprocessing as pp
from SALTSegmentLib.extent import END_DRAWN, END_RANGE, ExtentRule
from SALTSegmentLib.interpolation import fill_between_slices, interpolate_segment
from SALTSegmentLib.prompts import SegmentPrompts
from SALTSegmentLib.propagation import PropagationConfig, VolumePropagator, encoder_batch_size
from SALTSegmentLib.volume_io import read_image, read_label_map

FIRST, COUNT = 26, 18                      # axial slices 26..43 of the sample
DRAWN = [3, 8, 13]                         # crop slices the user drew
KEEP = ("Thalamus_L", "Caudate_L")


@pytest.fixture(scope="module")
def crop(sample_image_path, sample_labels_path):
    image, geometry = read_image(sample_image_path)
    reference, _, segments = read_label_map(sample_labels_path)
    segments = [s for s in segments if s.name in KEEP]
    reference = np.where(np.isin(reference, [s.label for s in segments]), reference, 0)[FIRST:FIRST + COUNT]
    drawn = np.zeros_like(reference)
    drawn[DRAWN] = reference[DRAWN]
    return image[FIRST:FIRST + COUNT], geometry.spacing, reference, drawn, segments


@pytest.fixture(scope="module")
def prompts(lite_medsam, crop):
    """Each segment's tokens: the embedding of its box on the drawn slices (the adapter's starting point)."""
    image, spacing, _, drawn, segments = crop
    slice_geometry = pp.slice_geometry_for(image.shape[1:], pp.slice_pixel_spacing(spacing, "k"), 256)
    boxes = []
    for segment in segments:
        box = pp.mask_box((drawn == segment.label).any(axis=0))
        boxes.append(slice_geometry.boxes_to_input(box)[0])
    tokens = SegmentPrompts(len(segments))
    tokens.init_from_boxes(lite_medsam, torch.tensor(np.array(boxes), dtype=torch.float32))
    return tokens


class _EncodedOnce(VolumePropagator):
    """A propagator that encodes each distinct slice once for the whole module, with the real model.

    The tests here walk the same 18 slices again and again with other rules; the encoder is what costs
    (seconds a slice on a 2-core CPU) and its output depends only on the slice's pixels. Keyed by those
    pixels, so a test on other pixels gets its own encoding.
    """

    encoded: dict[tuple[bytes, tuple[int, int]], torch.Tensor] = {}

    def embed(self, volume01: np.ndarray, indices: list[int], geometry: pp.SliceGeometry) -> torch.Tensor:
        keys = [(hashlib.sha256(np.ascontiguousarray(pp.take_slice(volume01, self.axis, i)).tobytes()).digest(),
                 tuple(geometry.resized_shape)) for i in indices]
        missing = [(i, key) for i, key in zip(indices, keys) if key not in self.encoded]
        if missing:
            fresh = super().embed(volume01, [i for i, _ in missing], geometry)
            self.encoded.update({key: embedding for (_, key), embedding in zip(missing, fresh)})
        return torch.stack([self.encoded[key] for key in keys])


def _propagator(lite_medsam, prompts, crop, encoded_once: bool = True, lengths=(), **settings):
    image, _, _, _, segments = crop
    config = replace(PropagationConfig(mode="box"), **settings)
    kind = _EncodedOnce if encoded_once else VolumePropagator
    return kind(lite_medsam, prompts, segments, pp.parse_intensity("auto", image), "k", config, lengths=lengths)


def _dice(a, b):
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


@pytest.fixture(scope="module")
def box_run(lite_medsam, prompts, crop, one_thread):
    """The default box run on the crop, with the progress it reported."""
    image, spacing, _, drawn, _ = crop
    progress = []
    result = _propagator(lite_medsam, prompts, crop).run(image, spacing, drawn, DRAWN, on_progress=progress.append)
    return result, progress


@pytest.fixture(scope="module")
def box_result(box_run):
    return box_run[0]


def test_progress_counts_each_segment_then_each_segments_estimate(box_run, crop):
    segments = crop[4]
    steps = [(p.done, p.total) for p in box_run[1]]
    assert steps == [(done, 2 * len(segments)) for done in range(1, 2 * len(segments) + 1)]


def test_interpolate_mode_is_fill_between_slices(lite_medsam, prompts, crop):
    image, spacing, _, drawn, _ = crop
    result = _propagator(None, None, crop, mode="interpolate").run(image, spacing, drawn, DRAWN)
    assert np.array_equal(result.labels, fill_between_slices(drawn, "k"))
    assert result.extents == [] and result.estimate is None


def test_box_mode_keeps_drawn_slices_and_follows_the_structures(box_result, crop):
    _, _, reference, drawn, segments = crop
    np.testing.assert_array_equal(box_result.labels[DRAWN], drawn[DRAWN])
    for segment in segments:
        truth = reference == segment.label
        predicted = box_result.labels == segment.label
        between = slice(DRAWN[0], DRAWN[-1] + 1)
        assert _dice(predicted[between], truth[between]) > 0.6, segment.name


def test_every_drawn_segment_has_its_ends_and_their_reasons(box_result, crop):
    _, _, _, drawn, segments = crop
    assert [e.name for e in box_result.extents] == [s.name for s in segments]
    for extent, segment in zip(box_result.extents, segments):
        present = pp.occupied_slices(drawn == segment.label, "k")
        assert extent.first.slice <= present[0] and extent.last.slice >= present[-1]
        assert extent.first.reason and extent.last.reason
        occupied = pp.occupied_slices(box_result.labels == segment.label, "k")
        assert occupied[0] == extent.first.slice and occupied[-1] == extent.last.slice
    # The left thalamus starts at crop slice 3 or 4: slice 3 is drawn without it on... or with it; either way
    # a labelled slice without the segment is a hard end the walk never crosses.
    for extent, segment in zip(box_result.extents, segments):
        absent = [i for i in DRAWN if not (drawn[i] == segment.label).any()]
        below = [i for i in absent if i < extent.first.slice]
        if below:
            assert extent.first.slice == max(below) + 1 or extent.first.reason != END_DRAWN


def test_the_estimate_compares_with_fill_between_slices_on_the_same_hidden_slices(box_result, crop):
    _, _, _, drawn, segments = crop
    estimate = box_result.estimate
    three = [s for s in segments if len(pp.occupied_slices(drawn == s.label, "k")) >= 3]
    assert [e.segment for e in estimate.segments] == [s.name for s in three]
    for row, segment in zip(estimate.segments, three):
        assert 0.0 <= row.propagation <= 1.0
        mask = drawn == segment.label
        hidden = DRAWN[1]
        without = mask.copy()
        without[hidden] = False
        interior = _dice(interpolate_segment(without, "k")[hidden], mask[hidden])
        # Only the inner drawn slice is hidden: the outermost ones would score 0 by construction.
        assert row.slices == [hidden]
        assert row.fill_between_slices == pytest.approx(interior, abs=1e-3)
    assert "expected Dice on unlabelled slices between drawn ones" in estimate.describe()
    for suggestion in box_result.suggestions:
        assert suggestion.slice not in DRAWN and suggestion.segment in KEEP
        assert suggestion.describe().startswith(f"{suggestion.segment}: draw slice {suggestion.slice} next (")


def test_sagittal_slices_propagate_as_the_same_slices_drawn_axially(lite_medsam, prompts, crop, box_result):
    """The crop turned so that its axial slices are voxel axis i (sagittal slices of an axially stored volume):
    the same slices, drawn and propagated along i, give the axial result turned (a sagittal drawing once came
    back as drawn, nothing filled in, because the shape interpolation lost its slice list along x)."""
    image, (sx, sy, sz), _, drawn, segments = crop
    turn = lambda volume: np.moveaxis(volume, 0, 2)   # noqa: E731
    config = PropagationConfig(mode="box")
    result = _EncodedOnce(lite_medsam, prompts, segments, pp.parse_intensity("auto", image), "i", config).run(
        turn(image), (sz, sx, sy), turn(drawn), DRAWN)
    np.testing.assert_array_equal(result.labels, turn(box_result.labels))
    assert [e.to_dict() for e in result.extents] == [e.to_dict() for e in box_result.extents]
    assert (result.labels > 0).sum() > 2 * (drawn > 0).sum()


def test_a_range_between_drawn_slices_is_filled_from_seeds_outside_it(lite_medsam, prompts, crop):
    image, spacing, reference, drawn, segments = crop
    result = _propagator(lite_medsam, prompts, crop, slice_range=(4, 7), estimate=False).run(
        image, spacing, drawn, DRAWN)
    inside = result.labels[4:8]
    assert (inside > 0).any()
    assert not np.delete(result.labels, list(range(4, 8)) + DRAWN, axis=0).any()
    for extent in result.extents:
        assert extent.first.reason == END_RANGE or extent.first.slice >= 3
        assert extent.last.reason == END_RANGE


def test_a_stop_request_inside_a_walk_ends_it_at_once(lite_medsam, prompts, crop):
    image, spacing, _, drawn, _ = crop
    propagator = _propagator(lite_medsam, prompts, crop, estimate=False,
                             extent=ExtentRule(spacing_bound=3.0, min_similarity=0.0, min_area_ratio=0.0))
    calls = []
    original = propagator.predict_box

    def counting(*arguments):
        calls.append(1)
        return original(*arguments)

    propagator.predict_box = counting
    result = propagator.run(image, spacing, drawn, DRAWN, should_stop=lambda: len(calls) >= 2)
    assert result.interrupted and len(calls) == 2
    assert not np.delete(result.labels, DRAWN, axis=0).any()   # nothing propagated (the pipeline writes nothing)


def test_nothing_is_embedded_when_every_slice_is_drawn(lite_medsam, prompts, crop):
    image, spacing, reference, _, _ = crop
    four = slice(4, 8)
    propagator = _propagator(lite_medsam, prompts, crop, estimate=False)
    embedded = []
    original = propagator.embed

    def counting(volume01, indices, slice_geometry):
        embedded.extend(indices)
        return original(volume01, indices, slice_geometry)

    propagator.embed = counting
    result = propagator.run(image[four], spacing, reference[four], [0, 1, 2, 3])
    assert embedded == []
    np.testing.assert_array_equal(result.labels, reference[four])


def test_one_drawn_slice_reaches_as_far_as_the_adapters_training_cases_drew_the_structure(lite_medsam, prompts,
                                                                                         crop, one_thread):
    """A site adapter knows how long a structure runs; from one drawn slice the walk may go that far."""
    from SALTSegmentLib.extent import END_LENGTH, END_SIZE
    from SALTSegmentLib.structure_length import DrawnLength

    image, spacing, _, drawn, segments = crop
    one = np.zeros_like(drawn)
    one[DRAWN[1]] = drawn[DRAWN[1]]
    only_emptiness = ExtentRule(min_similarity=0.0, min_area_ratio=0.0)   # the bound alone decides (mechanics)
    plain = _propagator(lite_medsam, prompts, crop, extent=only_emptiness, estimate=False)
    without = plain.run(image, spacing, one, [DRAWN[1]])
    caudate = next(s for s in segments if s.name == "Caudate_L")
    radius = float(np.sqrt((one == caudate.label).sum() * spacing[0] * spacing[1] / np.pi))
    long_caudate = {"Caudate_L": DrawnLength(span_mm=8 * radius, gap_mm=0.0, radius_mm=radius)}   # 4 radii each way
    knowing = _propagator(lite_medsam, prompts, crop, lengths=[long_caudate], extent=only_emptiness, estimate=False)
    with_length = knowing.run(image, spacing, one, [DRAWN[1]])
    before = next(e for e in without.extents if e.name == "Caudate_L")
    after = next(e for e in with_length.extents if e.name == "Caudate_L")
    assert END_SIZE in (before.first.reason, before.last.reason)          # a lone slice: a round lesion's reach
    assert END_SIZE not in (after.first.reason, after.last.reason)
    assert after.first.beyond_drawn + after.last.beyond_drawn > before.first.beyond_drawn + before.last.beyond_drawn
    assert END_LENGTH in (after.first.reason, after.last.reason) or \
        (after.first.slice, after.last.slice) == (0, COUNT - 1) or "nothing" in after.first.reason + after.last.reason
    # The thalamus, which no training case measured, still reaches only as far as its drawn size says.
    thalamus = [next(e for e in r.extents if e.name == "Thalamus_L") for r in (without, with_length)]
    assert thalamus[0].to_dict() == thalamus[1].to_dict()


def test_an_adapter_trained_on_this_drawing_walks_as_if_it_knew_no_length(lite_medsam, prompts, crop, one_thread):
    """The usual train-then-propagate: the adapter's only record is this drawing, so the drawing's bounds hold.

    Another patient's record of the same structure, twice as long, does move the ends: the bound is what decides
    here (three slices in the middle of the crop, spread enough to be a spacing, a walk stopped only by emptiness).
    """
    from SALTSegmentLib.structure_length import DrawnLength, drawn_lengths, lengths_from_records, lengths_to_record

    image, spacing, reference, _, segments = crop
    middle = [5, 8, 11]
    drawn = np.zeros_like(reference)
    drawn[middle] = reference[middle]
    own = lengths_from_records([{"lengths": lengths_to_record(drawn_lengths(drawn, segments, "k", middle, spacing))}])
    assert set(own[0]) == {"Thalamus_L", "Caudate_L"}
    longer = [{name: DrawnLength(2 * length.span_mm, length.gap_mm, length.radius_mm)
               for name, length in own[0].items()}]
    only_emptiness = ExtentRule(min_similarity=0.0, min_area_ratio=0.0)
    runs = [_propagator(lite_medsam, prompts, crop, lengths=lengths, extent=only_emptiness, estimate=False).run(
                image, spacing, drawn, middle)
            for lengths in ([], own, longer)]
    plain, trained_here, other_patient = ([e.to_dict() for e in r.extents] for r in runs)
    assert trained_here == plain
    np.testing.assert_array_equal(runs[1].labels, runs[0].labels)
    assert other_patient != plain


def test_neighbouring_drawn_slices_reach_as_far_as_the_drawn_size_not_one_slice(lite_medsam, prompts, crop,
                                                                                 one_thread):
    """The thalamus drawn on three neighbouring slices (crop 8-10; it runs 4-17): the gap of one slice is no spacing.

    Only emptiness stops the walks here, so the bound is what decides: the outermost region's radius (about 12
    slices at 1 mm, x 0.75), as for one drawn slice, or the edge of the crop; a gap of one slice would stop
    each walk one slice out.
    """
    from SALTSegmentLib.extent import END_EDGE, END_SIZE

    image, spacing, reference, _, segments = crop
    thalamus = next(s for s in segments if s.name == "Thalamus_L")
    neighbours = [8, 9, 10]
    drawn = np.zeros_like(reference)
    drawn[neighbours] = np.where(reference[neighbours] == thalamus.label, thalamus.label, 0)
    only_emptiness = ExtentRule(min_similarity=0.0, min_area_ratio=0.0)
    result = _propagator(lite_medsam, prompts, crop, extent=only_emptiness, estimate=False).run(
        image, spacing, drawn, neighbours)
    extent = next(e for e in result.extents if e.name == "Thalamus_L")
    for end in (extent.first, extent.last):
        assert end.reason in (END_SIZE, END_EDGE) and end.beyond_drawn >= 5, extent.describe()
    assert extent.first.slice <= 4 and extent.last.slice >= 15        # past the thalamus' true first slice (4)


def test_a_walk_towards_a_slice_drawn_without_the_segment_stops_half_way(lite_medsam, prompts, crop, one_thread):
    """The thalamus drawn on slice 8 and left out on slice 16 (as a user may draw it): its end lies between.

    The anatomy goes on (the thalamus is there on every slice up to 16), so with only emptiness to stop it a
    walk goes as far as its bound: half way (7 slices between, 4 out), or with the rule off up to slice 15.
    """
    from SALTSegmentLib.extent import END_HALFWAY, SegmentEnd

    image, spacing, reference, _, segments = crop
    thalamus = next(s for s in segments if s.name == "Thalamus_L")
    labelled = [8, 16]
    drawn = np.zeros_like(reference)
    drawn[8] = reference[8]
    drawn[16] = np.where(reference[16] == thalamus.label, 0, reference[16])
    only_emptiness = ExtentRule(min_similarity=0.0, min_area_ratio=0.0)
    ends = []
    for halfway in (0.5, None):
        rule = replace(only_emptiness, halfway_bound=halfway)
        result = _propagator(lite_medsam, prompts, crop, extent=rule, estimate=False).run(
            image, spacing, drawn, labelled)
        ends.append(next(e for e in result.extents if e.name == "Thalamus_L").last)
    assert ends[0] == SegmentEnd(12, END_HALFWAY, 4)
    assert ends[1] == SegmentEnd(15, END_DRAWN, 7)


def test_a_slice_marked_without_the_segment_stops_its_walk_right_before_it(lite_medsam, prompts, crop, one_thread):
    """The user looked at slice 16 and found no thalamus there: the walk may go up to it, not half way.

    The mark is the thalamus's alone: the caudate, not marked, walks on as before, and slice 16 is not a
    labelled slice for it. The thalamus is empty on its marked slice, and that slice is never suggested.
    """
    from SALTSegmentLib.extent import END_MARKED, SegmentEnd

    image, spacing, reference, _, segments = crop
    drawn = np.zeros_like(reference)
    drawn[8] = reference[8]
    only_emptiness = ExtentRule(min_similarity=0.0, min_area_ratio=0.0)
    runs = {}
    for marks in ({}, {"Thalamus_L": [16]}):
        runs[bool(marks)] = _propagator(lite_medsam, prompts, crop, extent=only_emptiness).run(
            image, spacing, drawn, [8], absent_slices=marks)
    ends = {marked: {e.name: e for e in run.extents} for marked, run in runs.items()}
    assert ends[True]["Thalamus_L"].last == SegmentEnd(15, END_MARKED, 7)
    thalamus = next(s for s in segments if s.name == "Thalamus_L")
    assert ends[False]["Thalamus_L"].last.slice == COUNT - 1            # unmarked, it walks to the crop's edge
    assert (runs[False].labels[16] == thalamus.label).any()
    assert ends[True]["Caudate_L"] == ends[False]["Caudate_L"]
    assert not (runs[True].labels[16] == thalamus.label).any()
    assert all(n.slice != 16 for n in runs[True].suggestions if n.segment == "Thalamus_L")


def test_marked_slices_stay_empty_in_every_mode_and_bad_marks_are_refused(lite_medsam, prompts, crop):
    """Fill between slices crosses a marked slice between two drawn ones; the mark empties it all the same."""
    from SALTSegmentLib.propagation import PropagationInputError, check_absent_slices

    image, spacing, _, drawn, segments = crop
    thalamus = next(s for s in segments if s.name == "Thalamus_L")
    fill = _propagator(lite_medsam, prompts, crop, mode="interpolate")
    plain = fill.run(image, spacing, drawn, DRAWN)
    marked = fill.run(image, spacing, drawn, DRAWN, absent_slices={"Thalamus_L": [10]})
    assert (plain.labels[10] == thalamus.label).any() and not (marked.labels[10] == thalamus.label).any()
    others = np.ones(len(drawn), bool)
    others[10] = False
    np.testing.assert_array_equal(plain.labels[others], marked.labels[others])
    np.testing.assert_array_equal(np.where(plain.labels[10] == thalamus.label, 0, plain.labels[10]), marked.labels[10])

    for marks, message in (({"Putamen_L": [10]}, "not one of the adapter's segments"),
                           ({"Thalamus_L": [COUNT]}, "outside"), ({"Thalamus_L": [DRAWN[1]]}, "drawn on slice")):
        with pytest.raises(PropagationInputError, match=message):
            check_absent_slices(marks, segments, "k", drawn.shape, drawn)


def test_walks_a_bound_ended_keep_the_closing_shape_and_evidence_ended_ones_take_the_model(lite_medsam, prompts,
                                                                                          crop, one_thread):
    """From three drawn slices, walks cut by the spacing bound leave the shape closed towards their ends."""
    from SALTSegmentLib.box_mode import closed_shape, compose_label_map, walk_fusion_weight
    from SALTSegmentLib.extent import END_APPEARANCE, END_EMPTY, END_SIZE, END_SPACING, SegmentEnd

    image, spacing, _, drawn, segments = crop
    # 2 slices past each end, no evidence stop, no taper: the spacing bound alone ends every walk
    bound_only = ExtentRule(spacing_bound=0.4, min_similarity=0.0, min_area_ratio=0.0, taper_bound=None)
    runs = {weight: _propagator(lite_medsam, prompts, crop, extent=bound_only, estimate=False,
                                bounded_end_fusion=weight).run(image, spacing, drawn, DRAWN)
            for weight in (0.0, 0.5)}
    shape_only, blended = runs[0.0], runs[0.5]
    assert [e.to_dict() for e in shape_only.extents] == [e.to_dict() for e in blended.extents]
    assert all(end.reason == END_SPACING for e in shape_only.extents for end in (e.first, e.last))
    closed = [closed_shape(drawn == s.label, "k", DRAWN, e) for s, e in zip(segments, shape_only.extents)]
    np.testing.assert_array_equal(shape_only.labels, compose_label_map(closed, [s.label for s in segments],
                                                                       drawn.shape))
    assert not np.array_equal(blended.labels, shape_only.labels)        # the model's half does change them

    def end(reason):
        return SegmentEnd(0, reason, 2)
    assert walk_fusion_weight(0.5, 0.0, end(END_SPACING), 3) == 0.0
    assert walk_fusion_weight(0.5, 0.0, end(END_EMPTY), 3) == walk_fusion_weight(0.5, 0.0, end(END_APPEARANCE), 3) == 0.5
    assert walk_fusion_weight(0.5, 0.0, end(END_SIZE), 1) == 0.5         # one drawn slice: the model is the shape
    assert walk_fusion_weight(0.5, 0.0, end(END_SIZE), 3) == 0.5         # so past a dense drawing, bounded the same


def test_the_model_joins_the_interpolated_shape_only_far_from_drawn_slices():
    from SALTSegmentLib.box_mode import slices_far_from_drawn

    # drawn 10, 20 (labelled 14 without the segment): 13..17 are 3+ slices from 10 and 20, 14 is labelled
    assert slices_far_from_drawn([10, 20], [10, 14, 20], 3, 1.0) == [13, 15, 16, 17]
    assert slices_far_from_drawn([10, 24], [10, 24], 3, 0.5) == [16, 17, 18]      # 3 mm: 6 slices of 0.5 mm
    assert slices_far_from_drawn([10, 20], [10, 20], 3, 5.0) == [13, 14, 15, 16, 17]  # thick: still 3 slices
    assert slices_far_from_drawn([10, 14], [10, 14], 3, 1.0) == []                # a gap of 4 has none
    assert slices_far_from_drawn([10], [10], 1, 1.0) == []                        # one drawn slice: no gap


def test_between_drawn_slices_the_model_changes_only_the_far_slices(lite_medsam, prompts, crop, one_thread):
    """Drawn 5 apart, no slice is 3 from a drawing (the shape stays); from 2, slices 5, 6, 10, 11 take the model."""
    image, spacing, _, drawn, _ = crop
    fixed = dict(estimate=False, extent=ExtentRule(spacing_bound=0.4, min_similarity=0.0, min_area_ratio=0.0))
    runs = {(weight, start): _propagator(lite_medsam, prompts, crop, inside_fusion=weight, inside_fusion_from=start,
                                         **fixed).run(image, spacing, drawn, DRAWN)
            for weight, start in ((0.0, 3), (0.3, 3), (0.3, 2))}
    shape_only = runs[(0.0, 3)].labels
    np.testing.assert_array_equal(runs[(0.3, 3)].labels, shape_only)
    changed = [i for i in range(COUNT) if not np.array_equal(runs[(0.3, 2)].labels[i], shape_only[i])]
    assert changed and set(changed) <= {5, 6, 10, 11}


def test_encoder_batch_is_one_slice_on_the_cpu_and_changes_the_time_not_the_result(lite_medsam, prompts, crop,
                                                                                    box_result):
    """On the CPU the encoder takes one slice at a time (faster per slice there); a batch gives the same labels."""
    assert _propagator(lite_medsam, prompts, crop).batch_size == 1
    assert encoder_batch_size(None, on_accelerator=True) == 4 and encoder_batch_size(3, on_accelerator=False) == 3
    image, spacing, _, drawn, _ = crop
    batched = _propagator(lite_medsam, prompts, crop, encoded_once=False, batch_size=4, estimate=False).run(
        image, spacing, drawn, DRAWN)
    np.testing.assert_array_equal(batched.labels, box_result.labels)
    assert [e.to_dict() for e in batched.extents] == [e.to_dict() for e in box_result.extents]


def test_the_fine_tuned_oracle_box_scores_every_structure_on_the_unlabelled_slices_only(lite_medsam, prompts, crop,
                                                                                        one_thread):
    """``bench quality``'s comparison of methods on the model alone: the adapted model and its tokens with each
    structure's reference box, scored slice by slice, never on a slice the user drew."""
    from SALTSegmentLib.array_jobs import AdaptedModel
    from SALTSegmentLib.bench.cases import BenchCase
    from SALTSegmentLib.bench.quality import adapted_box_dice
    from SALTSegmentLib.volume_io import VolumeGeometry

    image, spacing, reference, _, segments = crop
    few = slice(11, 16)                                  # sample slices 37-41, both structures on each
    case = BenchCase("crop", image[few], VolumeGeometry(image[few].shape[::-1], spacing), reference[few], segments,
                     "k", "anatomy", "MR")
    adapted = AdaptedModel(lite_medsam, prompts, segments, pp.parse_intensity("auto", image))
    scores = adapted_box_dice(adapted, case, labelled=[0])
    assert set(scores) == set(KEEP) and all(0.6 < value <= 1.0 for value in scores.values()), scores
    assert adapted_box_dice(adapted, case, labelled=range(5)) == {}      # every slice drawn: nothing to score
    alone = [adapted_box_dice(adapted, case, labelled=[i for i in range(5) if i != k]) for k in range(1, 5)]
    for name, value in scores.items():                                   # the mean of slice Dice, slice by slice
        assert value == pytest.approx(np.mean([one[name] for one in alone]), abs=1e-4)
