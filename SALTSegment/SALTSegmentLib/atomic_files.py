"""Atomic file writing: a reader never sees a half-written output.

Every file the package writes (adapter, segmentation, report, download) goes
through :func:`atomic_path`: the writer fills a temporary file in the same
folder (same file system, so the final ``os.replace`` is atomic) and the file
appears at its final name only when writing succeeded.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    The temporary name keeps the full suffix (``.seg.nrrd``, ``.nii.gz``) so
    writers that choose the format from the extension still work. On any
    exception the temporary file is removed and ``path`` is left untouched.
    """
    final = Path(path)
    if not final.parent.is_dir():
        raise FileNotFoundError(f"Output folder does not exist: {final.parent}")
    temporary = final.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{final.name}")
    try:
        yield temporary
        if not temporary.exists():
            raise RuntimeError(f"Nothing was written for {final}")
        os.replace(temporary, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
