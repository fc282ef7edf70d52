"""``saltsegment bench site``: does a site adapter make one drawn slice enough on a new patient?

Leave one patient out. The site's other patients come first, in order, each
labelled with ``site_slices`` slices per structure; the site adapter after
n of them is the adapter after (n - 1) continued with ``train --init`` on the
n-th (as a site accumulates patients; adapters are shared between left-out
patients when their first patients are the same). On the left-out patient
one slice per structure is drawn (the middle of each structure), and:

- ``site adapter, 1 slice``: the site adapter propagates from that slice
  directly (box mode), for n = 1 .. all previous patients;
- ``site adapter + warm start, 1 slice``: the site adapter continued on that
  one slice (``--init``) first, then propagating (after all previous patients);
- ``fresh adapter, 1 slice``: a new adapter trained on that slice alone
  (n = 0 on the curve: a site with no previous patient);
- ``fresh adapter, 3 slices``: a new adapter on three slices per structure;
- ``zero-shot LiteMedSAM, 1 slice``: the base model untrained (0 steps), its
  prompts at their box initialisation, the drawn slice's box walked through
  the volume by the same box propagation.

Every method is scored by 3D Dice per structure on the same voxels: the
slices drawn by neither the 1-slice nor the 3-slice protocol.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ..adapter_file import load_adapter
from ..array_jobs import AdaptedModel, fine_tune, propagate
from ..models import load_model
from ..pipeline import TrainJob, run_training
from ..propagation import PropagationConfig
from ..training import FewShotData, TrainingConfig
from ..volume_io import write_label_map
from .. import preprocessing as pp
from .cases import BenchCase
from .output_files import new_figure, write_outputs
from .quality import unlabelled_dice

Say = Callable[[str], None]

ZERO_SHOT = "zero-shot LiteMedSAM, 1 slice"
FRESH_1 = "fresh adapter, 1 slice"
FRESH_3 = "fresh adapter, 3 slices"
SITE = "site adapter, 1 slice"
SITE_WARM = "site adapter + warm start, 1 slice"
METHODS = (ZERO_SHOT, FRESH_1, FRESH_3, SITE, SITE_WARM)
METHOD_KEYS = {"zero-shot": ZERO_SHOT, "fresh-1": FRESH_1, "fresh-3": FRESH_3, "site": SITE, "site-warm": SITE_WARM}


@dataclass
class SiteRun:
    """One method on one left-out patient."""

    left_out: str
    method: str
    previous: int                 # patients the adapter learned from before this one
    drawn_slices: list[int]
    dice: dict[str, float]
    train_s: float = 0.0
    propagate_s: float = 0.0

    @property
    def mean_dice(self) -> float:
        return float(np.mean(list(self.dice.values())))


@dataclass
class SiteResults:
    patients: list[str]
    site_slices: int
    steps: int
    runs: list[SiteRun] = field(default_factory=list)
    structures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"patients": self.patients, "structures": self.structures,
                "site_slices_per_structure": self.site_slices, "steps": self.steps,
                "runs": [dict(asdict(r), mean_dice=round(r.mean_dice, 4)) for r in self.runs]}

    @classmethod
    def from_dict(cls, data: dict) -> "SiteResults":
        runs = [SiteRun(**{k: v for k, v in run.items() if k != "mean_dice"}) for run in data["runs"]]
        return cls(data["patients"], data["site_slices_per_structure"], data["steps"], runs,
                   data.get("structures", []))

    def mean(self, method: str, previous: Optional[int] = None) -> float:
        values = [r.mean_dice for r in self.runs if r.method == method
                  and (previous is None or r.previous == previous)]
        return float(np.mean(values)) if values else float("nan")

    @property
    def most_previous(self) -> int:
        return max([r.previous for r in self.runs if r.method == SITE], default=0)


class _SiteAdapters:
    """The site adapters, one per ordered list of previous patients; each continues its prefix's."""

    def __init__(self, folder: Path, patients: dict[str, BenchCase], site_slices: int, steps: int, seed: int,
                 say: Say) -> None:
        self.folder, self.patients, self.site_slices = folder, patients, site_slices
        self.steps, self.seed, self.say = steps, seed, say
        self.train_seconds: dict[tuple[str, ...], float] = {}

    def labels_file(self, name: str) -> Path:
        """The previous patient as its user labelled it: ``site_slices`` slices per structure."""
        path = self.folder / f"{name}_drawn{self.site_slices}.seg.nrrd"
        if not path.exists():
            case = self.patients[name]
            drawn = case.drawn(case.labelled_slices(self.site_slices))
            write_label_map(path, drawn, case.geometry, case.segments)
        return path

    def image_file(self, name: str) -> Path:
        from ..volume_io import write_image

        path = self.folder / f"{name}_image.nrrd"
        if not path.exists():
            write_image(path, self.patients[name].image, self.patients[name].geometry)
        return path

    def adapter(self, chain: tuple[str, ...]) -> Path:
        """The adapter after ``chain``'s patients, trained (continued) on demand; reused when already there."""
        path = self.folder / ("site_" + "+".join(chain) + ".safetensors")
        if path.exists():
            return path
        parent = self.adapter(chain[:-1]) if len(chain) > 1 else None
        job = TrainJob(image=str(self.image_file(chain[-1])), labels=str(self.labels_file(chain[-1])), out=str(path),
                       axis=self.patients[chain[-1]].axis, init=str(parent) if parent else None,
                       config=TrainingConfig(steps=self.steps, seed=self.seed))
        start = time.perf_counter()
        run_training(job)
        self.train_seconds[chain] = time.perf_counter() - start
        self.say(f"site adapter after {' + '.join(chain)}: trained in {self.train_seconds[chain]:.0f} s")
        return path


def _propagate(adapted: AdaptedModel, case: BenchCase, drawn: np.ndarray,
               labelled: list[int]) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    result = propagate(adapted, case.image, case.geometry.spacing, case.axis,
                       PropagationConfig(mode="box", estimate=False), drawn, labelled)
    return result.labels, time.perf_counter() - start


def _fresh(case: BenchCase, drawn: np.ndarray, labelled: list[int], method: str, steps: int,
           seed: int) -> tuple[np.ndarray, float, float]:
    """Train a new adapter on the drawn slices (``steps`` = 0: the base model, prompts at initialisation)."""
    data = FewShotData(case.image, drawn, case.geometry.spacing, case.segments,
                       pp.parse_intensity("auto", case.image), case.axis, labelled)
    # Untrained: one copy per slice, so the prompts start exactly at the drawn slices' boxes.
    config = TrainingConfig(method=method, steps=steps, seed=seed, **({} if steps else {"copies_per_slice": 1}))
    tuned = fine_tune(load_model("lite_medsam"), data, config)
    labels, seconds = _propagate(tuned.adapted(), case, drawn, labelled)
    return labels, tuned.result.train_seconds + tuned.trainer.setup_seconds, seconds


def _site_propagation(adapter: Path, case: BenchCase, drawn: np.ndarray,
                      labelled: list[int]) -> tuple[np.ndarray, float]:
    return _propagate(AdaptedModel.from_file(load_adapter(adapter)), case, drawn, labelled)


def merge_site_results(parts: Sequence[SiteResults]) -> SiteResults:
    """One result from runs made apart (methods or patients split across processes), if they measured alike.

    A run that two parts both made (same patient, method and number of
    previous patients) counts once: the first part's.
    """
    first = parts[0]
    for part in parts[1:]:
        if (part.site_slices, part.steps, part.structures, part.patients) != \
                (first.site_slices, first.steps, first.structures, first.patients):
            raise ValueError("These site runs used different settings (slices, steps, structures or patients); "
                             "merge only runs of the same command apart from --left-out and --site-methods")
    runs: dict[tuple, SiteRun] = {}
    for run in (r for p in parts for r in p.runs):   # a run measured by two parts counts once (the first)
        runs.setdefault((run.left_out, run.method, run.previous), run)
    return SiteResults(first.patients, first.site_slices, first.steps, list(runs.values()), first.structures)


def only_segments(case: BenchCase, names: Sequence[str]) -> BenchCase:
    """The case with only the structures ``names`` in its reference (a cheaper bench on a small machine)."""
    kept = [s for s in case.segments if s.name in names]
    if not kept:
        raise ValueError(f"{case.name} has none of the structures {', '.join(names)} "
                         f"(it has {', '.join(s.name for s in case.segments)})")
    reference = np.where(np.isin(case.reference, [s.label for s in kept]), case.reference, 0)
    return replace(case, reference=reference, segments=kept)


def bench_site(patients: Sequence[BenchCase], left_out: Optional[Sequence[str]] = None, steps: int = 40,
               site_slices: int = 3, seed: int = 0, folder: Optional[Path] = None,
               say: Say = print, on_update: Optional[Callable[[SiteResults], None]] = None,
               segments: Optional[Sequence[str]] = None, most_previous: Optional[int] = None,
               methods: Sequence[str] = METHODS) -> SiteResults:
    """Leave each patient of ``left_out`` (default: all) out in turn; see the module docstring.

    ``segments`` keeps only those structures; ``most_previous`` caps the
    previous patients a site adapter learns from (the first ones, in order).
    ``methods`` (default: all of :data:`METHODS`) selects what runs, so
    runs can be split across processes and merged (:func:`merge_site_results`).
    ``on_update`` gets the results so far after each method on each patient,
    so a long run that is stopped keeps what it measured.
    """
    import tempfile

    if segments:
        patients = [only_segments(p, segments) for p in patients]
    by_name = {p.name: p for p in patients}
    unknown = [name for name in left_out or [] if name not in by_name]
    if unknown:
        raise ValueError(f"No patient named {', '.join(unknown)} (patients: {', '.join(by_name)})")
    if len(patients) < 2:
        raise ValueError("Site adaptation needs at least two patients of the site")
    work = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="saltsegment-site-"))
    work.mkdir(parents=True, exist_ok=True)
    adapters = _SiteAdapters(work, by_name, site_slices, steps, seed, say)
    results = SiteResults([p.name for p in patients], site_slices, steps,
                          structures=sorted({s.name for p in patients for s in p.segments}))
    for name in left_out or list(by_name):
        case = by_name[name]
        previous = [p.name for p in patients if p.name != name][:most_previous]
        one, three = case.labelled_slices(1), case.labelled_slices(3)
        drawn_one, drawn_three = case.drawn(one), case.drawn(three)
        scored = sorted(set(one) | set(three))

        def record(method: str, count: int, drawn: list[int], labels: np.ndarray, train_s: float,
                   propagate_s: float) -> None:
            run = SiteRun(name, method, count, drawn, unlabelled_dice(labels, case, scored), round(train_s, 1),
                          round(propagate_s, 1))
            results.runs.append(run)
            if on_update is not None:
                on_update(results)
            say(f"{name}: {method}" + (f" after {count} previous patients" if count else "")
                + f": Dice {run.mean_dice:.3f} (train {train_s:.0f} s, propagate {propagate_s:.0f} s)")

        # The comparisons that matter first (the fresh adapter and the site adapter after every previous
        # patient), then the baselines, then the rest of the curve: a run stopped early keeps the main result.
        if FRESH_1 in methods:
            labels, train_s, propagate_s = _fresh(case, drawn_one, one, "salt", steps, seed)
            record(FRESH_1, 0, one, labels, train_s, propagate_s)
        for count in [len(previous)] + list(range(1, len(previous))):
            if SITE in methods:
                chain = tuple(previous[:count])
                adapter = adapters.adapter(chain)
                labels, propagate_s = _site_propagation(adapter, case, drawn_one, one)
                record(SITE, count, one, labels, adapters.train_seconds.get(chain, 0.0), propagate_s)
            if count == len(previous) and FRESH_3 in methods:
                labels, train_s, propagate_s = _fresh(case, drawn_three, three, "salt", steps, seed)
                record(FRESH_3, 0, three, labels, train_s, propagate_s)
            if count == len(previous) and ZERO_SHOT in methods:
                labels, train_s, propagate_s = _fresh(case, drawn_one, one, "decoder", 0, seed)
                record(ZERO_SHOT, 0, one, labels, train_s, propagate_s)
        if SITE_WARM not in methods:
            continue
        warm = work / f"site_{'+'.join(previous)}_warm_{name}.safetensors"
        one_file = work / f"{name}_drawn1.seg.nrrd"
        write_label_map(one_file, drawn_one, case.geometry, case.segments)
        start = time.perf_counter()
        if not warm.exists():      # like the site adapters, reused when already there
            run_training(TrainJob(image=str(adapters.image_file(name)), labels=str(one_file), out=str(warm),
                                  init=str(adapters.adapter(tuple(previous))), axis=case.axis,
                                  config=TrainingConfig(steps=steps, seed=seed)))
        train_s = time.perf_counter() - start
        labels, propagate_s = _site_propagation(warm, case, drawn_one, one)
        record(SITE_WARM, len(previous), one, labels, train_s, propagate_s)
    return results


def site_table(results: SiteResults) -> str:
    """Markdown: each method's mean Dice per left-out patient and overall, then the margins that matter."""
    left_out = list(dict.fromkeys(r.left_out for r in results.runs))
    most = results.most_previous
    rows = [(ZERO_SHOT, 0), (FRESH_1, 0), (FRESH_3, 0)] + [(SITE, n) for n in range(1, most + 1)] \
        + [(SITE_WARM, most)]
    lines = ["| method (simulated patients) | previous patients | " + " | ".join(left_out) + " | mean |",
             "|---|---|" + "---|" * (len(left_out) + 1)]
    for method, previous in rows:
        cells = []
        for name in left_out:
            runs = [r for r in results.runs if r.left_out == name and r.method == method and r.previous == previous]
            cells.append(f"{runs[0].mean_dice:.3f}" if runs else "")
        lines.append(f"| {method} | {previous} | " + " | ".join(cells)
                     + f" | {results.mean(method, previous if method in (SITE, SITE_WARM) else None):.3f} |")
    best = max((SITE, SITE_WARM), key=lambda m: results.mean(m, most))
    site = results.mean(best, most)
    lines += ["", f"- best site variant after {most} previous patients: {best} ({site:.3f})",
              f"- against a fresh adapter on the same one slice: {site - results.mean(FRESH_1):+.3f}",
              f"- against a fresh adapter on three slices per structure: {site - results.mean(FRESH_3):+.3f}",
              f"- against zero-shot LiteMedSAM with the slice's box walked: {site - results.mean(ZERO_SHOT):+.3f}"]
    return "\n".join(lines)


def write_site_outputs(results: SiteResults, folder: Path) -> tuple[Path, Path, Path]:
    """site.json, site.md and site.png (Dice against the number of previous patients)."""
    figure, axes = new_figure(6.5)
    most = results.most_previous
    counts = list(range(0, most + 1))
    for name in dict.fromkeys(r.left_out for r in results.runs):
        curve = [next((r.mean_dice for r in results.runs if r.left_out == name and
                       ((n == 0 and r.method == FRESH_1) or (n > 0 and r.method == SITE and r.previous == n))),
                      float("nan")) for n in counts]
        axes.plot(counts, curve, color="tab:blue", alpha=0.25, linewidth=1)
    mean_curve = [results.mean(FRESH_1)] + [results.mean(SITE, n) for n in counts[1:]]
    axes.plot(counts, mean_curve, color="tab:blue", marker="o", linewidth=2,
              label="site adapter, 1 slice (0: fresh adapter on that slice)")
    axes.scatter([most], [results.mean(SITE_WARM, most)], color="tab:purple", marker="D", zorder=3,
                 label="site adapter + warm start on the slice")
    axes.axhline(results.mean(FRESH_3), color="tab:green", linestyle="--", label="fresh adapter, 3 slices")
    axes.axhline(results.mean(ZERO_SHOT), color="grey", linestyle=":", label="zero-shot LiteMedSAM, 1 slice")
    axes.set_xticks(counts)
    axes.set_xlabel("previous patients of the site (simulated)")
    axes.set_ylabel("Dice, slices drawn by neither protocol")
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="lower right")
    axes.set_title("Site adaptation, leave one simulated patient out", fontsize=10)
    return write_outputs(folder, "site", results.to_dict(), site_table(results), figure)
