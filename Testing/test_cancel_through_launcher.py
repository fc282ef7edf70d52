"""Cancel reaches the worker through a launcher that forwards nothing, and leaves no process behind.

Slicer starts the worker as ``PythonSlicer -m SALTSegmentLib.cli ...``:
CTK's AppLauncher starts the real interpreter as its child and forwards no
signal. ``launcher.py`` below does the same (it runs its arguments as a child
and only passes the exit code back), so these tests drive the real CLI the
way the module does: Cancel creates the stop file, and the whole tree is
killed only if the worker has not stopped after the grace period.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from SALTSegmentLib.host.process_tree import descendants, pid_alive
from SALTSegmentLib.host.worker_driver import SubprocessWorker, worker_environment
from SALTSegmentLib.host.worker_protocol import EXIT_INTERRUPTED
from SALTSegmentLib.volume_io import read_label_map

pytestmark = pytest.mark.skipif(os.name == "nt", reason="process checks below use POSIX pids and signals")

MODULE_DIR = str(Path(__file__).resolve().parents[1] / "SALTSegment")
PREVIOUS = b"the previous output: must survive a cancelled run\n"
LAUNCHER = """
import subprocess, sys
# Like CTK's AppLauncher: run the real program as a child, forward no signal, return its exit code.
sys.exit(subprocess.call(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def launcher(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("launcher") / "launcher.py"
    path.write_text(LAUNCHER)
    return path


@pytest.fixture(scope="module")
def case(thalamus_crop, sample_image_path, sample_labels_path, write_untrained_adapter) -> Path:
    """The eight-slice crop plus an untrained LoRA adapter for propagation."""
    from SALTSegmentLib.volume_io import read_image

    _, _, segments = read_label_map(sample_labels_path)
    write_untrained_adapter(thalamus_crop / "lora.safetensors", read_image(sample_image_path)[0], segments[:1])
    return thalamus_crop


def _environment() -> dict:
    env = worker_environment(MODULE_DIR, {k: v for k, v in os.environ.items() if not k.startswith("SALTSEGMENT_")})
    env["OMP_NUM_THREADS"] = "2"
    return env


def _through_launcher(launcher: Path, *cli_args: str) -> list[str]:
    return [sys.executable, str(launcher), sys.executable, "-m", "SALTSegmentLib.cli", *cli_args,
            "--progress", "json"]


class Canceller:
    """Cancels when a progress event reaches ``at_step``; remembers the process tree seen while it ran."""

    def __init__(self, at_step: int, grace_s: float) -> None:
        self.at_step, self.grace_s = at_step, grace_s
        self.step_at_cancel = None
        self.cancelled_at = None
        self.tree: list[int] = []

    def __call__(self, worker: SubprocessWorker, event: dict) -> None:
        if event["event"] == "progress" and self.step_at_cancel is None and event["step"] >= self.at_step:
            self.tree = [worker.process.pid, *descendants(worker.process.pid)]
            self.step_at_cancel = event["step"]
            self.cancelled_at = time.monotonic()
            worker.cancel(grace_s=self.grace_s)


def _assert_no_process_left(worker: SubprocessWorker, tree: list[int]) -> None:
    interpreter = worker.monitor.pid
    assert interpreter is not None and interpreter != worker.process.pid, "the worker did not announce its pid"
    assert interpreter in tree, "the interpreter was not the launcher's child"
    deadline = time.monotonic() + 10
    while any(pid_alive(pid) for pid in tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [pid for pid in tree if pid_alive(pid)] == []


def test_cancelled_training_stops_within_one_step_and_keeps_the_adapter(case, launcher, tmp_path):
    out, stop_file = tmp_path / "adapter.safetensors", tmp_path / "stop"
    command = _through_launcher(launcher, "train", "--image", str(case / "image.nrrd"), "--labels",
                                str(case / "drawn.seg.nrrd"), "--out", str(out), "--method", "lora",
                                "--batch-size", "1", "--steps", "200", "--checkpoint-every", "1000",
                                "--stop-file", str(stop_file))
    canceller = Canceller(at_step=2, grace_s=240)
    worker = SubprocessWorker(command, env=_environment(), on_event=canceller, stop_file=str(stop_file))
    outcome = worker.run(timeout=600)
    seconds = time.monotonic() - canceller.cancelled_at

    assert outcome.exit_code == EXIT_INTERRUPTED and outcome.status == "cancelled", worker.monitor.log
    assert not worker.killed, f"the worker had to be killed ({seconds:.1f} s after Cancel)"
    assert outcome.outputs["adapter"] == str(out)
    from SALTSegmentLib.adapter_file import load_adapter, read_adapter_metadata

    training = read_adapter_metadata(out)["training"]
    assert training["interrupted"] is True
    assert canceller.step_at_cancel <= training["steps"] <= canceller.step_at_cancel + 1
    assert worker.monitor.step <= canceller.step_at_cancel + 1
    load_adapter(out)
    _assert_no_process_left(worker, canceller.tree)
    print(f"training: Cancel at step {canceller.step_at_cancel}, stopped after {training['steps']} steps, "
          f"{seconds:.1f} s after Cancel")


def test_cancelled_propagation_writes_nothing(case, launcher, tmp_path, sample_image_path):
    out, stop_file = tmp_path / "result.seg.nrrd", tmp_path / "stop"
    out.write_bytes(PREVIOUS)
    command = _through_launcher(launcher, "propagate", "--image", str(sample_image_path), "--adapter",
                                str(case / "lora.safetensors"), "--out", str(out), "--mode", "auto",
                                "--stop-file", str(stop_file))
    canceller = Canceller(at_step=1, grace_s=240)
    worker = SubprocessWorker(command, env=_environment(), on_event=canceller, stop_file=str(stop_file))
    outcome = worker.run(timeout=600)
    seconds = time.monotonic() - canceller.cancelled_at

    assert outcome.exit_code == EXIT_INTERRUPTED and outcome.status == "cancelled", worker.monitor.log
    assert not worker.killed
    assert worker.monitor.error == "propagation stopped before the end; nothing was written"
    assert worker.monitor.step < worker.monitor.total
    assert out.read_bytes() == PREVIOUS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.seg.nrrd", "stop"]
    _assert_no_process_left(worker, canceller.tree)
    print(f"propagation: Cancel at slice {canceller.step_at_cancel}, stopped {seconds:.1f} s after Cancel")


STUBBORN = """
import os, signal, sys, time
from SALTSegmentLib.host.worker_protocol import emit
signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a worker stuck in a long step: no stop check, no signal
emit("start", command="train", total=1000, device="cpu", pid=os.getpid())
for step in range(1, 1000):
    emit("progress", phase="train", step=step, total=1000, elapsed_s=0.05 * step)
    time.sleep(0.05)
"""


def test_a_worker_that_does_not_stop_is_killed_with_its_launcher(launcher, tmp_path):
    stop_file = tmp_path / "stop"
    command = [sys.executable, str(launcher), sys.executable, "-c", STUBBORN]
    canceller = Canceller(at_step=3, grace_s=1.0)
    worker = SubprocessWorker(command, env=_environment(), on_event=canceller, stop_file=str(stop_file))
    outcome = worker.run(timeout=120)
    assert stop_file.exists()                   # it was asked first
    assert worker.killed and outcome.status == "cancelled"
    assert worker.monitor.step < 100
    _assert_no_process_left(worker, canceller.tree)


def test_terminating_the_launcher_alone_leaves_the_worker_running(launcher, tmp_path):
    """The defect this file guards against: SIGTERM to the launcher never reaches the interpreter."""
    process = subprocess.Popen([sys.executable, str(launcher), sys.executable, "-c", STUBBORN],
                               stdout=subprocess.PIPE, text=True, env=_environment())
    try:
        line = process.stdout.readline()
        interpreter = int(__import__("json").loads(line)["pid"])
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        time.sleep(0.3)
        assert pid_alive(interpreter), "the launcher forwarded the signal after all"
    finally:
        from SALTSegmentLib.host.process_tree import kill_tree

        kill_tree(None, [interpreter])
        process.stdout.close()
    deadline = time.monotonic() + 10
    while pid_alive(interpreter) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(interpreter)
