"""Offline, model-free: where does a structure end, given its drawn slices and (perhaps) its length?

Box propagation bounds each walk past the outermost drawn slice
(``extent.spacing_limit``). With a length known from other drawings of the
structure (a site adapter's training cases, ``structure_length``), the
question is how to place that length around the drawn slices. This study
answers it on real anatomy without any model: every label of the atlases in
Debian ``mricron-data`` (AAL without the held-out amygdala and pallidum,
JHU white matter, Harvard-Oxford cortical, Brodmann), on each of the three
axes, at 1 and 3 mm slices, drawn on 2, 3 or 5 slices placed four ways:

- ``even``: evenly inside the extent, as ``bench quality`` draws;
- ``inset``: the outer drawn slices 1-3 slices in from the true ends;
- ``random``: anywhere strictly inside;
- ``consecutive``: on neighbouring slices around the middle, as
  ``bench quality --protocol consecutive`` draws (many users draw a lesion
  this way).

For each pair of ends it prints how often each rule lands within two slices
of the true end, with the known length exact and with 20% (log-normal) error
(the drawing's own rules do not use it: their rows repeat).

Last, whether the image itself marks an end: for the labels on ch2's own grid
(the T1 they were drawn on), the mean intensity change under a slice's mask
to the next slice out, in units of the structure's median slice-to-slice
change, past its true end slice and from slices one and two inside it.

    python scripts/extent_study.py [--templates /usr/share/mricron/templates]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import SimpleITK as sitk

from SALTSegmentLib.bench.cases import consecutive_slices, slices_inside
from SALTSegmentLib.extent import ExtentRule, spacing_limit

ATLASES = {"aal": ("Amygdala", "Pallidum"),          # held out: never looked at
           "JHU-WhiteMatter-labels-1mm": (), "HarvardOxford-cort-maxprob-thr0-1mm": (), "brodmann": ()}
PLACEMENTS = ("even", "inset", "random", "consecutive")
COUNTS = (2, 3, 5)


def label_names(templates: Path, atlas: str) -> dict[int, str]:
    names: dict[int, str] = {}
    path = templates / f"{atlas}.nii.txt"
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0].isdigit():
                names[int(parts[0])] = parts[1]
    return names


def place(first: int, last: int, count: int, placement: str, rng: np.random.Generator) -> list[int]:
    """The slices a user draws on a structure occupying ``first``..``last``."""
    if last - first + 1 <= count or placement == "even":
        return slices_inside(first, last, count)
    if placement == "consecutive":
        return consecutive_slices(first, last, count)
    if placement == "inset":
        length = last - first
        inset = [min(int(rng.integers(1, 4)), max(1, length // 4)) for _ in range(2)]
        return sorted({int(round(p)) for p in np.linspace(first + inset[0], last - inset[1], count)})
    inner = np.arange(first + 1, last)
    return sorted(rng.choice(inner, size=min(count, inner.size), replace=False).tolist())


def atlas_structures(templates: Path, grid: Optional[tuple[int, ...]] = None) -> Iterator[np.ndarray]:
    """The mask of every atlas label of 200 voxels or more, the held-out ones left out.

    ``grid``: only the atlases on that voxel grid (those drawn on ch2 share its shape).
    """
    for atlas, held_out in ATLASES.items():
        names = label_names(templates, atlas)
        volume = sitk.GetArrayFromImage(sitk.ReadImage(str(templates / f"{atlas}.nii.gz"))).astype(np.int32)
        if grid is not None and volume.shape != grid:
            continue
        for label in np.unique(volume):
            name = names.get(int(label), str(label))
            if label == 0 or any(h in name for h in held_out):
                continue
            mask = volume == label
            if mask.sum() >= 200:
                yield mask


def structure_profiles(templates: Path):
    """(area per slice) for every label, axis and slice thickness (1 and 3 mm, 1 mm isotropic atlases)."""
    for mask in atlas_structures(templates):
        for axis in range(3):
            areas = mask.sum(axis=tuple(i for i in range(3) if i != axis)).astype(float)
            yield areas, 1.0
            yield areas[::3], 3.0


def rules(drawn: list[int], areas: np.ndarray, step_mm: float, length: float) -> dict[str, tuple[int, int]]:
    """Each rule's reach past the first and the last drawn slice (in slices)."""
    pixel_mm2 = 1.0
    drawn_areas = {i: int(areas[i]) for i in drawn}
    radius = math.sqrt(max(drawn_areas.values()) * pixel_mm2 / math.pi) / step_mm
    known = length / 2 / radius                         # radii each side of the drawn middle

    def both(rule: ExtentRule, known_reach=None) -> tuple[int, int]:
        return tuple(spacing_limit(rule, drawn_areas, end, pixel_mm2, step_mm, known_reach)[0]
                     for end in (drawn[0], drawn[-1]))

    evenly = max(1, int(round(max(length - (drawn[-1] - drawn[0]), 0) / 2)))
    return {"drawing only (spacing)": both(ExtentRule(taper_bound=None)),
            "drawing only, spacing 0.75": both(ExtentRule(spacing_bound=0.75, taper_bound=None)),
            "drawing, area taper x0.5 (default)": both(ExtentRule()),
            "drawing, area taper x1": both(ExtentRule(taper_bound=1.0)),
            "known length, shared by radius": both(ExtentRule(), known),
            "known length, shared evenly": (evenly, evenly)}


def image_change_past_ends(templates: Path) -> dict[str, np.ndarray]:
    """Intensity change under a slice's mask to the next slice out: past the true end vs from inside."""
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(templates / "ch2.nii.gz"))).astype(np.float32)
    changes: dict[str, list[float]] = {"past the true end": [], "inside": []}
    for structure in atlas_structures(templates, grid=image.shape):
        for axis in range(3):
            mask, intensity = np.moveaxis(structure, axis, 0), np.moveaxis(image, axis, 0)
            occupied = np.flatnonzero(mask.any(axis=(1, 2)))
            if occupied[-1] - occupied[0] < 6:
                continue

            def change(index: int, step: int) -> float:
                inside = mask[index]
                if not inside.any() or not 0 <= index + step < mask.shape[0]:
                    return float("nan")
                return float(np.abs(intensity[index + step][inside] - intensity[index][inside]).mean())

            first, last = int(occupied[0]), int(occupied[-1])
            typical = np.nanmedian([change(i, 1) for i in range(first + 1, last - 1)])
            for end, step in ((first, -1), (last, 1)):
                changes["past the true end"].append(change(end, step) / typical)
                changes["inside"] += [change(end - step * d, step) / typical for d in (1, 2)]
    return {k: np.array(v)[np.isfinite(v)] for k, v in changes.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--templates", type=Path, default=Path("/usr/share/mricron/templates"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    errors: dict[tuple[float, str, str], list[int]] = {}
    for areas, step in structure_profiles(args.templates):
        occupied = np.flatnonzero(areas > 0)
        if occupied.size < 3:
            continue
        first, last = int(occupied[0]), int(occupied[-1])
        for placement in PLACEMENTS:
            for count in COUNTS:
                drawn = [i for i in place(first, last, count, placement, rng) if areas[i] > 0]
                if len(drawn) < 2:
                    continue
                for noise in (0.0, 0.2):
                    length = (last - first) * math.exp(rng.normal(0, noise)) if noise else float(last - first)
                    for name, (before, after) in rules(drawn, areas, step, length).items():
                        errors.setdefault((noise, placement, name), []).extend(
                            [before - (drawn[0] - first), after - (last - drawn[-1])])
    for noise in (0.0, 0.2):
        print(f"\nknown length {'exact' if not noise else f'with {noise:.0%} error'}: "
              "share of ends within 2 slices (mean absolute error, slices)")
        names = sorted({k[2] for k in errors})
        print(f"{'rule':36s}" + "".join(f"{p:>18s}" for p in PLACEMENTS))
        for name in names:
            cells = []
            for placement in PLACEMENTS:
                e = np.abs(np.array(errors[(noise, placement, name)]))
                cells.append(f"{np.mean(e <= 2):.3f} ({e.mean():.2f})")
            print(f"{name:36s}" + "".join(f"{c:>18s}" for c in cells))
    print(f"\n{len(errors[(0.0, 'even', 'drawing only (spacing)')])} ends per placement")
    print("\nintensity change under a slice's mask to the next slice out (x the structure's median change):")
    for name, values in image_change_past_ends(args.templates).items():
        quartiles = " / ".join(f"{q:.2f}" for q in np.percentile(values, [25, 50, 75]))
        print(f"  {name:18s} quartiles {quartiles} ({values.size} slices)")


if __name__ == "__main__":
    main()
