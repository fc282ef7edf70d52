"""The labelled volumes the quality benchmark runs on, and how a user would label them.

A case is a volume with a full reference segmentation. The embedded sample is
always one; ``scripts/make_dev_set.py`` writes the development set (real CT
and MR, anatomy and lesions, from registry packages) with a ``cases.json``.

Labelling protocols simulate the radiologist: each structure gets ``count``
slices inside its extent, its first and last slices left out (they are where a
user is least sure), and every structure present on a chosen slice is drawn
there, so a chosen slice without a structure tells the truth ("not here"). A
structure too short for that (a lesion on three slices) gets its middle slice.
Users do not all draw alike, and where they draw decides how far propagation
must reach past the drawn slices, so there are three placements:

``per_structure``  evenly, as if the ends were slices too: the outermost drawn
                   slices sit one label gap inside the ends;
``near_ends``      evenly from ``NEAR_END_INSET`` slices inside each end: the
                   user drew close to where the structure stops;
``random``         anywhere inside the extent (a fixed generator per
                   structure and count, so runs are repeatable);
``consecutive``    on neighbouring slices around the middle: the user drew
                   a few slices where the structure is clearest, as is
                   common for a lesion, and left the rest to propagation.

``global`` spreads ``count`` slices over all structures together, as the demo
does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..sample_data import sample_paths, spread_slices
from ..slices import array_axis, occupied_slices, put_back_slices
from ..volume_io import Segment, VolumeGeometry, read_image, read_label_map

PROTOCOLS = ("per_structure", "near_ends", "random", "consecutive", "global")
NEAR_END_INSET = 2      # near_ends: slices between each true end and the outermost drawn slice


@dataclass
class BenchCase:
    """A labelled volume: image, full reference, the slice axis and what kind of case it is."""

    name: str
    image: np.ndarray
    geometry: VolumeGeometry
    reference: np.ndarray
    segments: list[Segment]
    axis: str
    kind: str                # "anatomy" or "lesion"
    modality: str

    def labelled_slices(self, count: int, protocol: str = "per_structure") -> list[int]:
        """The slices a user would draw: ``count`` per structure (or spread over all, ``global``)."""
        if protocol == "global":
            return spread_slices(self.reference, count, array_axis(self.axis))
        placements = {"per_structure": lambda first, last, segment: slices_inside(first, last, count),
                      "near_ends": lambda first, last, segment: slices_near_ends(first, last, count),
                      "random": lambda first, last, segment: random_slices_inside(
                          first, last, count, np.random.default_rng([segment.label, count])),
                      "consecutive": lambda first, last, segment: consecutive_slices(first, last, count)}
        if protocol not in placements:
            raise ValueError(f"Unknown labelling protocol '{protocol}'; choose {', '.join(PROTOCOLS)}")
        chosen: set[int] = set()
        for segment in self.segments:
            occupied = occupied_slices(self.reference == segment.label, self.axis)
            chosen.update(placements[protocol](occupied[0], occupied[-1], segment))
        return sorted(chosen)

    def drawn(self, labelled: list[int]) -> np.ndarray:
        """The reference on the labelled slices only: what the user drew."""
        return put_back_slices(np.zeros_like(self.reference), self.reference, labelled, self.axis)


def slices_inside(first: int, last: int, count: int) -> list[int]:
    """``count`` slices spread evenly inside ``first``..``last``, its end slices not drawn, as a user draws.

    A structure no longer than ``count`` slices is drawn on its middle slice.
    """
    if last - first + 1 <= count:
        return [(first + last) // 2]
    return sorted({int(round(p)) for p in np.linspace(first, last, count + 2)[1:-1]})


def slices_near_ends(first: int, last: int, count: int, inset: int = NEAR_END_INSET) -> list[int]:
    """``count`` slices spread evenly from ``inset`` slices inside ``first`` to as far inside ``last``.

    A structure too short to leave ``inset`` slices at each end with
    ``count`` slices between is drawn as :func:`slices_inside` draws it.
    """
    if last - first + 1 < count + 2 * inset:
        return slices_inside(first, last, count)
    return sorted({int(round(p)) for p in np.linspace(first + inset, last - inset, count)})


def random_slices_inside(first: int, last: int, count: int, generator: np.random.Generator) -> list[int]:
    """``count`` distinct slices drawn at random strictly inside ``first``..``last`` (its end slices not drawn).

    A structure with no more than ``count`` slices inside its ends is drawn
    as :func:`slices_inside` draws it.
    """
    inside = np.arange(first + 1, last)
    if inside.size <= count:
        return slices_inside(first, last, count)
    return sorted(int(i) for i in generator.choice(inside, count, replace=False))


def consecutive_slices(first: int, last: int, count: int) -> list[int]:
    """``count`` neighbouring slices centred in ``first``..``last``, its end slices not drawn.

    A structure with no more than ``count`` slices inside its ends is drawn
    as :func:`slices_inside` draws it.
    """
    if last - first - 1 <= count:
        return slices_inside(first, last, count)
    start = (first + last) // 2 - (count - 1) // 2
    return list(range(start, start + count))


def sample_case() -> BenchCase:
    """The embedded T1 MR sample (eight AAL deep grey structures), labelled axially."""
    image_path, labels_path = sample_paths()
    return load_case("sample", image_path, labels_path, axis="k", kind="anatomy", modality="MR")


def load_case(name: str, image_path: str | Path, labels_path: str | Path, axis: str = "k",
              kind: str = "anatomy", modality: str = "") -> BenchCase:
    image, geometry = read_image(image_path)
    reference, _, segments = read_label_map(labels_path)
    present = [s for s in segments if (reference == s.label).any()]
    return BenchCase(name, image, geometry, reference, present, axis, kind, modality)


def development_cases(folder: str | Path, names: Optional[list[str]] = None) -> list[BenchCase]:
    """The cases of a development set made by ``scripts/make_dev_set.py`` (``cases.json``)."""
    folder = Path(folder)
    listing = folder / "cases.json"
    if not listing.is_file():
        raise FileNotFoundError(f"{listing} not found: make the development set with scripts/make_dev_set.py")
    cases = []
    for entry in json.loads(listing.read_text()):
        if names and entry["name"] not in names:
            continue
        axis = {"axial": "k", "coronal": "j", "sagittal": "i"}.get(entry["axis"], entry["axis"])
        cases.append(load_case(entry["name"], folder / entry["image"], folder / entry["labels"], axis,
                               entry.get("kind", "anatomy"), entry.get("modality", "")))
    return cases
