"""One run at a time per output file: a lock file beside the output, made with O_EXCL.

Two runs writing the same ``--out`` would otherwise both succeed and leave
the last writer's file without a word. The lock file records the holder's
process id, its start time and the host, so a lock left by a run that was
killed (SIGKILL, power loss) is recognised as stale and taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator, Optional

import psutil

LOCK_SUFFIX = ".lock"
# A lock file still empty this long after it was made belongs to a run that died while making it.
_EMPTY_LOCK_GRACE_S = 10.0


class OutputBusyError(RuntimeError):
    """Another run is writing the same output file."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint  # read by the CLI's one-line error report


def lock_path_for(output: str | os.PathLike) -> Path:
    output = Path(output)
    return output.with_name(output.name + LOCK_SUFFIX)


def _this_process() -> dict:
    process = psutil.Process()
    return {"pid": process.pid, "started": process.create_time(), "host": socket.gethostname()}


def _holder_alive(holder: dict) -> bool:
    """Whether the process that wrote ``holder`` still runs (a reused pid has another start time)."""
    if holder.get("host") != socket.gethostname():
        return True  # a run on another machine sharing the folder: it cannot be checked from here
    try:
        process = psutil.Process(int(holder["pid"]))
        return abs(process.create_time() - float(holder["started"])) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, TypeError, ValueError):
        return False


def _read_holder(lock: Path) -> Optional[dict]:
    """The lock's contents; None when it is unreadable (just being written, or damaged)."""
    try:
        holder = json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return holder if isinstance(holder, dict) else None


def _is_stale(lock: Path, holder: Optional[dict]) -> bool:
    if holder is None:
        try:
            return time.time() - lock.stat().st_mtime > _EMPTY_LOCK_GRACE_S
        except FileNotFoundError:
            return True
    return not _holder_alive(holder)


@contextlib.contextmanager
def output_lock(output: str | os.PathLike) -> Iterator[Path]:
    """Hold ``<output>.lock`` while writing ``output``; refuse if a live run holds it, take over a stale one."""
    lock = lock_path_for(output)
    me = _this_process()
    for _ in range(3):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_holder(lock)
            if not _is_stale(lock, holder):
                pid = holder.get("pid", "?") if holder else "?"
                raise OutputBusyError(
                    f"{output} is being written by another saltsegment run (process {pid}); "
                    "two runs must not write the same output", f"wait for that run to end, choose another "
                    f"output path, or delete {lock.name} if no such run is going") from None
            with contextlib.suppress(FileNotFoundError):
                if _read_holder(lock) == holder:  # still the stale holder's file, not a newcomer's
                    lock.unlink()
            continue
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump(me, handle)
        break
    else:
        raise OutputBusyError(f"Could not lock {output} for writing", f"delete {lock.name} and run again")
    try:
        yield lock
    finally:
        if _read_holder(lock) == me:
            lock.unlink()
