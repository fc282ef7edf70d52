"""SALTSEGMENT_LOW_MEMORY=1 switches glibc to separate mappings for large blocks; nothing changes without it.

Checked in a fresh interpreter each time: the setting is process-wide, and
this suite's own process must keep the default (it is faster).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = "from SALTSegmentLib.allocator import return_large_blocks_to_the_system as f; print(f())"


def _probe(value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "SALTSEGMENT_LOW_MEMORY"}
    if value is not None:
        env["SALTSEGMENT_LOW_MEMORY"] = value
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env,
                          timeout=60, check=True).stdout.strip()


def test_default_leaves_the_allocator_alone():
    assert _probe(None) == "False"
    assert _probe("0") == "False"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_low_memory_switch_takes_effect_on_linux():
    assert _probe("1") == "True"
