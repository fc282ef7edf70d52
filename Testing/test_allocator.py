"""The process's memory settings (allocator.py), each checked in a fresh interpreter: they are process-wide.

SALTSEGMENT_LOW_MEMORY=1 switches glibc to separate mappings for large
blocks; nothing changes without it. Every CLI command puts large tensors on
transparent huge pages, which only works if it asks before torch is imported.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = "from SALTSegmentLib.allocator import return_large_blocks_to_the_system as f; print(f())"
LOW_MEMORY = "SALTSEGMENT_LOW_MEMORY"
HUGE_PAGES = "THP_MEM_ALLOC_ENABLE"
KERNEL_HUGE_PAGES = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _run(code: str, variable: str = HUGE_PAGES, value: str | None = None) -> str:
    """``code``'s output in a fresh interpreter, ``variable`` unset (None) or set to ``value``."""
    env = {k: v for k, v in os.environ.items() if k != variable}
    if value is not None:
        env[variable] = value
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120, check=True).stdout.strip()


def _probe(value: str | None) -> str:
    return _run(PROBE, LOW_MEMORY, value)


def test_default_leaves_the_allocator_alone():
    assert _probe(None) == "False"
    assert _probe("0") == "False"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_low_memory_switch_takes_effect_on_linux():
    assert _probe("1") == "True"



def _kernel_mode() -> str:
    """The kernel's transparent huge page mode: always, madvise or never ('' where there is none)."""
    match = re.search(r"\[(\w+)\]", KERNEL_HUGE_PAGES.read_text()) if KERNEL_HUGE_PAGES.exists() else None
    return match.group(1) if match else ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")
def test_huge_pages_are_asked_for_before_torch_and_a_users_choice_is_kept():
    probe = ("from SALTSegmentLib.allocator import use_huge_pages_for_large_tensors as f; import os; "
             f"print(f(), os.environ['{HUGE_PAGES}'])")
    assert _run(probe) == "True 1"
    assert _run(probe, value="0") == "False 0"
    late = f"import torch; {probe}"                # torch already imported: too late to take effect
    assert _run(late) == "False 1"


def test_the_cli_asks_for_huge_pages_before_anything_imports_torch():
    # Importing the CLI module must not import torch, or the switch main() sets comes too late.
    assert _run("import sys, SALTSegmentLib.cli; print('torch' in sys.modules)") == "False"
    code = ("import os, sys; from SALTSegmentLib import cli; code = cli.main(['models']); "
            f"print(code, os.environ.get('{HUGE_PAGES}'), 'torch' in sys.modules)")
    expected = "1" if sys.platform.startswith("linux") else "None"
    assert _run(code).splitlines()[-1] == f"0 {expected} True"


@pytest.mark.skipif(_kernel_mode() not in ("always", "madvise"),
                    reason="the kernel offers no transparent huge pages here")
def test_a_large_tensor_lands_on_huge_pages():
    probe = ("from SALTSegmentLib.allocator import use_huge_pages_for_large_tensors as f; f(); import re, torch; "
             "t = torch.ones(64 << 18); "   # 64 MiB, touched
             "print(int(re.search(r'AnonHugePages:\\s+(\\d+) kB', open('/proc/self/smaps_rollup').read())[1]))")
    assert int(_run(probe)) >= 32 << 10        # kB: at least half the tensor on 2 MiB pages
    if _kernel_mode() == "madvise":            # only where asked: without the switch, none
        assert int(_run(probe, value="0")) < 32 << 10
