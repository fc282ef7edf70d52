"""Progress reporting for the CLI: a tqdm bar for people, JSON lines for the Slicer worker.

Both reporters take the same calls, so the commands never ask who is
listening. The JSON reporter speaks :mod:`worker_protocol`; the bar reporter
draws on stderr and leaves stdout for the results.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from .propagation import PropagationProgress
from .training import StepReport
from .worker_protocol import emit


class JsonReporter:
    """One protocol event per line on stdout."""

    def start(self, command: str, total: int, **fields: Any) -> None:
        emit("start", command=command, total=total, **fields)

    def train_step(self, report: StepReport) -> None:
        emit("progress", phase="train", step=report.step, total=report.total, loss=round(report.loss, 5),
             lr=report.learning_rate, elapsed_s=round(report.elapsed_s, 2), eta_s=round(report.eta_s, 1))

    def propagation_step(self, progress: PropagationProgress) -> None:
        emit("progress", phase="propagate", step=progress.done, total=progress.total,
             elapsed_s=round(progress.elapsed_s, 2), eta_s=round(progress.eta_s, 1))

    def checkpoint(self, path: str, step: int) -> None:
        emit("checkpoint", path=str(path), step=step)

    def message(self, text: str) -> None:
        emit("message", text=text)

    def result(self, outputs: dict[str, str], summary: dict[str, Any]) -> None:
        emit("result", outputs=outputs, summary=summary)

    def error(self, message: str, hint: Optional[str] = None) -> None:
        emit("error", message=message, hint=hint)

    def close(self) -> None:
        pass


class BarReporter:
    """A tqdm progress bar and short messages on stderr."""

    def __init__(self) -> None:
        self._bar = None

    def start(self, command: str, total: int, **fields: Any) -> None:
        from tqdm import tqdm

        self.close()
        self._bar = tqdm(total=total, desc=command, unit="step", file=sys.stderr, dynamic_ncols=True)

    def _advance(self, done: int, **postfix: Any) -> None:
        if self._bar is None:
            return
        self._bar.update(done - self._bar.n)
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)

    def train_step(self, report: StepReport) -> None:
        self._advance(report.step, loss=f"{report.loss:.4f}", lr=f"{report.learning_rate:.2g}")

    def propagation_step(self, progress: PropagationProgress) -> None:
        # Propagation learns its total only as it runs (box mode counts segments, not slices).
        if self._bar is not None and self._bar.total != progress.total:
            self._bar.total = progress.total
        self._advance(progress.done)

    def checkpoint(self, path: str, step: int) -> None:
        self.message(f"checkpoint at step {step}: {path}")

    def message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def result(self, outputs: dict[str, str], summary: dict[str, Any]) -> None:
        self.close()
        for name, path in outputs.items():
            print(f"{name}: {path}")

    def error(self, message: str, hint: Optional[str] = None) -> None:
        self.close()
        print(f"error: {message}", file=sys.stderr)
        if hint:
            print(f"hint: {hint}", file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class RankReporter:
    """A torchrun rank other than 0: progress, messages and results come from rank 0; errors still show.

    Errors and the step a rank ended at go to stderr with the rank's number,
    so a run's log shows that every rank stopped at the same step.
    """

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def start(self, command: str, total: int, **fields: Any) -> None:
        pass

    def train_step(self, report: StepReport) -> None:
        pass

    def propagation_step(self, progress: PropagationProgress) -> None:
        pass

    def checkpoint(self, path: str, step: int) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def result(self, outputs: dict[str, str], summary: dict[str, Any]) -> None:
        pass

    def finished(self, steps: int, interrupted: bool) -> None:
        print(f"rank {self.rank}: {'stopped' if interrupted else 'finished'} after step {steps}", file=sys.stderr,
              flush=True)

    def error(self, message: str, hint: Optional[str] = None) -> None:
        print(f"rank {self.rank}: error: {message}", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def make_reporter(kind: str):
    return JsonReporter() if kind == "json" else BarReporter()
