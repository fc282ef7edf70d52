"""Device and precision choice: CUDA, then Apple's MPS, then the CPU; a reduced precision where it pays.

bf16 autocast made the LiteMedSAM train step 1.5-1.7x faster on CPUs with
AVX512-BF16/AMX (README "Performance"), and is the usual choice on CUDA. On
other CPUs it is emulated and slower, so it is off there. On MPS, bf16 depends
on the macOS version and is not reliable: ``auto`` uses fp16 where torch
offers autocast on MPS, else fp32, and an explicit ``bf16`` is refused there.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch

from .host.choices import DEVICES as DEVICE_CHOICES
from .host.choices import PRECISIONS


class DeviceError(RuntimeError):
    """The requested device is not available."""


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(choice: str = "auto") -> torch.device:
    """The device for ``choice``: auto picks CUDA, then MPS, then the CPU."""
    if choice not in DEVICE_CHOICES:
        raise DeviceError(f"Unknown device '{choice}'; choose one of {', '.join(DEVICE_CHOICES)}")
    if choice == "cuda" and not torch.cuda.is_available():
        raise DeviceError("CUDA was requested but no CUDA GPU is available; use --device cpu or auto")
    if choice == "mps" and not mps_available():
        raise DeviceError("MPS was requested but this machine has no Apple GPU available to torch "
                          "(it needs Apple silicon, macOS 12.3 or later and a torch built with MPS); "
                          "use --device cpu or auto")
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps_available() else "cpu")
    return torch.device(choice)


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX), on any operating system.

    Asks torch's own CPU feature query (``torch.cpu``, the cpuinfo library
    torch is built with): it works on Windows and macOS, where there is no
    ``/proc/cpuinfo``. A torch without the query counts as no fast bf16.
    """
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        return any(bool(check()) for check in checks if check is not None)
    except RuntimeError:
        return False


def _mps_autocast_available() -> bool:
    check = getattr(torch.amp, "is_autocast_available", None)
    try:
        return bool(check("mps")) if check is not None else False
    except RuntimeError:
        return False


def autocast_dtype(device: torch.device, precision: str = "auto") -> Optional[torch.dtype]:
    """The autocast dtype for ``device``: ``precision`` is auto, bf16, fp16 or fp32 (None: no autocast)."""
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision '{precision}'; choose {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if device.type == "mps":
        if precision == "bf16":
            raise DeviceError("bf16 is not reliable on Apple MPS; use --precision fp16, fp32 or auto")
        return torch.float16 if _mps_autocast_available() else None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise DeviceError("fp16 autocast needs a GPU (CUDA or MPS); on the CPU use bf16, fp32 or auto")
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_fast_bf16() else None


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """An autocast context that is a no-op when ``dtype`` is None."""
    if dtype is None and device.type == "mps" and not _mps_autocast_available():
        return contextlib.nullcontext()  # torch.autocast refuses a device type it has no autocast for
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
