"""The design lives in the repository: docs/architecture.md names files and names that exist, the README
links it, and no file points to design notes outside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "SALTSegment"
ARCHITECTURE = REPO / "docs" / "architecture.md"


def test_the_readme_links_the_architecture():
    assert ARCHITECTURE.is_file()
    development = (REPO / "README.md").read_text(encoding="utf-8").split("## Development", 1)[1]
    assert "(docs/architecture.md)" in development


def _mentioned_files(text: str) -> set[str]:
    return set(re.findall(r"`([\w./-]+\.(?:py|md|sh))`", text)) | set(re.findall(r"`([\w-]+/)`", text))


def test_every_file_the_architecture_names_exists():
    text = ARCHITECTURE.read_text(encoding="utf-8")
    missing = []
    for name in sorted(_mentioned_files(text)):
        candidates = [REPO / name, MODULE / name, MODULE / "SALTSegmentLib" / name]
        if not any(path.exists() for path in candidates):
            missing.append(name)
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"


@pytest.mark.parametrize("dotted", ["host.choices", "adapters.methods.METHOD_SPECS", "adapters.apply_method",
                                    "models.registry.MODEL_REGISTRY", "slices.resolve_axis",
                                    "slices.adapter_axis_in", "slices.put_back_slices",
                                    "slices.occupied_slices", "slices.labelled_slices",
                                    "host.worker_driver.TrainCommand", "host.worker_driver.CancelPlan",
                                    "host.worker_driver.WorkerMonitor", "host.worker_driver.SubprocessWorker",
                                    "pipeline.TrainJob", "training.TrainingConfig", "training.FewShotTrainer",
                                    "volume_io.VolumeGeometry", "preprocessing.SliceGeometry",
                                    "slicer_bridge.volume_array_axis", "host.adapter_metadata.metadata_problems",
                                    "adapters.spectral.SpectralAdapter", "adapter_file.save_adapter"])
def test_the_names_the_architecture_uses_exist(dotted):
    import importlib

    if dotted.startswith("slicer_bridge"):
        pytest.importorskip("slicer", reason="slicer_bridge needs MRML (the slicer-core wheel)")
    short = dotted.split(".", 1)[1] if dotted.startswith(("host.", "adapters.", "models.")) else dotted
    assert short.rsplit(".", 1)[-1] in ARCHITECTURE.read_text(encoding="utf-8")
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            target = importlib.import_module("SALTSegmentLib." + ".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            target = getattr(target, attribute)
        return
    pytest.fail(f"no module for {dotted}")


def test_the_architecture_states_the_adapter_format_version():
    from SALTSegmentLib.host.adapter_metadata import FORMAT_NAME, FORMAT_VERSION

    text = ARCHITECTURE.read_text(encoding="utf-8")
    assert f"`format_version` = `{FORMAT_VERSION}`" in text and FORMAT_NAME in text


def test_nothing_points_to_design_notes_outside_the_repository():
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    offenders = []
    for name in files:
        path = REPO / name
        if path.suffix not in (".py", ".md", ".txt", ".toml", ".json", ".cmake", ".sh", ".ui", "") \
                or not path.is_file() or name.startswith("dev-data/"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for pattern in (r"\bDESIGN\.md\b", r"\bSTYLE\.md\b", r"/work/(shared|notes)"):
            if re.search(pattern, text) and name != "Testing/test_docs.py":
                offenders.append(f"{name}: {pattern}")
    assert not offenders, offenders


QUALITY = REPO / "docs" / "quality" / "README.md"


def test_the_readme_links_the_full_quality_account():
    quality = (REPO / "README.md").read_text(encoding="utf-8").split("## Quality", 1)[1].split("\n## ", 1)[0]
    assert "(docs/quality/README.md)" in quality
    assert QUALITY.is_file()


def _section_titles(path: Path) -> set[str]:
    """Headings, and the bold titles that open a paragraph (``**Where you draw.** ...``)."""
    text = path.read_text(encoding="utf-8")
    headings = re.findall(r"^#+ (.+?)\s*$", text, flags=re.MULTILINE)
    bold = re.findall(r"^\*\*(.+?)[.:]?\*\*", text, flags=re.MULTILINE)
    return set(headings) | set(bold)


def test_every_section_a_source_file_points_to_exists():
    """``README "Quality"`` or ``docs/quality/README.md "Where you draw"`` in code names a section that is there."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    targets = {"README": REPO / "README.md", "docs/quality/README.md": QUALITY}
    titles = {name: _section_titles(path) for name, path in targets.items()}
    found, broken = 0, []
    for name in files:
        text = (REPO / name).read_text(encoding="utf-8", errors="replace")
        flat = re.sub(r"\s*\n\s*(?:#\s*)?", " ", text)   # a reference may wrap, in a docstring or a comment
        for target, title in re.findall(r"(docs/quality/README\.md|README)(?:\.md)?,? \"([^\"]+)\"", flat):
            found += 1
            if not any(t == title or t.startswith(title) for t in titles[target]):
                broken.append(f"{name}: {target} \"{title}\"")
    assert found >= 5, "the pattern no longer finds the references"
    assert not broken, broken
