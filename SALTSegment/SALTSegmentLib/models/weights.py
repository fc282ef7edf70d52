"""Model weight files: checksums, the per-user cache, downloads and safe loading.

Downloads happen only when the user asks (``saltsegment models --download``
or the module's button): size shown, progress reported, sha256 verified before
the file appears in the cache under its final name. Checkpoints load with
``torch.load(weights_only=True)``: no pickled code is ever executed.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.request
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ..atomic_files import atomic_path


class WeightsError(RuntimeError):
    """A weights file is missing, corrupt or does not fit the model."""


def sha256_of(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_dir() -> Path:
    """Per-user cache for downloaded weights (``SALTSEGMENT_CACHE`` overrides it)."""
    override = os.environ.get("SALTSEGMENT_CACHE")
    if override:
        return Path(override)
    import platformdirs

    return Path(platformdirs.user_cache_dir("SALTSegment", appauthor=False)) / "weights"


def verify_file(path: str | os.PathLike, sha256: Optional[str], size: Optional[int] = None,
                what: str = "weights") -> None:
    """Raise :class:`WeightsError` unless the file exists with the expected size and checksum."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{what} file not found: {path}")
    if size is not None and path.stat().st_size != size:
        raise WeightsError(
            f"{what} file {path} has {path.stat().st_size:,} bytes, expected {size:,}: it is truncated or "
            "not the right file")
    if sha256 is not None:
        actual = sha256_of(path)
        if actual != sha256:
            raise WeightsError(f"{what} file {path} fails its sha256 check ({actual[:12]}... != {sha256[:12]}...)")


ProgressCallback = Callable[[int, Optional[int]], None]


def download(url: str, destination: str | os.PathLike, sha256: str,
             progress: Optional[ProgressCallback] = None, chunk_size: int = 1 << 20) -> Path:
    """Download ``url`` to ``destination``, verifying sha256 before the file appears.

    ``progress(bytes_done, bytes_total)`` is called after every chunk. A
    truncated transfer or a checksum mismatch leaves nothing at
    ``destination`` (the partial file is written beside it and removed).

    Why not ``torch.hub.download_url_to_file`` (same temp-file-then-move and
    sha256 prefix check): this one also (1) reports progress to a callback,
    which the Slicer worker turns into JSON progress events (torch's only
    draws a tqdm bar on stderr); (2) refuses a transfer shorter than its
    Content-Length, which torch keeps if no hash is given; (3) times out
    after 60 s without data instead of waiting forever; (4) says what
    failed as a :class:`WeightsError` with the byte counts, which the CLI
    prints as one line.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(destination) as temporary:
        digest = hashlib.sha256()
        total, done = None, 0
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(temporary, "wb") as output:
                total = response.headers.get("Content-Length")
                total = int(total) if total is not None else None
                while True:
                    chunk = response.read(chunk_size)
                    if not chunk:
                        break
                    output.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
        except (OSError, http.client.HTTPException) as error:  # HTTP errors, timeouts, cut connections
            got = f" after {done:,}" + (f" of {total:,}" if total is not None else "") + " bytes" if done else ""
            raise WeightsError(f"Download of {url} failed{got}: {error}; nothing was saved") from None
        if total is not None and done != total:
            raise WeightsError(f"Download of {url} stopped after {done:,} of {total:,} bytes")
        if digest.hexdigest() != sha256:
            raise WeightsError(f"Download of {url} fails its sha256 check; nothing was saved")
    return destination


def read_state_dict(path: str | os.PathLike, model_id: str) -> dict[str, torch.Tensor]:
    """Read a checkpoint's state dict without unpickling code (``weights_only=True``)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or unsafe files
        first_line = (str(error).strip().splitlines() or ["unreadable file"])[0]
        raise WeightsError(f"Cannot read {model_id} weights from {path}: {first_line}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict for {model_id}")
    return state


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike,
                           model_id: str) -> None:
    """Load every tensor or refuse, naming the model, the file and the first offending keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or mismatched:
        details = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if keys:
                details.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise WeightsError(f"{path} is not a {model_id} checkpoint: " + "; ".join(details))
    model.load_state_dict(state, strict=True)
