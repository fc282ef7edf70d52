"""How a running job learns that it should stop: a signal, or a stop file that appears.

Slicer starts the worker through ``PythonSlicer``, CTK's AppLauncher, which
starts the real interpreter as its child and forwards no signal to it; on
Windows there is no SIGTERM for console programs at all. A file named on the
command line (``--stop-file PATH``) works everywhere: the module creates it to
ask for a stop, and the job polls :class:`StopRequest` between steps.
"""

from __future__ import annotations

import os
import signal
from typing import Optional


class StopRequest:
    """True once SIGTERM/SIGINT arrived or the stop file exists; long jobs poll it between steps."""

    def __init__(self, stop_file: Optional[str | os.PathLike] = None) -> None:
        self.requested = False
        self.stop_file = os.fspath(stop_file) if stop_file else None

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means "now"
        self.requested = True

    def __call__(self) -> bool:
        if not self.requested and self.stop_file is not None and os.path.exists(self.stop_file):
            self.requested = True
        return self.requested


def request_stop(stop_file: str | os.PathLike) -> None:
    """Create the stop file (the worker stops at its next step boundary)."""
    with open(stop_file, "w", encoding="utf-8") as handle:
        handle.write("stop\n")
