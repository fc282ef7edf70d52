"""Nothing of the user's is overwritten or dropped, through the real CLI and real files.

Drawn segments the adapter does not know come back unchanged; ``evaluate``
pairs segments by name and names the missing ones; detached formats leave no
temporary data file; two runs never write one output at once; outputs get
the user's umask; a label map without names is paired by value, and a value
a ``.seg.nrrd`` header does not list is reported, each with a word.

Propagation runs an untrained LoRA adapter (two segments, Thalamus_L = 1 and
Thalamus_R = 2) on one slice of the shared eight-slice crop (``--mode auto
--range 3:3``): what is checked here is what happens around the model.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SALTSegmentLib.volume_io import Segment, VolumeGeometry, read_label_map, write_label_map
from SALTSegmentLib.worker_protocol import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, parse_line

LESION = Segment(2, "Lesion", (0.1, 0.2, 0.3))     # value 2 is the adapter's Thalamus_R: must move
MARKER = Segment(7, "Marker", (0.9, 0.8, 0.1))     # value 7 is free: must stay


@pytest.fixture(scope="module")
def case(thalamus_crop, sample_labels_path, write_untrained_adapter) -> Path:
    """The crop, an untrained two-segment LoRA adapter, and label maps drawn around it."""
    from SALTSegmentLib.volume_io import read_image

    folder = thalamus_crop
    _, _, segments = read_label_map(sample_labels_path)
    volume, geometry = read_image(folder / "image.nrrd")
    write_untrained_adapter(folder / "two_segments.safetensors", volume, segments[:2])

    drawn, _, drawn_segments = read_label_map(folder / "drawn.seg.nrrd")
    extra = drawn.copy()
    extra[1, 10:20, 10:30] = LESION.label     # slices 1 and 5: away from the propagated slice 3
    extra[5, 40:44, 60:70] = MARKER.label
    extra[4, 5:8, 5:8] = 5                    # a value the header does not list
    write_label_map(folder / "with_extra.seg.nrrd", extra, geometry, [*drawn_segments, LESION, MARKER])
    plain = sitk.GetImageFromArray(drawn)
    geometry.apply_to(plain)
    sitk.WriteImage(plain, str(folder / "plain_drawn.nrrd"))
    return folder


def _run(*args: str, umask: int = 0o022, timeout: float = 300) -> tuple[int, list[dict], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SALTSEGMENT_")}
    env["OMP_NUM_THREADS"] = "1"
    completed = subprocess.run([sys.executable, "-m", "SALTSegmentLib.cli", *args, "--progress", "json"],
                               capture_output=True, text=True, env=env, timeout=timeout,
                               preexec_fn=lambda: os.umask(umask))
    events = [event for event in map(parse_line, completed.stdout.splitlines()) if event]
    return completed.returncode, events, completed.stderr


def _propagate(case: Path, out: Path, labels: str, *extra: str) -> tuple[int, list[dict], str]:
    return _run("propagate", "--image", str(case / "image.nrrd"), "--adapter", str(case / "two_segments.safetensors"),
                "--labels", str(case / labels), "--out", str(out), "--mode", "auto", "--range", "3:3", *extra)


def _messages(events: list[dict]) -> list[str]:
    return [event["text"] for event in events if event["event"] == "message"]


# --------------------------------------------------------------------------- drawn segments pass through

def test_drawn_segments_the_adapter_does_not_know_come_back_unchanged(case, tmp_path):
    out = tmp_path / "seg.seg.nrrd"
    code, events, errors = _propagate(case, out, "with_extra.seg.nrrd")
    assert code == EXIT_OK, errors
    drawn, _, _ = read_label_map(case / "with_extra.seg.nrrd")
    labels, _, segments = read_label_map(out)
    by_name = {s.name: s for s in segments}
    assert {"Thalamus_L", "Thalamus_R", "Lesion", "Marker"} <= set(by_name)
    assert by_name["Marker"].label == 7 and by_name["Marker"].color == MARKER.color
    lesion = by_name["Lesion"]
    assert lesion.label not in (1, 2, 7) and lesion.color == LESION.color
    np.testing.assert_array_equal(labels == lesion.label, drawn == LESION.label)
    np.testing.assert_array_equal(labels == 7, drawn == MARKER.label)
    kept = events[-1]["summary"]["kept_drawn_segments"]
    assert {"name": "Lesion", "label": lesion.label, "drawn_label": 2} in kept
    assert {"name": "Marker", "label": 7, "drawn_label": 7} in kept
    assert any("Lesion (label 2, written as label" in text and "Marker (label 7)" in text
               for text in _messages(events)), events
    assert any(text.startswith("warning: with_extra.seg.nrrd holds label value 5 (9 voxels) that its header lists "
                               "for no segment") for text in _messages(events)), events
    assert not (labels == 5).any()


# --------------------------------------------------------------------------- pairing by value

def test_a_plain_label_map_is_paired_by_value_with_a_message(case, tmp_path):
    code, events, errors = _run("propagate", "--image", str(case / "image.nrrd"),
                                "--adapter", str(case / "two_segments.safetensors"),
                                "--labels", str(case / "plain_drawn.nrrd"), "--out", str(tmp_path / "box.seg.nrrd"),
                                "--mode", "box", "--range", "1:3")
    assert code == EXIT_OK, errors
    assert any("plain_drawn.nrrd carries no segment names" in text and "1 -> Thalamus_L" in text
               for text in _messages(events)), events
    assert events[-1]["summary"]["kept_labelled_slices"] == [2, 6]


# --------------------------------------------------------------------------- detached formats

@pytest.mark.parametrize("name, data_file", [("seg.nhdr", "seg.raw.gz"), ("seg.mhd", "seg.zraw")])
def test_detached_outputs_leave_only_their_two_files(case, tmp_path, name, data_file):
    drawn, geometry, segments = read_label_map(case / "drawn.seg.nrrd")
    for attempt in range(3):
        write_label_map(tmp_path / name, np.where(drawn > 0, attempt + 1, 0), geometry, segments)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, data_file])
    header = (tmp_path / name).read_text(encoding="latin-1")
    assert data_file in header and ".tmp-" not in header
    labels, _, _ = read_label_map(tmp_path / name)
    np.testing.assert_array_equal(labels, np.where(drawn > 0, 3, 0))


def test_propagating_over_a_detached_output_leaves_no_hidden_file(case, tmp_path):
    drawn, geometry, segments = read_label_map(case / "drawn.seg.nrrd")
    write_label_map(tmp_path / "seg.nhdr", drawn, geometry, segments)  # a previous result
    code, _, errors = _propagate(case, tmp_path / "seg.nhdr", "drawn.seg.nrrd")
    assert code == EXIT_OK, errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.nhdr", "seg.raw.gz"]
    read_label_map(tmp_path / "seg.nhdr")


# --------------------------------------------------------------------------- file modes

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_outputs_get_the_users_umask(case, tmp_path, umask, mode):
    from SALTSegmentLib.adapter_file import load_adapter, save_adapter

    previous = os.umask(umask)
    try:
        loaded = load_adapter(case / "two_segments.safetensors")
        save_adapter(tmp_path / "adapter.safetensors", loaded.model, loaded.prompts, loaded.metadata)
        drawn, geometry, segments = read_label_map(case / "drawn.seg.nrrd")
        write_label_map(tmp_path / "seg.nhdr", drawn, geometry, segments)
    finally:
        os.umask(previous)
    for name in ("adapter.safetensors", "seg.nhdr", "seg.raw.gz"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


# --------------------------------------------------------------------------- one writer per output

def _train(case: Path, out: Path, steps: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SALTSEGMENT_")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen([sys.executable, "-m", "SALTSegmentLib.cli", "train", "--image", str(case / "image.nrrd"),
                             "--labels", str(case / "drawn.seg.nrrd"), "--out", str(out), "--method", "lora",
                             "--batch-size", "1", "--steps", str(steps), "--progress", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: os.umask(0o022))


def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(case, tmp_path):
    out = tmp_path / "adapter.safetensors"
    first = _train(case, out, 500)
    try:
        deadline = time.monotonic() + 300
        for line in first.stdout:
            event = parse_line(line)
            if event and event["event"] == "progress":
                break
            assert event is None or event["event"] in ("start", "message"), event
            assert time.monotonic() < deadline, "the first run made no progress"
        code, events, errors = _run("train", "--image", str(case / "image.nrrd"), "--labels",
                                    str(case / "drawn.seg.nrrd"), "--out", str(out), "--steps", "1")
        assert code == EXIT_ERROR, errors
        assert events[-1]["event"] == "error"
        assert events[-1]["message"] == (f"{out} is being written by another saltsegment run (process {first.pid}); "
                                         "two runs must not write the same output")
        assert "adapter.safetensors.lock" in events[-1]["hint"]
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=180)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == EXIT_INTERRUPTED
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors"]  # the lock went with its run
    assert stat.S_IMODE(out.stat().st_mode) == 0o644


def test_a_lock_left_by_a_killed_run_is_taken_over(case, tmp_path):
    out = tmp_path / "seg.seg.nrrd"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / "seg.seg.nrrd.lock"
    lock.write_text(json.dumps({"pid": dead.pid, "started": time.time() - 5, "host": socket.gethostname()}))
    code, events, errors = _propagate(case, out, "drawn.seg.nrrd")
    assert code == EXIT_OK, errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.seg.nrrd"]


# --------------------------------------------------------------------------- evaluate pairs by name

def test_evaluate_pairs_by_name_and_names_the_missing_segment(tmp_path):
    geometry = VolumeGeometry((12, 12, 6), (1.0, 1.0, 1.0))
    left, right, caudate = Segment(1, "Thalamus_L"), Segment(2, "Thalamus_R"), Segment(3, "Caudate_L")
    reference = np.zeros((6, 12, 12), np.uint8)
    reference[1:4, 2:5, 2:5] = 1
    reference[1:4, 7:10, 7:10] = 2
    reference[4:6, 2:6, 7:11] = 3
    write_label_map(tmp_path / "ref.seg.nrrd", reference, geometry, [left, right, caudate])
    swapped = np.select([reference == 1, reference == 2], [2, 1], 0).astype(np.uint8)  # same shapes, values swapped
    swapped[0, 0, :4] = 9  # a value its header does not list
    write_label_map(tmp_path / "pred.seg.nrrd", swapped, geometry, [Segment(2, "Thalamus_L"), Segment(1, "Thalamus_R")])

    completed = subprocess.run([sys.executable, "-m", "SALTSegmentLib.cli", "evaluate", "--pred",
                                str(tmp_path / "pred.seg.nrrd"), "--ref", str(tmp_path / "ref.seg.nrrd"), "--json"],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == EXIT_OK, completed.stderr
    scores = {row["name"]: row for row in json.loads(completed.stdout)["segments"]}
    assert scores["Thalamus_L"]["dice"] == 1.0 and scores["Thalamus_R"]["dice"] == 1.0
    assert scores["Caudate_L"]["dice"] == 0.0 and scores["Caudate_L"]["missing"] is True
    assert not scores["Thalamus_L"]["missing"]
    assert "warning: pred.seg.nrrd holds label value 9 (4 voxels) that its header lists for no segment" \
        in completed.stderr
