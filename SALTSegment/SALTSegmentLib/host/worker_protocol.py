"""The JSON-lines protocol spoken by the CLI worker (``--progress json``).

The Slicer module runs ``saltsegment train|propagate ... --progress json`` as a
child process and reads one JSON object per stdout line. Every object has an
``event`` field:

``start``       ``{"event": "start", "command": "train", "total": 120, "device": "cpu", "pid": 4242}``
                (``pid``: the interpreter's own process id, which differs from the
                launcher's when Slicer starts the worker through ``PythonSlicer``)
``progress``    ``{"event": "progress", "phase": "train", "step": 10, "total": 120,
                 "loss": 0.41, "lr": 0.002, "elapsed_s": 21.3, "eta_s": 234.0}``
                (``phase`` "propagate" reports slices, "download" bytes; loss/lr absent there)
``checkpoint``  ``{"event": "checkpoint", "path": "...", "step": 50}``
``message``     ``{"event": "message", "text": "..."}``
``result``      ``{"event": "result", "outputs": {"adapter": "..."}, "summary": {...}}``
``error``       ``{"event": "error", "message": "...", "hint": "..."}``

The stream ends with exactly one ``result`` or ``error`` event. Exit codes are
below; ``EXIT_INTERRUPTED`` means a stop request (SIGTERM/SIGINT, or the file
named by ``--stop-file`` appearing) stopped the run at a step boundary: training
saved its last adapter, propagation wrote nothing. Commands that print a JSON
document instead (``evaluate --json``, ``models --json``) print it as one line.
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

EXIT_OK = 0
EXIT_ERROR = 1          # bad input or a failure with a one-line message
EXIT_USAGE = 2          # wrong command-line arguments (argparse)
EXIT_INTERRUPTED = 3    # stopped on request; training saved its last adapter, propagation wrote nothing

EVENTS = ("start", "progress", "checkpoint", "message", "result", "error")


def emit(event: str, stream: TextIO | None = None, **fields: Any) -> None:
    """Write one protocol event as a single JSON line and flush it."""
    if event not in EVENTS:
        raise ValueError(f"Unknown event {event!r}")
    stream = stream or sys.stdout
    stream.write(json.dumps({"event": event, **fields}, default=_jsonable) + "\n")
    stream.flush()


def parse_line(line: str) -> dict[str, Any] | None:
    """Parse one stdout line; ``None`` for lines that are not protocol events."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return None
    if isinstance(value, dict) and value.get("event") in EVENTS:
        return value
    return None


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
