"""The parent side of the worker: CLI command lines in, progress out, cancel that reaches the child.

The Slicer module drives the worker with a QProcess; this file holds what
does not need Qt, so it is tested in plain Python: one ``*Command`` class per
CLI command (its options, checked, and its argument list), the environment of the child,
:class:`WorkerMonitor`, which turns the JSON lines of
:mod:`~SALTSegmentLib.host.worker_protocol` into progress text, a loss
history, result paths and errors, and :class:`CancelPlan`, the cancel
policy both drivers follow: ask the worker to stop through its stop file,
then end the whole process tree if it has not stopped after a grace period.
:class:`SubprocessWorker` is the same driver on ``subprocess`` for headless
use and tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from .choices import AXES, DEVICES, METHODS, PROPAGATION_MODES, RANK_PRESETS
from .process_tree import kill_tree
from .stop_request import request_stop
from .worker_protocol import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, parse_line

CLI_MODULE = "SALTSegmentLib.cli"


def _option(name: str, value: Any) -> list[str]:
    return [] if value is None or value == "" else [name, str(value)]


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; use one of {', '.join(choices)}")


def _absent_options(absent: Mapping[str, Sequence[int]]) -> list[str]:
    """``--absent NAME=S1,S2`` per segment with slices the user emptied (sorted), in the mapping's order.

    A value that starts with "-" is attached (``--absent=-x=3``): given
    separately, argparse would take it for an option.
    """
    options = []
    for name, slices in absent.items():
        numbers = sorted({int(i) for i in slices})
        if not numbers:
            continue
        if numbers[0] < 0:
            raise ValueError(f"Invalid absent slice {numbers[0]} for segment {name!r}")
        value = f"{name}={','.join(map(str, numbers))}"
        options += [f"--absent={value}"] if value.startswith("-") else ["--absent", value]
    return options


@dataclass
class TrainCommand:
    """``saltsegment train``: fine-tune an adapter on the labelled slices of one volume.

    With ``init`` (an adapter file) it continues that adapter: the CLI takes
    the parent's base model, method, rank and plane, so those choices are
    left out of the command rather than risk a refusal for a panel setting.
    ``absent`` (segment name -> slices of the labels, along the training
    plane) are slices the user emptied after a propagation: the segment is
    not there, which the labels alone cannot say.
    """

    image: str
    labels: str
    out: str
    method: str = "salt"
    model: str | None = None
    weights: str | None = None
    segments: Sequence[str] = ()
    slices: Sequence[int] = ()
    axis: str = "axial"
    steps: int | None = None
    device: str = "auto"
    rank: str | None = None     # a rank preset name; None keeps the method's default
    stop_file: str | None = None
    init: str | None = None     # an adapter to continue
    absent: Mapping[str, Sequence[int]] = field(default_factory=dict)  # segment name -> slices the user emptied

    def arguments(self) -> list[str]:
        _check_choice("method", self.method, METHODS)
        _check_choice("device", self.device, DEVICES)
        _check_choice("axis", self.axis, AXES)
        if self.rank is not None:
            _check_choice("rank preset", self.rank, RANK_PRESETS)
        if any("," in name for name in self.segments):
            raise ValueError("Segment names used for training cannot contain commas")
        inherited = self.init is not None   # the parent's method, model, plane and rank
        return (["train", "--image", str(self.image), "--labels", str(self.labels), "--out", str(self.out)]
                + (["--init", str(self.init)] if inherited else ["--method", self.method] + _option("--model", self.model))
                + _option("--weights", self.weights)
                + (["--segments", ",".join(self.segments)] if self.segments else [])
                + (["--slices", ",".join(str(int(i)) for i in self.slices)] if self.slices else [])
                + _absent_options(self.absent)
                + ([] if inherited else ["--axis", self.axis]) + _option("--steps", self.steps)
                + ([] if inherited else _option("--rank", self.rank))
                + ["--device", self.device] + _option("--stop-file", self.stop_file) + ["--progress", "json"])


@dataclass
class PropagateCommand:
    """``saltsegment propagate``: segment every slice (or ``first``..``last``) with an adapter.

    ``absent`` (segment name -> slices along the adapter's plane) are slices
    the user emptied after an earlier propagation: the walk ends there.
    """

    image: str
    adapter: str
    out: str
    labels: str | None = None   # the user's drawn slices: kept as drawn, and seeds for box mode
    mode: str = "box"
    first: int | None = None
    last: int | None = None
    device: str = "auto"
    stop_file: str | None = None
    absent: Mapping[str, Sequence[int]] = field(default_factory=dict)  # segment name -> slices the user emptied

    def arguments(self) -> list[str]:
        _check_choice("mode", self.mode, PROPAGATION_MODES)
        _check_choice("device", self.device, DEVICES)
        if (self.first is None) != (self.last is None):
            raise ValueError("Give both ends of the slice range, or neither")
        slice_range = None
        if self.first is not None:
            if self.first < 0 or self.last < self.first:
                raise ValueError(f"Invalid slice range {self.first}:{self.last}")
            slice_range = f"{int(self.first)}:{int(self.last)}"
        return (["propagate", "--image", str(self.image), "--adapter", str(self.adapter), "--out", str(self.out)]
                + _option("--labels", self.labels) + _absent_options(self.absent) + ["--mode", self.mode]
                + ([f"--range={slice_range}"] if slice_range else [])
                + ["--device", self.device] + _option("--stop-file", self.stop_file) + ["--progress", "json"])


@dataclass
class EvaluateCommand:
    """``saltsegment evaluate``: overlap and distance metrics of a prediction against a reference."""

    pred: str
    ref: str
    stop_file = None  # nothing to keep: a cancel ends the process at once

    def arguments(self) -> list[str]:
        return ["evaluate", "--pred", str(self.pred), "--ref", str(self.ref), "--json"]


@dataclass
class ModelsCommand:
    """``saltsegment models``: list base models, or download one (only when the user asked)."""

    download: str | None = None
    stop_file = None  # a download writes beside its target and renames at the end: killing it is safe

    def arguments(self) -> list[str]:
        if self.download:
            return ["models", "--download", self.download, "--progress", "json"]
        return ["models", "--json"]


def worker_command(command, python: str | None = None) -> list[str]:
    """Full argument list of a ``*Command``: ``python -m SALTSegmentLib.cli <command> ...``."""
    return [python or sys.executable, "-m", CLI_MODULE, *command.arguments()]


def worker_environment(module_dir: str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of the child: the module folder first on PYTHONPATH, unbuffered output."""
    environment = dict(os.environ if base is None else base)
    paths = [module_dir] + [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p]
    environment["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    environment["PYTHONUNBUFFERED"] = "1"
    return environment


def format_duration(seconds: float | None) -> str:
    """Human ETA text: ``45 s``, ``3 min 05 s``, ``1 h 02 min``."""
    if seconds is None or seconds != seconds or seconds < 0:
        return ""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {(seconds % 3600) // 60:02d} min"


def last_line(text: str | None, default: str) -> str:
    """The last non-empty line of ``text``, or ``default`` when there is none."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else default


@dataclass
class WorkerOutcome:
    """How a worker run ended. ``status`` is ``"ok"``, ``"cancelled"`` or ``"error"``."""

    status: str
    message: str
    exit_code: int
    outputs: dict[str, str] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    document: Any = None   # the JSON document of ``evaluate --json`` / ``models --json``


class WorkerMonitor:
    """State of one worker run, built from its output; feed it text as it arrives."""

    LOG_LINES = 50

    def __init__(self) -> None:
        self.command: str | None = None
        self.device: str | None = None
        self.pid: int | None = None
        self.phase: str | None = None
        self.step = 0
        self.total: int | None = None
        self.loss: float | None = None
        self.eta_s: float | None = None
        self.elapsed_s: float | None = None
        self.losses: list[tuple[int, float]] = []
        self.checkpoints: list[str] = []
        self.messages: list[str] = []
        self.outputs: dict[str, str] = {}
        self.summary: dict[str, Any] = {}
        self.document: Any = None
        self.error: str | None = None
        self.hint: str | None = None
        self.finished = False
        self.log: list[str] = []
        self._partial = ""

    def feed(self, text: str) -> list[dict[str, Any]]:
        """Take a chunk of output (lines may be split across chunks); return the events it completed."""
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        return [event for event in map(self.feed_line, lines) if event is not None]

    def flush(self) -> list[dict[str, Any]]:
        """Process a last line that ended without a newline."""
        rest, self._partial = self._partial, ""
        event = self.feed_line(rest) if rest.strip() else None
        return [event] if event else []

    def feed_line(self, line: str) -> dict[str, Any] | None:
        event = parse_line(line)
        if event is None:
            self._keep_document_or_log(line)
            return None
        kind = event["event"]
        if kind == "start":
            self.command = event.get("command", self.command)
            self.total = event.get("total", self.total)
            self.device = event.get("device", self.device)
            if isinstance(event.get("pid"), int):
                self.pid = event["pid"]
        elif kind == "progress":
            self.phase = event.get("phase", self.phase)
            self.step = int(event.get("step", self.step))
            self.total = event.get("total", self.total)
            self.eta_s = event.get("eta_s")
            self.elapsed_s = event.get("elapsed_s", self.elapsed_s)
            if event.get("loss") is not None:
                self.loss = float(event["loss"])
                self.losses.append((self.step, self.loss))
        elif kind == "checkpoint":
            self.checkpoints.append(str(event.get("path", "")))
        elif kind == "message":
            self.messages.append(str(event.get("text", "")))
        elif kind == "result":
            self.outputs = {str(k): str(v) for k, v in (event.get("outputs") or {}).items()}
            self.summary = dict(event.get("summary") or {})
            self.finished = True
        elif kind == "error":
            self.error = str(event.get("message", "unknown error"))
            self.hint = event.get("hint")
            self.finished = True
        return event

    def _keep_document_or_log(self, line: str) -> None:
        text = line.strip()
        if text[:1] in ("{", "["):
            try:
                self.document = json.loads(text)
                return
            except json.JSONDecodeError:
                pass
        if text:
            self.log = (self.log + [line.rstrip()])[-self.LOG_LINES:]

    @property
    def fraction(self) -> float:
        """Share of the work done, 0..1 (0 while the total is unknown)."""
        if not self.total:
            return 1.0 if self.finished and self.error is None else 0.0
        return max(0.0, min(1.0, self.step / float(self.total)))

    @property
    def seconds_per_step(self) -> float | None:
        """Measured time of one step (or slice), once the worker reported one."""
        if self.step and self.elapsed_s:
            return float(self.elapsed_s) / self.step
        return None

    def progress_text(self) -> str:
        """One line for the status label: what runs, how far, the loss and the time left."""
        if self.error:
            return f"Error: {self.error}"
        if self.finished:
            return "Done"
        if self.phase is None:
            return f"Starting {self.command or 'worker'}" + (f" on {self.device}" if self.device else "") + "..."
        if self.phase == "download":
            total = f" of {self.total / 1e6:.0f} MB" if self.total else " MB"
            parts = [f"Downloading: {self.step / 1e6:.0f}{total}"]
        else:
            unit = "step" if self.phase == "train" else "slice"
            parts = [f"{'Training' if self.phase == 'train' else self.phase.capitalize()}: "
                     f"{unit} {self.step}/{self.total if self.total else '?'}"]
        if self.loss is not None and self.phase == "train":
            parts.append(f"loss {self.loss:.3f}")
        eta = format_duration(self.eta_s)
        if eta:
            parts.append(f"about {eta} left")
        return " - ".join(parts)

    def outcome(self, exit_code: int, cancelled: bool = False) -> WorkerOutcome:
        """Interpret the end of the run from the events seen and the exit code.

        ``cancelled``: the driver ended the process after a cancel (it did not stop on its own).
        """
        self.flush()
        if exit_code == EXIT_OK and self.error is None:
            return WorkerOutcome("ok", "Done", exit_code, self.outputs, self.summary, self.document)
        if exit_code == EXIT_INTERRUPTED or cancelled:
            kept = self.outputs.get("adapter") or (self.checkpoints[-1] if self.checkpoints else "")
            message = "Cancelled" + (f"; the last adapter was kept: {kept}" if kept else "")
            return WorkerOutcome("cancelled", message, exit_code, self.outputs, self.summary)
        if self.error:
            message = self.error + (f" ({self.hint})" if self.hint else "")
        elif exit_code == EXIT_USAGE:
            message = "The worker rejected its arguments: " + (self.log[-1] if self.log else "usage error")
        elif exit_code < 0:
            message = f"The worker was stopped by signal {-exit_code}"
        else:
            message = f"The worker failed (exit code {exit_code})" + (f": {self.log[-1]}" if self.log else "")
        return WorkerOutcome("error", message, exit_code, self.outputs, self.summary)


class CancelPlan:
    """What Cancel does, for any driver: ask through the stop file, then end the process tree.

    :meth:`request` creates the stop file (when the command has one) and
    returns how many seconds to wait for the worker to stop by itself: long
    enough to finish the step in progress and save the adapter, judged from
    the step times it reported. Without a stop file it returns 0: end the
    tree now (nothing of value is lost: a download or an evaluation).
    """

    MIN_GRACE_S = 20.0
    MAX_GRACE_S = 300.0

    def __init__(self, stop_file: Optional[str]) -> None:
        self.stop_file = stop_file
        self.requested = False

    def request(self, monitor: WorkerMonitor) -> float:
        self.requested = True
        if not self.stop_file:
            return 0.0
        request_stop(self.stop_file)
        return self.grace_seconds(monitor)

    @classmethod
    def grace_seconds(cls, monitor: WorkerMonitor) -> float:
        per_step = monitor.seconds_per_step
        if per_step is None:
            return cls.MIN_GRACE_S * 3  # still loading: the first stop check comes once the model is built
        # Propagation checks between batches of slices; training between steps, then saves the adapter.
        return min(cls.MAX_GRACE_S, max(cls.MIN_GRACE_S, 8 * per_step + 10))


class SubprocessWorker:
    """Run a worker command with ``subprocess``, feeding a :class:`WorkerMonitor` line by line.

    ``on_event(worker, event)`` is called for every protocol event; it may
    call :meth:`cancel`. stderr is merged into stdout so tracebacks end up
    in ``monitor.log``.
    """

    def __init__(self, command: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | None = None,
                 on_event: Callable[["SubprocessWorker", dict[str, Any]], None] | None = None,
                 stop_file: str | None = None) -> None:
        self.command = list(command)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.on_event = on_event
        self.monitor = WorkerMonitor()
        self.process: subprocess.Popen | None = None
        self.cancel_plan = CancelPlan(stop_file)
        self.killed = False
        self._timer: threading.Timer | None = None

    def run(self, timeout: float | None = None) -> WorkerOutcome:
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        env=self.env, cwd=self.cwd, text=True, bufsize=1)
        assert self.process.stdout is not None
        try:
            for line in self.process.stdout:
                event = self.monitor.feed_line(line)
                if event is not None and self.on_event is not None:
                    self.on_event(self, event)
            code = self.process.wait(timeout=timeout)
        finally:
            if self._timer is not None:
                self._timer.cancel()
        return self.monitor.outcome(code, cancelled=self.killed)

    def cancel(self, grace_s: float | None = None) -> None:
        """Ask the worker to stop (stop file); end the whole process tree if it has not after the grace period."""
        if self.process is None or self.process.poll() is not None or self.cancel_plan.requested:
            return
        grace = self.cancel_plan.request(self.monitor)
        if grace_s is not None and self.cancel_plan.stop_file:
            grace = grace_s
        if grace <= 0:
            self.kill_tree()
            return
        self._timer = threading.Timer(grace, self.kill_tree)
        self._timer.daemon = True
        self._timer.start()

    def kill_tree(self) -> list[int]:
        """End the worker, every process below it and the interpreter it announced, at once."""
        if self.process is None or self.process.poll() is not None:
            return []
        self.killed = True
        return kill_tree(self.process.pid, [self.monitor.pid])

    def terminate(self) -> None:
        """SIGTERM to the direct child only (the old way; through a launcher it never reaches the worker)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
