"""Make the extension catalog's figure: what the module produces on the embedded sample.

Run from the repository root: ``python scripts/make_catalog_figure.py``. It
does what ``saltsegment demo`` does (five axial slices of the embedded T1 MR
sample "drawn" from its reference, SALT fine-tuned on LiteMedSAM, the volume
propagated from those slices) and writes the montage of the propagated volume
to ``Resources/Screenshots/SALTSegment-propagated-sample-montage.png``: axial
slices with the reference outlined in dashed white and the propagated
segments in colour, the hand-labelled slices marked "(labelled)". It is not a
screenshot of the Slicer panel (the application cannot run where this
repository is built); the file name says what it is. The run's report (Dice
per structure, timings) is printed and kept beside the figure as
``SALTSegment-propagated-sample-montage.md``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SALTSegment"))
OUTPUT = ROOT / "Resources" / "Screenshots" / "SALTSegment-propagated-sample-montage.png"


def main() -> int:
    from SALTSegmentLib.host.choices import DEFAULT_STEPS
    from SALTSegmentLib.demo import run_demo

    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="saltsegment-figure-") as folder:
        code = run_demo(Path(folder), steps=DEFAULT_STEPS, device="cpu")
        if code != 0:
            return code
        shutil.copyfile(Path(folder) / "montage.png", OUTPUT)
        report = (Path(folder) / "report.md").read_text(encoding="utf-8")
    OUTPUT.with_suffix(".md").write_text(
        "# SALTSegment-propagated-sample-montage.png\n\n"
        "Made by `python scripts/make_catalog_figure.py` (the `saltsegment demo` run on the embedded sample, "
        f"SALT on LiteMedSAM, {DEFAULT_STEPS} steps, CPU). Dashed white: reference; colour: the propagated "
        "segments; \"(labelled)\": the five slices given as drawing.\n\n" + report, encoding="utf-8")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
