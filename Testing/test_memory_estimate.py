"""The memory pre-check against the peak of real ``saltsegment`` processes (``os.wait4``, ``ru_maxrss``).

The estimate a run reports in its result event must lie within a factor 1.5
of the peak resident memory the kernel measured for that process, for
``train`` and ``propagate`` on the shared eight-slice crop. The calibration
on the full sample and a 512 x 512 x 60 CT-sized volume is
``scripts/measure_memory.py`` (too slow for the suite); its numbers are in
``preflight.py``'s comments.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from SALTSegmentLib.preflight import propagation_memory, training_memory
from SALTSegmentLib.worker_protocol import parse_line

FACTOR = 1.5

pytestmark = pytest.mark.skipif(not hasattr(os, "wait4"), reason="measures peak memory with os.wait4 (POSIX)")


# Linux carries a parent's peak RSS into a child (the forked copy's high-water mark is kept across exec),
# so a CLI started straight from this (large) test process would report the test process's peak. A small
# Python parent in between starts from a fresh image: the peak it reads back is the CLI's own.
_MEASURE = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(child.pid, 0)
print(usage.ru_maxrss, os.waitstatus_to_exitcode(status), file=sys.stderr)
"""


def _peak_and_estimate(*args: str) -> tuple[float, float]:
    """Run one CLI command; (peak RSS in MiB, the MiB its result event estimated)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SALTSEGMENT_", "MALLOC_"))}  # as users run it
    env["OMP_NUM_THREADS"] = "2"
    completed = subprocess.run([sys.executable, "-c", _MEASURE, sys.executable, "-m", "SALTSegmentLib.cli", *args,
                                "--progress", "json"], capture_output=True, text=True, env=env, timeout=900)
    max_rss, code = map(int, completed.stderr.strip().splitlines()[-1].split())
    assert completed.returncode == 0 and code == 0, completed.stderr
    events = [event for event in map(parse_line, completed.stdout.splitlines()) if event]
    estimate = events[-1]["summary"]["memory_estimate_mib"]
    peak = max_rss / 1024 if sys.platform != "darwin" else max_rss / 2 ** 20
    return peak, estimate["total_mib"]


@pytest.fixture(scope="module")
def trained(thalamus_crop, tmp_path_factory) -> tuple[Path, float, float]:
    adapter = tmp_path_factory.mktemp("memory") / "adapter.safetensors"
    peak, estimate = _peak_and_estimate("train", "--image", str(thalamus_crop / "image.nrrd"), "--labels",
                                        str(thalamus_crop / "drawn.seg.nrrd"), "--out", str(adapter), "--steps", "4")
    return adapter, peak, estimate


def test_training_estimate_is_within_a_factor_of_the_measured_peak(trained):
    _, peak, estimate = trained
    assert estimate / FACTOR <= peak <= estimate * FACTOR, (peak, estimate)


@pytest.mark.parametrize("mode", ["auto", "box"])
def test_propagation_estimate_is_within_a_factor_of_the_measured_peak(trained, thalamus_crop, tmp_path, mode):
    adapter, _, _ = trained
    peak, estimate = _peak_and_estimate("propagate", "--image", str(thalamus_crop / "image.nrrd"), "--adapter",
                                        str(adapter), "--labels", str(thalamus_crop / "drawn.seg.nrrd"),
                                        "--mode", mode, "--out", str(tmp_path / "seg.seg.nrrd"))
    assert estimate / FACTOR <= peak <= estimate * FACTOR, (peak, estimate)


def test_the_estimate_grows_with_what_a_job_holds():
    ct = 512 * 512 * 60
    base = training_memory(ct, 2, labelled_slices=5, segments=3)
    assert training_memory(ct, 2, labelled_slices=15, segments=3).terms["augmented_bank"] == \
        3 * base.terms["augmented_bank"]
    assert training_memory(ct, 2, 5, 8).terms["augmented_bank"] > base.terms["augmented_bank"]
    assert training_memory(ct, 2, 5, 3, batch_size=4).total > base.total
    assert training_memory(ct, 2, 5, 3, on_gpu=True).terms["training_step"] == 0
    assert training_memory(ct, 2, 5, 3, recompute_activations=False).total > base.total   # activations kept
    assert training_memory(ct, 2, 5, 3, model_id="sam_vit_b", input_size=1024).total > 3 * base.total

    auto = propagation_memory(ct, 2, 3, 60, box_mode=False, with_labels=False)
    assert propagation_memory(ct, 2, 10, 60, box_mode=False, with_labels=False).terms["probability_maps"] == \
        ct * 10 * 2
    assert propagation_memory(ct, 2, 3, 60, box_mode=True, with_labels=True).total > auto.total
    larger = propagation_memory(4 * ct, 2, 3, 60, box_mode=False, with_labels=False)
    for term in ("volume", "probability_maps", "label_maps"):
        assert larger.terms[term] == 4 * auto.terms[term]
