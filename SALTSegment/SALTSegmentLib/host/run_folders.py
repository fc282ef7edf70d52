"""The folders each worker run uses for its inputs and outputs, and their clean-up.

A run exports the volume (and labels) for the worker: copies as large as the
volume. They are deleted as soon as the run ends; only a trained adapter
stays (it is the current adapter until the user saves it to the library or
trains again). Folders left by a Slicer session that ended abruptly are
removed after a week.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Iterable

PREFIX = "SALTSegment-"
STALE_AFTER_S = 7 * 24 * 3600


def new_run_folder(parent: str, kind: str) -> str:
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f"{PREFIX}{kind}-", dir=parent)


def clean_run_folder(folder: str | None, keep: Iterable[str] = ()) -> None:
    """Delete everything in ``folder`` except the files ``keep``; remove the folder when nothing is kept."""
    if not folder or not os.path.isdir(folder):
        return
    kept = {os.path.abspath(path) for path in keep if path}
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.abspath(path) in kept:
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.remove(path)
            except OSError:
                pass
    if not os.listdir(folder):
        os.rmdir(folder)


def remove_stale_run_folders(parent: str, now: float | None = None, keep: Iterable[str] = ()) -> list[str]:
    """Remove run folders under ``parent`` untouched for a week (not ``keep``); return what was removed."""
    if not os.path.isdir(parent):
        return []
    now = time.time() if now is None else now
    kept = {os.path.abspath(path) for path in keep if path}
    removed = []
    for name in os.listdir(parent):
        path = os.path.join(parent, name)
        if not name.startswith(PREFIX) or not os.path.isdir(path) or os.path.abspath(path) in kept:
            continue
        try:
            if now - os.path.getmtime(path) > STALE_AFTER_S:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        except OSError:
            pass
    return removed
