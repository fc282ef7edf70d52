"""``saltsegment bench quality``: few-shot quality against what the user already has, case by case.

For every case, labelling protocol and count, on the same drawn slices:

- Slicer's *Fill between slices* (ITK's morphological contour interpolation,
  :mod:`interpolation`): the free one-click baseline;
- zero-shot LiteMedSAM with the reference box (+5 px) on every slice: an
  oracle no user has, per structure; and each fine-tuned model with the same
  boxes on the unlabelled slices, which compares the methods on the model
  alone (the propagation's Dice is mostly the interpolated shape);
- the drawn shape interpolated and closed at each structure's *true* ends:
  an oracle of the extent, no model (what deciding every end right would
  give if the shape between and past the drawn slices were left as it is);
- the propagation (box mode) after fine-tuning each method, with its extents
  against the true ones, its leave-one-out estimate against the truth, and a
  second propagation with one more slice per structure drawn where the
  propagation suggests versus evenly (the middle of the widest gap).

Scores are 3D Dice over the slices the user did not draw, per structure.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from .. import preprocessing as pp
from ..array_jobs import AdaptedModel, fine_tune, propagate
from ..box_mode import closed_shape, compose_label_map
from ..extent import SegmentEnd, SegmentExtent
from ..host.choices import DEFAULT_STEPS
from ..interpolation import fill_between_slices
from ..metrics import dice
from ..models import load_model
from ..propagation import PropagationConfig, VolumePropagator
from ..slices import occupied_slices
from ..training import FewShotData, TrainingConfig
from .cases import BenchCase
from .output_files import new_figure, write_outputs

Say = Callable[[str], None]


def unlabelled_dice(prediction: np.ndarray, case: BenchCase, labelled: Sequence[int]) -> dict[str, float]:
    """3D Dice per structure over the slices not in ``labelled``."""
    keep = np.ones(pp.slice_count(case.reference.shape, case.axis), dtype=bool)
    keep[list(labelled)] = False
    selector: list = [slice(None)] * 3
    selector[pp.SLICE_AXES[case.axis]] = keep
    region = tuple(selector)
    return {s.name: round(dice(prediction[region] == s.label, case.reference[region] == s.label), 4)
            for s in case.segments}


def true_extent(case: BenchCase, segment) -> tuple[int, int]:
    occupied = occupied_slices(case.reference == segment.label, case.axis)
    return occupied[0], occupied[-1]


def true_ends_shape_dice(case: BenchCase, drawn: np.ndarray, labelled: Sequence[int]) -> dict[str, float]:
    """Dice of the drawn shape interpolated and closed just past each structure's true first and last slice.

    An oracle of the extent without a model: the box propagation's own shape
    with every end decided right. What a run scores above it comes from the
    model's masks; what it scores below, mostly from its ends.
    """
    masks = []
    for segment in case.segments:
        first, last = true_extent(case, segment)
        known = SegmentExtent(segment.name, SegmentEnd(first, "true", 0), SegmentEnd(last, "true", 0))
        own = drawn == segment.label
        masks.append(closed_shape(own, case.axis, labelled, known) if own.any() else None)
    labels = compose_label_map(masks, [s.label for s in case.segments], case.reference.shape)
    return unlabelled_dice(labels, case, labelled)


BoxPredictor = Callable[[int, list, np.ndarray], Sequence[np.ndarray]]   # (slice, segments, boxes) -> masks


def _box_oracle_dice(case: BenchCase, slices: Sequence[int], predict: BoxPredictor, margin: int) -> dict[str, float]:
    """Mean slice Dice per structure when ``predict(index, segments, boxes)`` gets the segments present on each
    of ``slices`` with their reference boxes (+``margin`` px) and returns their masks."""
    scores: dict[str, list[float]] = {s.name: [] for s in case.segments}
    for index in slices:
        reference = pp.take_slice(case.reference, case.axis, index)
        present = [s for s in case.segments if (reference == s.label).any()]
        if not present:
            continue
        boxes = np.stack([pp.mask_box(reference == s.label, margin) for s in present])
        for segment, mask in zip(present, predict(index, present, boxes)):
            scores[segment.name].append(dice(mask, reference == segment.label))
    return {name: round(float(np.mean(values)), 4) for name, values in scores.items() if values}


def zero_shot_box_dice(case: BenchCase, margin: int = 5) -> dict[str, float]:
    """Mean slice Dice of base LiteMedSAM prompted with the reference box on every slice (an oracle)."""
    from ..predictor import SlicePredictor

    predictor = SlicePredictor(load_model("lite_medsam"))
    volume01 = pp.parse_intensity("auto", case.image).apply(case.image)
    pixel_spacing = pp.slice_pixel_spacing(case.geometry.spacing, case.axis)

    def predict(index: int, segments: list, boxes: np.ndarray) -> np.ndarray:
        predictor.set_slice(pp.take_slice(volume01, case.axis, index), pixel_spacing)
        logits, _ = predictor.predict_boxes(boxes)
        return logits.numpy() > 0

    return _box_oracle_dice(case, range(pp.slice_count(case.image.shape, case.axis)), predict, margin)


def slice_prompter(adapted: AdaptedModel, case: BenchCase
                   ) -> tuple[VolumePropagator, np.ndarray, pp.SliceGeometry]:
    """The fine-tuned model set up to be prompted slice by slice on ``case``: a box-mode propagator, the
    volume mapped to [0, 1] as the adapter maps intensities, and the slice geometry."""
    propagator = VolumePropagator(adapted.model, adapted.prompts, adapted.segments, adapted.intensity, case.axis,
                                  PropagationConfig(mode="box"))
    volume01 = adapted.intensity.apply(case.image)
    geometry = pp.slice_geometry_for(pp.take_slice(case.image, case.axis, 0).shape,
                                     pp.slice_pixel_spacing(case.geometry.spacing, case.axis),
                                     adapted.model.input_size)
    return propagator, volume01, geometry


def adapted_box_dice(adapted: AdaptedModel, case: BenchCase, labelled: Sequence[int],
                     margin: int = 5) -> dict[str, float]:
    """The fine-tuned model (adapter and learned tokens) with the reference box on every unlabelled slice.

    What the method itself makes of a slice when the box is right, apart from
    the interpolated shape and the end decisions: the comparison of methods
    that the propagation's Dice, mostly the shape, hides.
    """
    propagator, volume01, geometry = slice_prompter(adapted, case)
    position = {s.label: k for k, s in enumerate(adapted.segments)}
    drawn = set(int(i) for i in labelled)

    def predict(index: int, segments: list, boxes: np.ndarray) -> list[np.ndarray]:
        embedding = propagator.embed(volume01, [index], geometry)[0]
        return [propagator.predict_box(embedding, position[s.label], box, geometry) > 0.5
                for s, box in zip(segments, boxes)]

    unlabelled = [i for i in range(pp.slice_count(case.image.shape, case.axis)) if i not in drawn]
    return _box_oracle_dice(case, unlabelled, predict, margin)


@dataclass
class QualityRun:
    """One fine-tuning + propagation on one case, protocol and count."""

    case: str
    protocol: str
    count: int
    labelled: list[int]
    method: str
    seed: int
    dice: dict[str, float]
    fill_between_slices: dict[str, float]
    ends_within_2: int
    ends: int
    extents: list[dict]
    estimate: Optional[dict]
    train_s: float
    propagate_s: float
    suggestion: Optional[dict] = None
    true_ends_shape: Optional[dict[str, float]] = None   # per structure, :func:`true_ends_shape_dice`
    oracle_box: Optional[dict[str, float]] = None        # per structure, :func:`adapted_box_dice`

    @property
    def mean_dice(self) -> float:
        return float(np.mean(list(self.dice.values())))

    @property
    def mean_fill(self) -> float:
        return float(np.mean(list(self.fill_between_slices.values())))


@dataclass
class QualityResults:
    runs: list[QualityRun] = field(default_factory=list)
    zero_shot: dict[str, dict[str, float]] = field(default_factory=dict)   # case -> structure -> Dice

    def to_dict(self) -> dict:
        return {"runs": [dict(asdict(r), mean_dice=r.mean_dice, mean_fill_between_slices=r.mean_fill)
                         for r in self.runs],
                "zero_shot_oracle_box": self.zero_shot}

    @classmethod
    def from_dict(cls, document: dict) -> "QualityResults":
        names = {f.name for f in fields(QualityRun)}
        runs = [QualityRun(**{k: v for k, v in run.items() if k in names}) for run in document.get("runs", [])]
        return cls(runs, dict(document.get("zero_shot_oracle_box", {})))


def merge_results(parts: Sequence[QualityResults]) -> QualityResults:
    """One table from runs made separately (one case at a time, or on several machines)."""
    merged = QualityResults()
    for part in parts:
        merged.runs.extend(part.runs)
        merged.zero_shot.update(part.zero_shot)
    return merged


def _propagate(adapted: AdaptedModel, case: BenchCase, drawn: np.ndarray, labelled: list[int],
               config: PropagationConfig):
    return propagate(adapted, case.image, case.geometry.spacing, case.axis, config, drawn, labelled)


def extent_errors(case: BenchCase, extents) -> tuple[int, int, list[dict]]:
    """(ends within 2 slices of the true ones, ends counted, one row per segment with its errors in slices)."""
    by_name = {e.name: e for e in extents}
    within, total, rows = 0, 0, []
    for segment in case.segments:
        if segment.name not in by_name:
            continue
        first, last = true_extent(case, segment)
        extent = by_name[segment.name]
        errors = (extent.first.slice - first, extent.last.slice - last)
        within += sum(abs(e) <= 2 for e in errors)
        total += 2
        rows.append(dict(extent.to_dict(), true_first=first, true_last=last, errors=list(errors)))
    return within, total, rows


def _suggestion_experiment(adapted: AdaptedModel, case, labelled, result, config) -> dict:
    """One more drawn slice per structure: where the propagation suggests vs the middle of the widest gap."""
    suggested = {s.segment: s.slice for s in result.suggestions}
    even: dict[str, int] = {}
    for segment in case.segments:
        present = [i for i in labelled if (pp.take_slice(case.reference, case.axis, i) == segment.label).any()]
        gaps = [(b - a, (a + b) // 2) for a, b in zip(present[:-1], present[1:]) if b - a > 1]
        if gaps:
            even[segment.name] = max(gaps)[1]
    scores = {}
    extra_all = set(suggested.values()) | set(even.values())
    config = replace(config, estimate=False)         # only the Dice of the two choices matters here
    for name, extra in (("suggested", set(suggested.values())), ("even", set(even.values()))):
        more = sorted(set(labelled) | extra)
        drawn = case.drawn(more)
        propagated = _propagate(adapted, case, drawn, more, config)
        scores[name] = unlabelled_dice(propagated.labels, case, sorted(set(labelled) | extra_all))
    return {"suggested_slices": suggested, "even_slices": even,
            "mean_dice": {k: round(float(np.mean(list(v.values()))), 4) for k, v in scores.items()},
            "dice": scores}


def bench_case(case: BenchCase, counts: Sequence[int], methods: Sequence[str], seeds: Sequence[int],
               steps: int, protocol: str = "per_structure", suggest: bool = True,
               say: Say = print, oracle: bool = True) -> list[QualityRun]:
    """Every (count, method, seed) run on one case; ``oracle``: each run's :func:`adapted_box_dice` too."""
    runs = []
    for count in counts:
        labelled = case.labelled_slices(count, protocol)
        drawn = case.drawn(labelled)
        fill = unlabelled_dice(fill_between_slices(drawn, case.axis), case, labelled)
        true_ends = true_ends_shape_dice(case, drawn, labelled)
        for method in methods:
            for seed in seeds:
                data = FewShotData(case.image, drawn, case.geometry.spacing, case.segments,
                                   pp.parse_intensity("auto", case.image), case.axis, labelled)
                tuned = fine_tune(load_model("lite_medsam"), data,
                                  TrainingConfig(method=method, steps=steps, seed=seed))
                trained, adapted = tuned.result, tuned.adapted()
                config = PropagationConfig(mode="box")
                start = time.perf_counter()
                result = _propagate(adapted, case, drawn, labelled, config)
                propagate_s = time.perf_counter() - start
                within, total, extents = extent_errors(case, result.extents)
                run = QualityRun(case.name, protocol, count, labelled, method, seed,
                                 unlabelled_dice(result.labels, case, labelled), fill, within, total, extents,
                                 result.estimate.to_dict() if result.estimate else None,
                                 round(trained.train_seconds, 1), round(propagate_s, 1), true_ends_shape=true_ends)
                if oracle:
                    run.oracle_box = adapted_box_dice(adapted, case, labelled)
                if suggest and method == methods[0] and seed == seeds[0] and case.kind == "anatomy":
                    run.suggestion = _suggestion_experiment(adapted, case, labelled, result, config)
                runs.append(run)
                say(f"{case.name} {protocol} {count}: {method} seed {seed}: {run.mean_dice:.3f} "
                    f"(Fill between slices {run.mean_fill:.3f}), ends within 2: {within}/{total}, "
                    f"train {run.train_s:.0f} s, propagate {run.propagate_s:.0f} s"
                    + (f", oracle box {_mean(run.oracle_box.values()):.3f}" if run.oracle_box else ""))
                if run.suggestion:
                    scores = run.suggestion["mean_dice"]
                    say(f"  one more slice per structure: where suggested {scores['suggested']:.3f}, "
                        f"evenly {scores['even']:.3f}")
    return runs


def bench_quality(cases: Sequence[BenchCase], counts: Sequence[int] = (3, 5), methods: Sequence[str] = ("salt",),
                  seeds: Sequence[int] = (0,), steps: int = DEFAULT_STEPS,
                  protocols: Sequence[str] = ("per_structure",), lesion_counts: Sequence[int] = (1,),
                  oracle: bool = True, suggest: bool = True, say: Say = print) -> QualityResults:
    """Quality over cases: anatomy at ``counts`` slices per structure in each of ``protocols``, lesions at
    ``lesion_counts`` (a lesion's few slices leave no choice of placement: it runs once, ``per_structure``)."""
    results = QualityResults()
    for case in cases:
        if case.kind == "lesion":
            results.runs.extend(bench_case(case, lesion_counts, methods, seeds, steps, "per_structure", suggest, say,
                                           oracle))
        else:
            for protocol in protocols:
                results.runs.extend(bench_case(case, counts, methods, seeds, steps, protocol, suggest, say, oracle))
        if oracle:
            results.zero_shot[case.name] = zero_shot_box_dice(case)
    return results


def _mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


def drawn_label(protocol: str, count: int) -> str:
    """The "drawn per structure" cell: the count, and where it was drawn unless evenly (``per_structure``)."""
    return str(count) if protocol == "per_structure" else f"{count}, {protocol.replace('_', ' ')}"


def _keys(results: QualityResults) -> list[tuple[str, str, int]]:
    return list(dict.fromkeys((r.case, r.protocol, r.count) for r in results.runs))


def _runs_of(results: QualityResults, key: tuple[str, str, int]) -> list[QualityRun]:
    return [r for r in results.runs if (r.case, r.protocol, r.count) == key]


def _true_ends(runs: Sequence[QualityRun]) -> dict[str, float]:
    """The true-ends shape of a case and count (the same for all its runs; none in runs recorded before it)."""
    return next((r.true_ends_shape for r in runs if r.true_ends_shape), {})


def _cell(value: float) -> str:
    """A score in a table, "-" where nothing was run (a method, an oracle skipped with ``--no-oracle``)."""
    return "-" if math.isnan(value) else f"{value:.3f}"


def _oracle_cell(runs: Sequence[QualityRun], methods: Sequence[str], structure: Optional[str] = None) -> str:
    """Each method's :func:`adapted_box_dice` (mean over structures, or one structure's), "-" where not run."""
    cells = []
    for method in methods:
        values = [r.oracle_box[structure] if structure else _mean(r.oracle_box.values())
                  for r in runs if r.method == method and r.oracle_box and (structure is None
                                                                              or structure in r.oracle_box)]
        cells.append(_cell(_mean(values)))
    return " / ".join(cells)


def quality_table(results: QualityResults) -> str:
    """Markdown: per case and count, Fill between slices, each method, the oracles; then per structure."""
    methods = list(dict.fromkeys(r.method for r in results.runs))
    fine_tuned = f"oracle box after fine-tuning ({' / '.join(methods)})"
    lines = ["| case | drawn per structure | Fill between slices | " + " | ".join(methods)
             + f" | ends within 2 slices ({methods[0] if methods else '-'}) | zero-shot oracle box | {fine_tuned} "
             "| shape at the true ends |",
             "|---|---|---|" + "---|" * len(methods) + "---|---|---|---|"]
    keys = _keys(results)
    for case, protocol, count in keys:
        runs = _runs_of(results, (case, protocol, count))
        cells = [_cell(_mean(r.mean_dice for r in runs if r.method == m)) for m in methods]
        first = [r for r in runs if r.method == methods[0]]   # ends of one method, not summed over methods
        within = sum(r.ends_within_2 for r in first)
        total = sum(r.ends for r in first)
        oracle = results.zero_shot.get(case, {})
        true_ends = _true_ends(runs)
        lines.append(f"| {case} | {drawn_label(protocol, count)} | {runs[0].mean_fill:.3f} | " + " | ".join(cells)
                     + f" | {within}/{total} | {_cell(_mean(oracle.values()))} "
                     f"| {_oracle_cell(runs, methods)} | {_cell(_mean(true_ends.values()))} |")
    lines += ["", "| case | drawn | structure | Fill between slices | " + " | ".join(methods)
              + f" | zero-shot oracle box | {fine_tuned} | shape at the true ends |",
              "|---|---|---|---|" + "---|" * len(methods) + "---|---|---|"]
    for case, protocol, count in keys:
        runs = _runs_of(results, (case, protocol, count))
        true_ends = _true_ends(runs)
        for structure, fill in runs[0].fill_between_slices.items():
            cells = [_cell(_mean(r.dice[structure] for r in runs if r.method == m)) for m in methods]
            oracle = results.zero_shot.get(case, {}).get(structure, math.nan)
            lines.append(f"| {case} | {drawn_label(protocol, count)} | {structure} | {fill:.3f} | " + " | ".join(cells)
                         + f" | {_cell(oracle)} | {_oracle_cell(runs, methods, structure)} "
                         f"| {_cell(true_ends.get(structure, math.nan))} |")
    return "\n".join(lines)


def evidence_table(results: QualityResults) -> str:
    """Markdown: what a user is told before trusting a run, against what it scored; "" if no run has it.

    Per run: the leave-one-out estimate for the propagation and for Fill
    between slices beside their measured Dice, and the extra-slice
    experiment (one more slice per structure where the propagation suggested
    it, or in the middle of the widest gap; both scored without either
    choice's extra slices, so not comparable with the run's own Dice). Runs
    with neither (a lesion drawn on one slice has no estimate) are left out.
    """
    rows = [r for r in results.runs if (r.estimate or {}).get("propagation") is not None or r.suggestion]
    if not rows:
        return ""
    lines = ["| case | drawn per structure | method | seed | Dice | estimate | Fill between slices | its estimate "
             "| one more slice: suggested | one more slice: even |", "|---|---|---|---|---|---|---|---|---|---|"]

    def cell(document: Optional[dict], *path: str) -> str:
        for key in path:
            document = document.get(key) if isinstance(document, dict) else None
        return f"{document:.3f}" if isinstance(document, (int, float)) else "-"

    for r in rows:
        lines.append(f"| {r.case} | {drawn_label(r.protocol, r.count)} | {r.method} | {r.seed} | {r.mean_dice:.3f} "
                     f"| {cell(r.estimate, 'propagation')} | {r.mean_fill:.3f} "
                     f"| {cell(r.estimate, 'fill_between_slices')} | {cell(r.suggestion, 'mean_dice', 'suggested')} "
                     f"| {cell(r.suggestion, 'mean_dice', 'even')} |")
    return "\n".join(lines)


def write_quality_outputs(results: QualityResults, folder: Path) -> tuple[Path, Path, Path]:
    """quality.json, quality.md and quality.png (per case: Fill between slices vs each method)."""
    keys = _keys(results)
    methods = list(dict.fromkeys(r.method for r in results.runs))
    figure, axes = new_figure(max(6, 0.9 * len(keys) + 2))
    positions = np.arange(len(keys))
    width = 0.8 / (len(methods) + 2)
    fill = [_runs_of(results, key)[0].mean_fill for key in keys]
    axes.bar(positions - width * (len(methods) + 1) / 2, fill, width, label="Fill between slices", color="grey")
    for offset, method in enumerate(methods, start=1):
        values = [_mean(r.mean_dice for r in _runs_of(results, key) if r.method == method) for key in keys]
        axes.bar(positions - width * (len(methods) + 1) / 2 + offset * width, values, width, label=method)
    oracle = [_mean(results.zero_shot.get(case, {}).values()) for case, _, _ in keys]
    axes.scatter(positions, oracle, marker="_", s=300, color="black", label="zero-shot oracle box", zorder=3)
    axes.set_xticks(positions)
    axes.set_xticklabels([f"{case}\n{drawn_label(protocol, count)} per structure" for case, protocol, count in keys],
                         rotation=30, ha="right", fontsize=7)
    axes.set_ylabel("Dice, unlabelled slices")
    axes.set_ylim(0, 1)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=7, loc="lower left")
    evidence = evidence_table(results)
    table = quality_table(results) + (f"\n\n{evidence}" if evidence else "")
    return write_outputs(folder, "quality", results.to_dict(), table, figure)
