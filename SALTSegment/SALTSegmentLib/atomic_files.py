"""Atomic file writing: a reader never sees a half-written output.

Every file the package writes (adapter, segmentation, report, download) goes
through :func:`atomic_path`: the writer fills a file with the final name in a
private folder beside the destination (same file system, so the final
``os.replace`` is atomic) and the file appears at its final name only when
writing succeeded. Writers of detached formats (``.nhdr``, ``.mhd``) put a
data file beside the header and name it after the header; it is written
under its final name too and moved into place with the header, so nothing
temporary is left and the header points at the right file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

STAGING_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a path with the final name in a private folder beside ``path``; move what was written into place.

    Every file the writer created in that folder (a detached format's data
    file too) is moved beside ``path``, the named file last, with the
    permissions the user's umask gives a new file. On any exception the
    folder is removed and ``path`` is left untouched.
    """
    final = Path(path)
    if not final.parent.is_dir():
        raise FileNotFoundError(f"Output folder does not exist: {final.parent}")
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=final.parent))
    temporary = staging / final.name
    try:
        yield temporary
        if not temporary.is_file():
            raise RuntimeError(f"Nothing was written for {final}")
        _publish(staging, temporary, final.parent)
    except Exception as error:
        if _disk_full(error, final.parent):
            # Writers report a full disk in their own words (SimpleITK, safetensors); say it plainly.
            raise OSError(errno.ENOSPC, "No space left on device", str(final)) from error
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, named: Path, folder: Path) -> None:
    """Move the written files into ``folder``: companions (data files) first, so the header never dangles."""
    mode = new_file_mode()
    companions = sorted(p for p in staging.iterdir() if p != named)
    for written in [*companions, named]:
        os.chmod(written, mode)  # safetensors creates 0600 files; a shared adapter library needs the umask's mode
        os.replace(written, folder / written.name)


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file under this process's umask (0o644 under the usual 022)."""
    return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask, read without changing it where the system allows (Linux), else set and restored."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    current = os.umask(0o077)  # restrictive while it is changed, should another thread create a file now
    os.umask(current)
    return current


def _disk_full(error: BaseException, folder: Path, reserve: int = 1 << 20) -> bool:
    """Whether a failed write was (most likely) a full disk: ENOSPC, or under 1 MiB left in ``folder``."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(folder).free < reserve
    except OSError:
        return False
