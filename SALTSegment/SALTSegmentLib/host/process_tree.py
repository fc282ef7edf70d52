"""Ending a worker together with every process it started.

The worker runs as ``PythonSlicer -m SALTSegmentLib.cli ...``: CTK's
AppLauncher starts the real interpreter as its child and forwards no signal,
so stopping the launcher alone leaves the interpreter running (holding the
GPU, writing into a pipe nobody reads). :func:`kill_tree` ends the launcher,
its descendants, and the interpreter pid the worker announced (it may have
been re-parented already when the launcher died first). On Windows
``taskkill /T /F`` does the same; ``QProcess.terminate()`` there sends
WM_CLOSE, which console programs ignore.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Iterable, Optional


def _parent_table() -> dict[int, int]:
    """pid -> parent pid of every process this user can see (POSIX)."""
    table: dict[int, int] = {}
    if os.path.isdir("/proc"):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as handle:
                    stat = handle.read().decode("utf-8", "replace")
            except OSError:
                continue
            # The command name is in parentheses and may hold spaces: the fields after its ')' are fixed.
            fields = stat[stat.rfind(")") + 2:].split()
            if len(fields) > 1:
                table[int(entry)] = int(fields[1])
        return table
    output = subprocess.run(["ps", "-A", "-o", "pid=", "-o", "ppid="], capture_output=True, text=True,
                            timeout=30).stdout  # macOS and the BSDs
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            table[int(parts[0])] = int(parts[1])
    return table


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren, ...), parents before children."""
    children: dict[int, list[int]] = {}
    for child, parent in _parent_table().items():
        children.setdefault(parent, []).append(child)
    found, queue = [], list(children.get(pid, []))
    while queue:
        current = queue.pop(0)
        if current in found or current == pid:
            continue
        found.append(current)
        queue.extend(children.get(current, []))
    return found


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped, counts as ended)."""
    if pid <= 0:
        return False
    if sys.platform == "win32":
        output = subprocess.run(["tasklist", "/FI", f"PID eq {pid}", "/NH"], capture_output=True, text=True,
                                timeout=30, creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0)).stdout
        return str(pid) in output
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read().decode("utf-8", "replace")
        return stat[stat.rfind(")") + 2:].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def kill_tree(pid: Optional[int], extra: Iterable[Optional[int]] = ()) -> list[int]:
    """Kill ``pid``, all its descendants and the ``extra`` pids (with theirs); return the pids signalled.

    The whole tree is collected before anything is killed: once a parent dies,
    its children are re-parented and no longer found under it.
    """
    roots = [p for p in [pid, *extra] if p and p > 0]
    if not roots:
        return []
    if sys.platform == "win32":
        for root in roots:
            subprocess.run(["taskkill", "/T", "/F", "/PID", str(root)], capture_output=True, timeout=60,
                           creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
        return roots
    targets: list[int] = []
    for root in roots:
        for member in [root, *descendants(root)]:
            if member not in targets and member != os.getpid():
                targets.append(member)
    signalled = []
    for member in reversed(targets):  # children first, so none is left to run on its own
        try:
            os.kill(member, signal.SIGKILL)
            signalled.append(member)
        except (ProcessLookupError, PermissionError):
            pass
    return signalled
