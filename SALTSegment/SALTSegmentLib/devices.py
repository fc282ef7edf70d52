"""Device and precision choice: CUDA when present, else the CPU; bf16 where it pays.

bf16 autocast made the LiteMedSAM train step 1.5-1.7x faster on CPUs with
AVX512-BF16/AMX (DESIGN.md section 6), and is the usual choice on CUDA. On
other CPUs it is emulated and slower, so it is off there.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

DEVICE_CHOICES = ("auto", "cuda", "cpu")


class DeviceError(RuntimeError):
    """The requested device is not available."""


def resolve_device(choice: str = "auto") -> torch.device:
    if choice not in DEVICE_CHOICES:
        raise DeviceError(f"Unknown device '{choice}'; choose one of {', '.join(DEVICE_CHOICES)}")
    if choice == "cuda" and not torch.cuda.is_available():
        raise DeviceError("CUDA was requested but no CUDA GPU is available; use --device cpu or auto")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU computes bf16 natively (Linux flags avx512_bf16 or amx_bf16)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(device: torch.device, precision: str = "auto") -> Optional[torch.dtype]:
    """The autocast dtype for ``device``: ``precision`` is auto, bf16 or fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"Unknown precision '{precision}'; choose auto, bf16 or fp32")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_fast_bf16() else None


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """An autocast context that is a no-op when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
