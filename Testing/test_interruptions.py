"""SIGTERM/SIGINT at several moments of ``saltsegment train`` and ``propagate`` (real subprocesses).

What must hold whenever the stop lands: nothing partial at the final path
(no file, or the previous file byte for byte), no ``.tmp-*`` file left in the
output folder, exit code 3 (``EXIT_INTERRUPTED``), and, once training has
taken a step, an adapter that loads. A stop before the first training step
writes no adapter at all: a 0-step adapter would only be the untrained model
under the name of the user's file.

The runs use ``--method lora`` (no SVD at set-up) and a few slices of the
embedded sample to keep each start to seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from SALTSegmentLib.adapter_file import load_adapter, read_adapter_metadata
from SALTSegmentLib.volume_io import read_label_map
from SALTSegmentLib.worker_protocol import EXIT_INTERRUPTED, parse_line

PREVIOUS = b"the previous output: must survive an interrupted run\n"


@pytest.fixture(scope="module")
def case(thalamus_crop, sample_image_path, sample_labels_path, write_untrained_adapter) -> Path:
    """The shared eight-slice crop plus a LoRA adapter (untrained) for propagation."""
    from SALTSegmentLib.volume_io import read_image

    _, _, segments = read_label_map(sample_labels_path)
    write_untrained_adapter(thalamus_crop / "adapter.safetensors", read_image(sample_image_path)[0], segments[:2])
    return thalamus_crop


def _start(*args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SALTSEGMENT_")}
    env["OMP_NUM_THREADS"] = "2"
    return subprocess.Popen([sys.executable, "-m", "SALTSegmentLib.cli", *args, "--progress", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _stop_when(process: subprocess.Popen, condition, signum: int = signal.SIGTERM, seconds: float = 300):
    """Read events until ``condition(event)`` holds, send ``signum``; return (events, exit code, stderr)."""
    events = []
    deadline = time.monotonic() + seconds
    try:
        for line in process.stdout:
            event = parse_line(line)
            if event is None:
                continue
            events.append(event)
            if condition(event):
                process.send_signal(signum)
                break
            assert event["event"] not in ("result", "error"), events
            assert time.monotonic() < deadline, "the worker made no progress"
        remaining, errors = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    events += [event for event in map(parse_line, remaining.splitlines()) if event]
    return events, process.returncode, errors


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp-"))


def _train(case: Path, out: Path, *extra: str) -> subprocess.Popen:
    return _start("train", "--image", str(case / "image.nrrd"), "--labels", str(case / "drawn.seg.nrrd"),
                  "--out", str(out), "--method", "lora", "--batch-size", "1", *extra)


@pytest.mark.parametrize("moment", ["start", "message"], ids=["while loading the model", "while setting up"])
def test_stop_before_the_first_step_writes_no_adapter(case, tmp_path, moment):
    """'start' comes once the inputs are checked, before the model loads; 'message' once the trainer is built."""
    out = tmp_path / "adapter.safetensors"
    out.write_bytes(PREVIOUS)
    events, code, errors = _stop_when(_train(case, out, "--steps", "50"), lambda e: e["event"] == moment)
    assert code == EXIT_INTERRUPTED, errors
    assert events[-1]["event"] == "error", events
    assert events[-1]["message"] == "stopped before the first training step; no adapter was written"
    assert not any(e["event"] == "progress" for e in events)
    assert out.read_bytes() == PREVIOUS
    assert _leftovers(tmp_path) == [] and "Traceback" not in errors


def test_stop_during_training_keeps_the_last_checkpoint_loadable(case, tmp_path):
    """Checkpoints every step; the stop lands right after a step, as its checkpoint is being written."""
    out = tmp_path / "adapter.safetensors"
    out.write_bytes(PREVIOUS)
    checked = []

    def condition(event) -> bool:
        if event["event"] == "checkpoint" and not checked:
            # the training goes on while a reader opens the checkpoint: it is always a whole file
            checked.append(load_adapter(out).metadata.training["steps_done"])
        return event["event"] == "progress" and event["step"] >= 3

    events, code, errors = _stop_when(_train(case, out, "--steps", "200", "--checkpoint-every", "1"), condition)
    assert code == EXIT_INTERRUPTED, errors
    assert checked and checked[0] >= 1
    assert events[-1]["event"] == "result" and events[-1]["outputs"]["adapter"] == str(out)
    metadata = read_adapter_metadata(out)
    assert metadata["training"]["interrupted"] is True and 3 <= metadata["training"]["steps"] < 200
    load_adapter(out)
    assert _leftovers(tmp_path) == [] and "Traceback" not in errors


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_during_propagation_writes_nothing(case, tmp_path, sample_image_path, signum):
    out = tmp_path / "seg.seg.nrrd"
    out.write_bytes(PREVIOUS)
    process = _start("propagate", "--image", str(sample_image_path), "--adapter", str(case / "adapter.safetensors"),
                     "--out", str(out), "--mode", "auto")
    events, code, errors = _stop_when(process, lambda e: e["event"] == "progress", signum)
    assert code == EXIT_INTERRUPTED, errors
    assert events[-1] == {"event": "error", "message": "propagation stopped before the end; nothing was written",
                          "hint": None}
    assert events[-2]["step"] < events[-2]["total"]
    assert out.read_bytes() == PREVIOUS
    assert _leftovers(tmp_path) == [] and "Traceback" not in errors
