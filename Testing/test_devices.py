"""Device and precision choice, with the availability of CUDA and Apple's MPS faked."""

from __future__ import annotations

import os

import pytest
import torch

from SALTSegmentLib import devices


@pytest.fixture()
def machine(monkeypatch):
    """Set which accelerators torch reports: machine(cuda=..., mps=..., mps_autocast=...)."""

    def set_machine(cuda=False, mps=False, mps_autocast=True, cuda_bf16=True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
        monkeypatch.setattr(devices, "_mps_autocast_available", lambda: mps_autocast)

    return set_machine


@pytest.mark.parametrize("cuda,mps,expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu"),
                                               (True, False, "cuda")])
def test_auto_picks_cuda_then_mps_then_cpu(machine, cuda, mps, expected):
    machine(cuda=cuda, mps=mps)
    assert devices.resolve_device("auto").type == expected


def test_explicit_devices_are_checked(machine):
    machine(cuda=False, mps=False)
    assert devices.resolve_device("cpu").type == "cpu"
    with pytest.raises(devices.DeviceError, match="CUDA was requested"):
        devices.resolve_device("cuda")
    with pytest.raises(devices.DeviceError, match="MPS was requested"):
        devices.resolve_device("mps")
    with pytest.raises(devices.DeviceError, match="Unknown device"):
        devices.resolve_device("tpu")
    machine(mps=True)
    assert devices.resolve_device("mps").type == "mps"


def test_precision_on_mps_is_fp16_where_torch_has_autocast_else_fp32(machine):
    mps = torch.device("mps")
    machine(mps=True, mps_autocast=True)
    assert devices.autocast_dtype(mps, "auto") is torch.float16
    assert devices.autocast_dtype(mps, "fp16") is torch.float16
    assert devices.autocast_dtype(mps, "fp32") is None
    with pytest.raises(devices.DeviceError, match="bf16 is not reliable on Apple MPS"):
        devices.autocast_dtype(mps, "bf16")
    machine(mps=True, mps_autocast=False)
    assert devices.autocast_dtype(mps, "auto") is None
    # no autocast for the device type: the context is a plain no-op instead of torch's error
    with devices.autocast(mps, None):
        pass


def test_precision_on_cuda_and_cpu(machine, monkeypatch):
    machine(cuda=True)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert devices.autocast_dtype(cuda, "auto") is torch.bfloat16
    assert devices.autocast_dtype(cuda, "fp16") is torch.float16
    machine(cuda=True, cuda_bf16=False)
    assert devices.autocast_dtype(cuda, "auto") is None
    monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda: False)
    assert devices.autocast_dtype(cpu, "auto") is None
    monkeypatch.setattr(devices, "cpu_has_fast_bf16", lambda: True)
    assert devices.autocast_dtype(cpu, "auto") is torch.bfloat16
    with pytest.raises(devices.DeviceError, match="fp16 autocast needs a GPU"):
        devices.autocast_dtype(cpu, "fp16")
    with pytest.raises(ValueError, match="Unknown precision"):
        devices.autocast_dtype(cpu, "int8")


def test_fast_bf16_comes_from_torchs_cpu_query_on_every_system(monkeypatch):
    """No /proc/cpuinfo read (absent on Windows and macOS): torch's own CPU feature query decides."""
    devices.cpu_has_fast_bf16.cache_clear()
    try:
        expected = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        assert devices.cpu_has_fast_bf16() == expected
        if os.path.isfile("/proc/cpuinfo"):  # on Linux it agrees with the kernel's flags
            flags = open("/proc/cpuinfo", encoding="utf-8").read()
            assert expected == ("avx512_bf16" in flags or "amx_bf16" in flags or "amx_tile" in flags)
        devices.cpu_has_fast_bf16.cache_clear()
        monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
        monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
        assert devices.cpu_has_fast_bf16() is False           # a torch without the query: no bf16 by default
    finally:
        devices.cpu_has_fast_bf16.cache_clear()
