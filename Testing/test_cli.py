"""The ``saltsegment`` CLI as a real subprocess: JSON progress, SIGTERM, evaluate, models."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from SALTSegmentLib.adapter_file import load_adapter, read_adapter_metadata
from SALTSegmentLib.worker_protocol import EXIT_INTERRUPTED, EXIT_OK, parse_line


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "SALTSegmentLib.cli", *args]


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "2"
    return env


@pytest.fixture(scope="module")
def tiny_case(thalamus_crop) -> Path:
    return thalamus_crop


def _train_args(case: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return _cli("train", "--image", str(case / "image.nrrd"), "--labels", str(case / "drawn.seg.nrrd"),
                "--out", str(out), "--steps", str(steps), "--batch-size", "1", "--progress", "json", *extra)


def test_json_progress_stream_ends_with_a_result(tiny_case, tmp_path):
    out = tmp_path / "adapter.safetensors"
    completed = subprocess.run(_train_args(tiny_case, out, 3), capture_output=True, text=True, env=_environment(),
                               timeout=600)
    assert completed.returncode == EXIT_OK, completed.stderr
    events = [parse_line(line) for line in completed.stdout.splitlines()]
    assert all(event is not None for event in events), completed.stdout
    kinds = [event["event"] for event in events]
    assert kinds[0] == "start" and kinds[-1] == "result"
    progress = [event for event in events if event["event"] == "progress"]
    assert [event["step"] for event in progress] == [1, 2, 3]
    assert all({"loss", "lr", "elapsed_s", "eta_s", "total"} <= set(event) for event in progress)
    assert events[-1]["outputs"]["adapter"] == str(out)
    assert read_adapter_metadata(out)["training"]["steps"] == 3

    seg = tmp_path / "seg.seg.nrrd"
    completed = subprocess.run(_cli("propagate", "--image", str(tiny_case / "image.nrrd"), "--adapter", str(out),
                                    "--out", str(seg), "--labels", str(tiny_case / "drawn.seg.nrrd"),
                                    "--progress", "json"),
                               capture_output=True, text=True, env=_environment(), timeout=600)
    assert completed.returncode == EXIT_OK, completed.stderr
    events = [parse_line(line) for line in completed.stdout.splitlines()]
    assert events[-1]["event"] == "result" and events[-1]["outputs"]["segmentation"] == str(seg)
    progress = [event for event in events if event["event"] == "progress"]
    assert progress and progress[-1]["step"] == progress[-1]["total"]       # box mode: segments, then the estimate
    messages = [event["text"] for event in events if event["event"] == "message"]
    assert any(text.startswith("Thalamus_L: slices ") for text in messages)  # the decided extent, with reasons
    assert events[-1]["summary"]["extents"][0]["segment"] == "Thalamus_L"

    completed = subprocess.run(_cli("evaluate", "--pred", str(seg), "--ref", str(tiny_case / "reference.seg.nrrd"),
                                    "--json"), capture_output=True, text=True, env=_environment(), timeout=120)
    assert completed.returncode == EXIT_OK, completed.stderr
    report = json.loads(completed.stdout)
    assert report["segments"][0]["name"] == "Thalamus_L"
    assert 0.0 <= report["segments"][0]["dice"] <= 1.0
    assert any(row["index"] == 4 for row in report["slices"])


def test_a_slice_marked_absent_trains_as_one_and_stops_the_walk_before_it(tiny_case, tmp_path):
    """``--absent Thalamus_L=0``: crop slice 0 (the sample's 28) lies past the thalamus's first slice (30)."""
    from SALTSegmentLib.volume_io import read_label_map

    out = tmp_path / "adapter.safetensors"
    completed = subprocess.run(_train_args(tiny_case, out, 2, "--absent", "Thalamus_L=0"), capture_output=True,
                               text=True, env=_environment(), timeout=600)
    assert completed.returncode == EXIT_OK, completed.stderr
    seg = tmp_path / "seg.seg.nrrd"
    completed = subprocess.run(_cli("propagate", "--image", str(tiny_case / "image.nrrd"), "--adapter", str(out),
                                    "--out", str(seg), "--labels", str(tiny_case / "drawn.seg.nrrd"),
                                    "--absent", "Thalamus_L=0", "--progress", "json"),
                               capture_output=True, text=True, env=_environment(), timeout=600)
    assert completed.returncode == EXIT_OK, completed.stderr
    events = [parse_line(line) for line in completed.stdout.splitlines()]
    first = events[-1]["summary"]["extents"][0]["first_reason"]
    assert first == "up to a slice where you marked it absent"
    labels, _, _ = read_label_map(seg)
    assert not labels[0].any() and labels[1].any()


def test_sigterm_during_training_saves_a_loadable_adapter(tiny_case, tmp_path):
    out = tmp_path / "adapter.safetensors"
    process = subprocess.Popen(_train_args(tiny_case, out, 500, "--checkpoint-every", "1000"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_environment())
    try:
        deadline = time.monotonic() + 300
        for line in process.stdout:
            event = parse_line(line)
            if event and event["event"] == "progress" and event["step"] >= 2:
                break
            assert time.monotonic() < deadline, "no progress from the worker"
        assert not out.exists()  # no checkpoint was due yet: only the stop writes the adapter
        process.send_signal(signal.SIGTERM)
        remaining, errors = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == EXIT_INTERRUPTED, errors
    events = [parse_line(line) for line in remaining.splitlines() if parse_line(line)]
    assert events[-1]["event"] == "result"
    metadata = read_adapter_metadata(out)
    assert metadata["training"]["interrupted"] is True
    assert 2 <= metadata["training"]["steps"] < 500
    load_adapter(out)
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"]  # no temporary file left


def test_models_lists_the_registry():
    completed = subprocess.run(_cli("models", "--json"), capture_output=True, text=True, env=_environment(),
                               timeout=120)
    assert completed.returncode == EXIT_OK, completed.stderr
    rows = {row["id"]: row for row in json.loads(completed.stdout)}
    assert set(rows) == {"lite_medsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b"}
    assert rows["lite_medsam"]["available"] is True
    assert rows["sam_vit_b"]["downloadable"] is True and rows["medsam_vit_b"]["downloadable"] is False
