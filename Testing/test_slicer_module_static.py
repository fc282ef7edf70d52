"""Static checks of the Slicer module: what can be verified without the Slicer application."""

from __future__ import annotations

import ast
import os
import py_compile
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "SALTSegment"
MODULE_FILE = MODULE_DIR / "SALTSegment.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "SALTSegment.ui"
LIB_DIR = MODULE_DIR / "SALTSegmentLib"
GUI_MODULES = {"slicer", "qt", "ctk", "vtk", "vtkmodules", "PythonQt", "SegmentEditorEffects"}
# Generated or local-only content that is not part of the module.
SKIPPED_DIRS = {"__pycache__", ".pytest_cache"}


def _module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"), filename=str(MODULE_FILE))


def _ui_root() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


def test_module_compiles(tmp_path):
    py_compile.compile(str(MODULE_FILE), cfile=str(tmp_path / "SALTSegment.pyc"), doraise=True)


def test_module_defines_the_four_scripted_classes():
    classes = {node.name: [ast.unparse(b) for b in node.bases]
               for node in _module_tree().body if isinstance(node, ast.ClassDef)}
    assert "ScriptedLoadableModule" in classes["SALTSegment"]
    assert "ScriptedLoadableModuleWidget" in classes["SALTSegmentWidget"]
    assert "ScriptedLoadableModuleLogic" in classes["SALTSegmentLogic"]
    assert "ScriptedLoadableModuleTest" in classes["SALTSegmentTest"]


def test_module_metadata():
    text = MODULE_FILE.read_text(encoding="utf-8")
    assert 'self.parent.title = "SALT Segment"' in text
    assert 'self.parent.categories = ["Segmentation"]' in text
    assert "2503.16055" in text and "Elsayed" in text


def test_ui_file_is_qt_designer_xml():
    root = _ui_root()
    assert root.tag == "ui" and root.get("version") == "4.0"
    assert root.findtext("class") == "SALTSegment"
    top = root.find("widget")
    assert top is not None and top.get("class") == "qMRMLWidget" and top.get("name") == "SALTSegment"
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "objectNames must be unique"
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    qt_classes = {w.get("class") for w in root.iter("widget") if not w.get("class").startswith("Q")}
    assert qt_classes <= declared, f"custom widgets not declared: {qt_classes - declared}"
    for connection in root.iter("connection"):
        assert connection.findtext("receiver") in names + ["SALTSegment"]


def test_every_ui_name_used_by_the_module_exists():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text(encoding="utf-8")))
    defined = {w.get("name") for w in _ui_root().iter("widget")}
    assert used, "the module uses no UI widget?"
    assert not used - defined, f"missing in {UI_FILE.name}: {sorted(used - defined)}"


def test_node_selectors_get_the_scene():
    root = _ui_root()
    selectors = {w.get("name") for w in root.iter("widget") if w.get("class") == "qMRMLNodeComboBox"}
    connected = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    assert selectors and selectors <= connected


def _runtime_files() -> set[str]:
    """Every file of the module folder a user's install needs (scanned, so new files are caught)."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(MODULE_DIR):
        dirnames[:] = [d for d in dirnames
                       if d not in SKIPPED_DIRS and not d.endswith(".egg-info") and not d.startswith(".")]
        for name in filenames:
            path = Path(dirpath, name)
            relative = path.relative_to(MODULE_DIR).as_posix()
            if name.startswith(".") or name.endswith((".pyc", ".pyo")) or relative == "CMakeLists.txt":
                continue
            if relative.startswith("Resources/") or name.endswith(".py"):
                found.add(relative)
    return found


def _listed_files() -> set[str]:
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    text = re.sub(r"#.*", "", text).replace("${MODULE_NAME}", "SALTSegment")
    listed = set()
    for variable in ("MODULE_PYTHON_SCRIPTS", "MODULE_PYTHON_RESOURCES"):
        match = re.search(r"set\(\s*" + variable + r"\s+(.*?)\)", text, re.S)
        assert match, f"{variable} is not set in SALTSegment/CMakeLists.txt"
        listed |= set(match.group(1).split())
    return listed


def test_every_runtime_file_is_listed_in_cmake():
    runtime, listed = _runtime_files(), _listed_files()
    assert {"SALTSegment.py", "SALTSegmentLib/__init__.py", "Resources/UI/SALTSegment.ui",
            "Resources/Icons/SALTSegment.png"} <= runtime
    missing = sorted(runtime - listed)
    assert not missing, ("Add to SALTSegment/CMakeLists.txt (MODULE_PYTHON_SCRIPTS for .py, "
                         "MODULE_PYTHON_RESOURCES otherwise):\n  " + "\n  ".join(missing))
    stale = sorted(f for f in listed if not (MODULE_DIR / f).is_file())
    assert not stale, f"listed in SALTSegment/CMakeLists.txt but not on disk: {stale}"


def test_cmake_builds_a_tested_scripted_module():
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "slicerMacroBuildScriptedModule" in text and "WITH_GENERIC_TESTS" in text
    assert "slicer_add_python_unittest" in text
    top = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    for needed in ("project(SALTSegment)", "EXTENSION_DEPENDS \"PyTorch\"", "find_package(Slicer",
                   "add_subdirectory(SALTSegment)", "Slicer_EXTENSION_GENERATE_CONFIG", "Slicer_EXTENSION_CPACK",
                   "EXTENSION_CATEGORY \"Segmentation\""):
        assert needed in top


def test_icons_are_128_pixel_pngs():
    for path in (REPO / "Resources" / "SALTSegment.png", MODULE_DIR / "Resources" / "Icons" / "SALTSegment.png"):
        header = path.read_bytes()[:24]
        assert header[:8] == b"\x89PNG\r\n\x1a\n"
        assert int.from_bytes(header[16:20], "big") == 128 and int.from_bytes(header[20:24], "big") == 128


def test_requirements_never_replace_slicer_packages():
    lines = (MODULE_DIR / "Resources" / "requirements.txt").read_text(encoding="utf-8").splitlines()
    names = {re.split(r"[<>=!~;\s]", line.split("#")[0].strip())[0].lower() for line in lines}
    assert not names & {"numpy", "simpleitk", "torch", "torchvision"}


def _imported_modules(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _imported_engine_modules(top_level_only: bool) -> set[str]:
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"), filename=str(MODULE_FILE))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("SALTSegmentLib"):
            if node.module == "SALTSegmentLib":  # from SALTSegmentLib import slicer_bridge
                found |= {f"SALTSegmentLib.{alias.name}" for alias in node.names}
            else:
                found.add(node.module)
    return found


def test_module_does_not_import_torch():
    # Nothing in the module file imports torch, even lazily: all torch work runs in the worker.
    assert "torch" not in _imported_modules(MODULE_FILE, top_level_only=False)
    # At load time (Slicer loads every module at start-up) only the torch-free host package is imported;
    # test_host_boundary.py imports each of those modules with torch blocked.
    top = _imported_engine_modules(top_level_only=True)
    assert top and all(name.startswith("SALTSegmentLib.host") for name in top), top
    lazy = _imported_engine_modules(top_level_only=False) - top
    assert lazy <= {"SALTSegmentLib.slicer_bridge"}, lazy


@pytest.mark.parametrize("path", sorted(LIB_DIR.rglob("*.py")), ids=lambda p: p.relative_to(LIB_DIR).as_posix())
def test_engine_files_do_not_import_gui_modules(path):
    if path.name == "slicer_bridge.py":
        return
    bad = _imported_modules(path, top_level_only=False) & GUI_MODULES
    assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}; only slicer_bridge.py may"


# The properties of Slicer's Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json, which allows no others
# (so the minimum Slicer version cannot be written in the entry: it is in CMakeLists.txt, the README and the
# module's dependency check, and the entry goes to the ExtensionsIndex branches of Slicer 5.10 and later).
CATALOG_PROPERTIES = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                      "build_subdirectory", "enabled", "tier"}


def test_catalog_entry():
    import json

    entry = json.loads((REPO / "SALTSegment.json").read_text(encoding="utf-8"))
    assert entry["category"] == "Segmentation" and entry["build_dependencies"] == ["PyTorch"]
    assert entry["scm_url"].startswith("https://") and entry["scm_revision"]
    assert set(entry) <= CATALOG_PROPERTIES and entry["$schema"].endswith("schema-v1.0.1.json#")


def test_catalog_files_exist_where_the_extension_points():
    """The ExtensionsIndex checker fetches the screenshot and wants a licence file at the root."""
    top = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    prefix = "https://raw.githubusercontent.com/saltsegment/SlicerSALTSegment/main/"
    for variable in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        urls = re.search(variable + r' "([^"]+)"', top).group(1).split()
        for url in urls:
            assert url.startswith(prefix) and (REPO / url[len(prefix):]).is_file(), url
    licence = (REPO / "LICENSE.txt").read_text(encoding="utf-8")
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    assert 'license = "Apache-2.0"' in (REPO / "pyproject.toml").read_text(encoding="utf-8")


def test_minimum_slicer_version_is_declared():
    from SALTSegmentLib.host.dependencies import MINIMUM_SLICER

    version = ".".join(map(str, MINIMUM_SLICER))
    top = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    assert f'SALTSegment_MINIMUM_SLICER_VERSION "{version}"' in top
    assert "find_package(Slicer ${SALTSegment_MINIMUM_SLICER_VERSION}" in top
    assert f"Slicer {version} or later" in (REPO / "README.md").read_text(encoding="utf-8")
