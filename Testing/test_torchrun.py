"""``torchrun --nproc-per-node 2`` on the CPU (gloo), with real processes, the real model and real MR crops.

- Training on two ranks (batch 1 each) gives the adapter one process gives
  with batch 2: every rank draws the same global batch and computes its own
  rows, and DDP averages the gradients scaled to the mean over all pairs. The
  stated tolerance: after 3 steps in fp32, every trained tensor within
  0.1 x the learning rate (3e-4) of the single-process one, while training
  moved them by about 2.5 learning rates; the losses agree to 1e-5. What
  differs is only floating-point summation order (the encoder on a batch of
  1 vs 2, the gradient all-reduce), which Adam's normalised first steps
  amplify for gradients near zero.
- A stop on one rank (SIGTERM to rank 1, or the stop file) ends every rank
  at the same step, and rank 0 saves the adapter.
- ``propagate --cases`` over four volumes writes each exactly once; killing a
  rank mid-run leaves no partial output, a rerun on two ranks completes the
  rest and skips what was done, and the same command without torchrun then
  finds every volume complete.

Each rank runs single-threaded (OMP_NUM_THREADS=1), so two ranks use the two
CI cores.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import SimpleITK as sitk
from safetensors.torch import load_file

from SALTSegmentLib.adapter_file import read_adapter_metadata
from SALTSegmentLib.volume_io import VolumeGeometry, read_label_map, write_label_map
from SALTSegmentLib.worker_protocol import EXIT_OK, parse_line

LEARNING_RATE = 3e-3   # salt's default (adapters.methods)
TIMEOUT_S = 420
SLAB = 4               # slices per volume of the batch propagation tests


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SALTSEGMENT_", "TORCHELASTIC_"))}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "SALTSegmentLib.cli", *args]


def _torchrun(*args: str) -> list[str]:
    """``torchrun --standalone --nproc-per-node 2 -m SALTSegmentLib.cli ...`` (torchrun is torch.distributed.run)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "SALTSegmentLib.cli", *args]


def _train_args(case: Path, out: Path, steps: int, batch: int, *extra: str) -> list[str]:
    return ["train", "--image", str(case / "image.nrrd"), "--labels", str(case / "drawn.seg.nrrd"),
            "--out", str(out), "--steps", str(steps), "--batch-size", str(batch), "--precision", "fp32",
            "--checkpoint-every", "0", "--progress", "json", *extra]


def _events(stdout: str) -> list[dict]:
    return [event for event in map(parse_line, stdout.splitlines()) if event is not None]


def _rank_processes(launcher: subprocess.Popen) -> dict[int, psutil.Process]:
    ranks = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            rank = child.environ().get("RANK")
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
        if rank is not None:
            ranks[int(rank)] = child
    return ranks


@pytest.fixture(scope="module")
def two_segment_crop(tmp_path_factory, write_sample_crop) -> Path:
    """Axial slices 28..35 of the sample: the left thalamus and caudate drawn on slices 2 and 6."""
    folder = tmp_path_factory.mktemp("torchrun_crop")
    write_sample_crop(folder, [1, 3])
    return folder


@pytest.fixture(scope="module")
def single_process_adapter(two_segment_crop, tmp_path_factory) -> Path:
    """One process, batch 2, 3 steps (fp32): the reference for the two-rank run, and the batch tests' adapter."""
    out = tmp_path_factory.mktemp("single") / "adapter.safetensors"
    completed = subprocess.run(_cli(*_train_args(two_segment_crop, out, 3, 2)), capture_output=True, text=True,
                               env=_environment(), timeout=TIMEOUT_S)
    assert completed.returncode == EXIT_OK, completed.stderr[-3000:]
    return out


def test_two_ranks_train_the_adapter_one_process_trains_with_the_doubled_batch(two_segment_crop,
                                                                              single_process_adapter, tmp_path):
    out = tmp_path / "adapter.safetensors"
    completed = subprocess.run(_torchrun(*_train_args(two_segment_crop, out, 3, 1)), capture_output=True, text=True,
                               env=_environment(), timeout=TIMEOUT_S)
    assert completed.returncode == EXIT_OK, completed.stderr[-3000:]
    events = _events(completed.stdout)
    # Progress and the result come from rank 0 only: one start, three steps, one result.
    assert [e["event"] for e in events].count("start") == 1 and [e["event"] for e in events][-1] == "result"
    assert [e["step"] for e in events if e["event"] == "progress"] == [1, 2, 3]
    assert "rank 1: finished after step 3" in completed.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]   # no lock, no staging folder

    single, ranks = load_file(str(single_process_adapter)), load_file(str(out))
    assert single.keys() == ranks.keys()
    worst = max(float((single[k] - ranks[k]).abs().max()) for k in single)
    moved = max(float((single[k] - 1).abs().max()) for k in single if k.endswith(".scale"))
    assert worst <= 0.1 * LEARNING_RATE, f"two ranks differ from one process by {worst:.2e}"
    assert moved > 10 * worst, "training moved the adapter too little for the comparison to mean anything"
    first, second = read_adapter_metadata(single_process_adapter), read_adapter_metadata(out)
    assert second["training"]["processes"] == 2 and second["training"]["steps_done"] == 3
    assert second["training"]["final_loss"] == pytest.approx(first["training"]["final_loss"], abs=1e-5)
    assert second["cases"] == first["cases"]


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step_with_the_adapter_saved(two_segment_crop, tmp_path):
    out = tmp_path / "adapter.safetensors"
    launcher = subprocess.Popen(_torchrun(*_train_args(two_segment_crop, out, 200, 1)),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_environment())
    try:
        assert launcher.stdout is not None
        for line in launcher.stdout:
            event = parse_line(line)
            if event is not None and event["event"] == "progress" and event["step"] >= 2:
                os.kill(_rank_processes(launcher)[1].pid, signal.SIGTERM)
                break
        stdout, stderr = launcher.communicate(timeout=TIMEOUT_S)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    saved = [e for e in _events(stdout) if e["event"] == "result"]
    assert saved, stderr[-3000:]
    steps = saved[0]["summary"]["steps_done"]
    assert 2 <= steps < 200 and saved[0]["summary"]["interrupted"]
    assert f"rank 1: stopped after step {steps}" in stderr, stderr[-3000:]
    metadata = read_adapter_metadata(out)
    assert metadata["training"]["steps_done"] == steps and metadata["training"]["interrupted"]
    # torchrun reports the ranks' exit code 3 (stopped) as a failure of the job (and may end a rank that is
    # still shutting down); nothing else is left behind.
    assert launcher.returncode != EXIT_OK and "exitcode  : 3" in stderr, stderr[-3000:]
    assert "SIGABRT" not in stderr and sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_the_stop_file_stops_every_rank(two_segment_crop, tmp_path):
    """Every rank polls the stop file at the same points: a stop before the first step writes nothing on any."""
    out, stop_file = tmp_path / "adapter.safetensors", tmp_path / "stop"
    stop_file.write_text("stop\n")
    completed = subprocess.run(_torchrun(*_train_args(two_segment_crop, out, 5, 1, "--stop-file", str(stop_file))),
                               capture_output=True, text=True, env=_environment(), timeout=TIMEOUT_S)
    errors = [e for e in _events(completed.stdout) if e["event"] == "error"]
    assert len(errors) == 1 and "no adapter was written" in errors[0]["message"], completed.stderr[-3000:]
    assert "rank 1: error: stopped before the first training step" in completed.stderr, completed.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stop"]


# ------------------------------------------------------------------------ batch propagation

@pytest.fixture(scope="module")
def four_volumes(tmp_path_factory, sample_image_path, sample_labels_path) -> Path:
    """Four small real MR volumes (4-slice slabs of the sample) and a case list; two carry drawn slices (box mode)."""
    folder = tmp_path_factory.mktemp("four_volumes")
    image = sitk.ReadImage(str(sample_image_path))
    labels, _, segments = read_label_map(sample_labels_path)
    size = list(image.GetSize())
    rows = [["image", "labels", "name"]]
    for number, first in enumerate((27, 31, 35, 39)):
        slab = sitk.RegionOfInterest(image, [size[0], size[1], SLAB], [0, 0, first])
        sitk.WriteImage(slab, str(folder / f"slab{number}.nrrd"))
        label_file = ""
        if number % 2:
            drawn = np.zeros_like(labels[first:first + SLAB])
            drawn[1] = np.where(np.isin(labels[first + 1], [1, 3]), labels[first + 1], 0)
            write_label_map(folder / f"slab{number}_drawn.seg.nrrd", drawn, VolumeGeometry.from_image(slab),
                            [segments[0], segments[2]])
            label_file = f"slab{number}_drawn.seg.nrrd"
        rows.append([f"slab{number}.nrrd", label_file, f"volume{number}"])
    with open(folder / "cases.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return folder


def _summary(folder: Path) -> dict[str, dict]:
    return {row["name"]: row for row in json.loads((folder / "summary.json").read_text())["volumes"]}


def _outputs(folder: Path) -> dict[str, int]:
    """Each output's inode and modification time: a file written again would change them."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("*.seg.nrrd")}


def test_batch_propagation_shares_volumes_across_ranks_survives_a_killed_rank_and_resumes(
        four_volumes, single_process_adapter, tmp_path):
    """Each volume is written exactly once over three runs: killed on two ranks, rerun on two, rerun on one."""
    out = tmp_path / "segmentations"
    arguments = ("propagate", "--cases", str(four_volumes / "cases.csv"), "--adapter", str(single_process_adapter),
                 "--out", str(out), "--progress", "json")
    launcher = subprocess.Popen(_torchrun(*arguments), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=_environment())
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (out / "volume3.seg.nrrd.lock").exists():   # rank 1 has started its second volume
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[1][-3000:]
            time.sleep(0.05)
        _rank_processes(launcher)[1].kill()
        _, stderr = launcher.communicate(timeout=TIMEOUT_S)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != EXIT_OK
    assert not (out / "volume3.seg.nrrd").exists() and not list(out.glob(".tmp-*")), sorted(os.listdir(out))
    before = _outputs(out)
    assert "volume1.seg.nrrd" in before                          # rank 1 finished its first volume
    for name in before:                                           # whatever was written is complete
        assert read_label_map(out / name)[0].shape == (SLAB, 116, 124)

    rerun = subprocess.run(_torchrun(*arguments), capture_output=True, text=True, env=_environment(),
                           timeout=TIMEOUT_S)
    assert rerun.returncode == EXIT_OK, rerun.stderr[-3000:]
    summary = _summary(out)
    assert list(summary) == [f"volume{n}" for n in range(4)]
    assert {name: row["status"] for name, row in summary.items()} == {
        f"volume{n}": ("skipped" if f"volume{n}.seg.nrrd" in before else "written") for n in range(4)}
    assert [row["rank"] for row in summary.values()] == [0, 1, 0, 1]            # each volume on one rank only
    assert all(row["message"].split(" mode")[0] == ("box" if n % 2 else "auto")  # box where slices were drawn
               for n, row in enumerate(summary.values()) if row["status"] == "written")
    result = [e for e in _events(rerun.stdout) if e["event"] == "result"]
    assert len(result) == 1 and result[0]["summary"]["counts"]["written"] == 4 - len(before)
    after = _outputs(out)
    assert len(after) == 4 and all(after[name] == before[name] for name in before)
    assert sorted(p.name for p in out.iterdir()) == sorted(list(after) + ["summary.csv", "summary.json"])

    single = subprocess.run(_cli(*arguments), capture_output=True, text=True, env=_environment(), timeout=TIMEOUT_S)
    assert single.returncode == EXIT_OK, single.stderr[-3000:]    # the same command without torchrun
    assert [row["status"] for row in _summary(out).values()] == ["skipped"] * 4
    assert _outputs(out) == after
    with open(out / "summary.csv", newline="") as handle:
        assert [row["name"] for row in csv.DictReader(handle)] == [f"volume{n}" for n in range(4)]
