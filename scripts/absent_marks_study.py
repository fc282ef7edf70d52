"""What a user's correction of an end is worth once it is kept: slices marked without a structure.

A walk that goes a slice or two past a structure's end is the commonest
error left (docs/quality/README.md "Where it falls short"). The user sees it and empties the
segment on those slices. Before marks existed, the next *Propagate* painted
them again (an empty slice was not a label); now the emptied slice is a
mark (``--absent NAME=SLICES``; in Slicer, a slice emptied after a
propagation), the walk stops before it and the segment stays empty there.

For each development case and count (drawn evenly, ``bench quality``'s
``per_structure``), SALT at the defaults is trained once and propagated;
then, for every end that went past the true end, the user marks the first
slice past the true end (one action per such end) and propagates again with
the same adapter. Printed: Dice on the unlabelled slices before and after,
Fill between slices on the same slices, ends within two slices, and the
structure runs more than 0.02 below Fill. A second variant also retrains
with the marks (what *Fine-tune* after the correction gives).

    python scripts/absent_marks_study.py --dev dev-data [--cases a,b] [--counts 3,5] [--retrain]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from SALTSegmentLib import preprocessing as pp
from SALTSegmentLib.array_jobs import fine_tune, propagate
from SALTSegmentLib.bench.cases import development_cases, sample_case
from SALTSegmentLib.bench.quality import extent_errors, true_extent, unlabelled_dice
from SALTSegmentLib.interpolation import fill_between_slices
from SALTSegmentLib.models import load_model
from SALTSegmentLib.propagation import PropagationConfig
from SALTSegmentLib.training import FewShotData, TrainingConfig


def overshoot_marks(case, extents) -> dict[str, list[int]]:
    """Per structure, the first slice past each true end that the propagation painted."""
    marks: dict[str, list[int]] = {}
    by_name = {e.name: e for e in extents}
    for segment in case.segments:
        extent = by_name.get(segment.name)
        if extent is None:
            continue
        first, last = true_extent(case, segment)
        slices = ([first - 1] if extent.first.slice < first else []) + ([last + 1] if extent.last.slice > last else [])
        if slices:
            marks[segment.name] = slices
    return marks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dev", required=True)
    parser.add_argument("--cases", default="sample,ch2_aal_small,ch2_aal_posterior_fossa,ch2_aal_coronal")
    parser.add_argument("--counts", default="3,5")
    parser.add_argument("--retrain", action="store_true", help="also train again with the marks")
    args = parser.parse_args()
    names = [n for n in args.cases.split(",") if n]
    rows = []
    cases = ([sample_case()] if "sample" in names else []) + development_cases(args.dev, names)
    for case in cases:
        for count in (int(c) for c in args.counts.split(",")):
            start = time.perf_counter()
            labelled = case.labelled_slices(count, "per_structure")
            drawn = case.drawn(labelled)
            fill = unlabelled_dice(fill_between_slices(drawn, case.axis), case, labelled)
            intensity = pp.parse_intensity("auto", case.image)
            data = FewShotData(case.image, drawn, case.geometry.spacing, case.segments, intensity, case.axis, labelled)
            adapted = fine_tune(load_model("lite_medsam"), data, TrainingConfig(method="salt")).adapted()
            config = PropagationConfig(mode="box", estimate=False)
            spacing = case.geometry.spacing
            before = propagate(adapted, case.image, spacing, case.axis, config, drawn, labelled)
            marks = overshoot_marks(case, before.extents)
            after = propagate(adapted, case.image, spacing, case.axis, config, drawn, labelled, absent=marks)
            results = {"before": before, "marked": after}
            if args.retrain and marks:
                marked_data = FewShotData(case.image, drawn, case.geometry.spacing, case.segments, intensity,
                                          case.axis, labelled, absent=marks)
                retrained = fine_tune(load_model("lite_medsam"), marked_data, TrainingConfig(method="salt")).adapted()
                results["retrained"] = propagate(retrained, case.image, spacing, case.axis, config, drawn, labelled,
                                                 absent=marks)
            line = [f"{case.name} {count}: Fill {np.mean(list(fill.values())):.3f}",
                    f"marks {sum(len(v) for v in marks.values())}"]
            row = {"case": case.name, "count": count, "fill": fill, "marks": marks}
            for name, result in results.items():
                scores = unlabelled_dice(result.labels, case, labelled)
                within, total, _ = extent_errors(case, result.extents)
                below = [s for s in scores if scores[s] < fill[s] - 0.02]
                row[name] = {"dice": scores, "within": within, "total": total}
                line.append(f"{name} {np.mean(list(scores.values())):.3f} ends {within}/{total} "
                            f"below Fill-0.02: {', '.join(below) or 'none'}")
            rows.append(row)
            print(" | ".join(line) + f" ({time.perf_counter() - start:.0f} s)", flush=True)
    for name in ("before", "marked", "retrained"):
        done = [r for r in rows if name in r]
        if done:
            mean = np.mean([np.mean(list(r[name]["dice"].values())) for r in done])
            within = sum(r[name]["within"] for r in done)
            total = sum(r[name]["total"] for r in done)
            print(f"{name}: mean {mean:.4f} over {len(done)} runs, ends within 2: {within}/{total}")


if __name__ == "__main__":
    main()
