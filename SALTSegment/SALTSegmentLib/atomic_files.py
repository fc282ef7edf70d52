"""Atomic file writing: a reader never sees a half-written output.

Every file the package writes (adapter, segmentation, report, download) goes
through :func:`atomic_path`: the writer fills a temporary file in the same
folder (same file system, so the final ``os.replace`` is atomic) and the file
appears at its final name only when writing succeeded.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
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
    except Exception as error:
        if _disk_full(error, final.parent):
            # Writers report a full disk in their own words (SimpleITK, safetensors); say it plainly.
            raise OSError(errno.ENOSPC, "No space left on device", str(final)) from error
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def _disk_full(error: BaseException, folder: Path, reserve: int = 1 << 20) -> bool:
    """Whether a failed write was (most likely) a full disk: ENOSPC, or under 1 MiB left in ``folder``."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(folder).free < reserve
    except OSError:
        return False
