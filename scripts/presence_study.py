"""Can a trained presence score tell where a structure ends? A study of issue 10's first lever.

The decoder's IoU head is not trained by fine-tuning (the product never
reads it). This study trains it alongside the masks: on every decoded
(slice, segment) pair the head learns the IoU of the predicted mask with the
drawn one, and 0 where the segment is absent from a labelled slice (the
negatives the mask loss already uses, prompted with a box taken from another
slice). Then, on each development case, it walks every structure outwards
from its outermost drawn slice past its true end (box prompts from the
previous slice's prediction, as a propagation walks, but without any bound)
and records, on every unlabelled slice of the walk, whether the structure is
really there and what each score says:

- the trained presence score (the IoU head after this training);
- the base model's IoU head (restored weights, same adapted decoder);
- the appearance score the product uses (:mod:`appearance`), relative to the
  drawn slices;
- the predicted area relative to the outermost drawn slice's.

It prints, per score, the AUC of "inside the true extent" against "past it",
over all walk steps and over the two slices that decide an end (the last one
inside against the first one past it). Only development cases; nothing here
sets a default.

    python scripts/presence_study.py --dev dev-data --counts 3 --weight 1.0
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SALTSegment"))

from SALTSegmentLib import preprocessing as pp  # noqa: E402
from SALTSegmentLib.appearance import build_appearance  # noqa: E402
from SALTSegmentLib.array_jobs import FineTuned  # noqa: E402
from SALTSegmentLib.bench.cases import development_cases, sample_case  # noqa: E402
from SALTSegmentLib.bench.quality import slice_prompter, true_extent  # noqa: E402
from SALTSegmentLib.box_mode import box_margin_pixels  # noqa: E402
from SALTSegmentLib.losses import dice_bce_loss  # noqa: E402
from SALTSegmentLib.models import load_model  # noqa: E402
from SALTSegmentLib.adapters import merge_adapters  # noqa: E402
from SALTSegmentLib.training import FewShotData, FewShotTrainer, TrainingConfig  # noqa: E402


class PresenceTrainer(FewShotTrainer):
    """Fine-tuning that also trains the decoder's IoU head as a presence / quality score."""

    presence_weight = 1.0

    def trainable_parameters(self):
        self.model.mask_decoder.iou_prediction_head.requires_grad_(True)
        return super().trainable_parameters()

    def _step_loss(self, plans):
        logits, targets, quality = self._decode_rows(plans)
        logits, targets, quality = logits.float(), targets.float(), quality.float()
        with torch.no_grad():
            predicted, truth = (logits > 0).flatten(1), (targets > 0.5).flatten(1)
            overlap = (predicted & truth).sum(1).float() / (predicted | truth).sum(1).clamp_min(1).float()
            wanted = torch.where(truth.any(1), overlap, torch.zeros_like(overlap))
        return dice_bce_loss(logits, targets) + self.presence_weight * F.mse_loss(quality, wanted)


def auc(inside: list[float], outside: list[float]) -> float | None:
    """P(score inside > score outside), ties half."""
    if not inside or not outside:
        return None
    a, b = np.asarray(inside)[:, None], np.asarray(outside)[None, :]
    return float((a > b).mean() + 0.5 * (a == b).mean())


def walk_records(case, count: int, weight: float, steps: int, seed: int) -> list[dict]:
    labelled = case.labelled_slices(count, "per_structure")
    drawn = case.drawn(labelled)
    data = FewShotData(case.image, drawn, case.geometry.spacing, case.segments,
                       pp.parse_intensity("auto", case.image), case.axis, labelled)
    model = load_model("lite_medsam")
    base_head = copy.deepcopy(model.mask_decoder.iou_prediction_head)
    PresenceTrainer.presence_weight = weight
    trainer = PresenceTrainer(model, data, TrainingConfig(method="salt", steps=steps, seed=seed))
    result = trainer.run()
    adapted = FineTuned(trainer, result).adapted()
    merge_adapters(adapted.model)
    trained_head = adapted.model.mask_decoder.iou_prediction_head
    propagator, volume01, geometry = slice_prompter(adapted, case)
    count_slices = pp.slice_count(case.image.shape, case.axis)
    embeddings: dict[int, torch.Tensor] = {}

    def embedding(index: int) -> torch.Tensor:
        if index not in embeddings:
            embeddings[index] = propagator.embed(volume01, [index], geometry)[0]
        return embeddings[index]

    def decode(k: int, index: int, guide: np.ndarray) -> tuple[np.ndarray, float, float]:
        """The map and the trained quality, then the base model's quality head on the same prompt."""
        box = pp.mask_box(guide, box_margin_pixels(guide, propagator.config.box_margin))
        probabilities, trained = propagator.predict_box_with_quality(embedding(index), k, box, geometry)
        adapted.model.mask_decoder.iou_prediction_head = base_head
        try:
            _, base = propagator.predict_box_with_quality(embedding(index), k, box, geometry)
        finally:
            adapted.model.mask_decoder.iou_prediction_head = trained_head
        return probabilities, trained, base

    low = propagator.embedding_grid
    records = []
    for k, segment in enumerate(adapted.segments):
        truth = case.reference == segment.label
        present = [i for i in labelled if pp.take_slice(truth, case.axis, i).any()]
        if not present:
            continue
        grids = [pp.mask_to_input(pp.take_slice(truth, case.axis, i), geometry, output_size=low).numpy() > 0.5
                 for i in present]
        appearance = build_appearance([embedding(i) for i in present], grids)
        reference_scores = [decode(k, i, pp.take_slice(truth, case.axis, i))[1] for i in present]
        reference_presence = float(np.median(reference_scores))
        first, last = true_extent(case, segment)
        for direction, outermost, end in ((-1, present[0], first), (1, present[-1], last)):
            previous = pp.take_slice(truth, case.axis, outermost)
            end_area = int(previous.sum())
            index = outermost + direction
            while 0 <= index < count_slices and (index - end) * direction <= 4:
                probabilities, trained, base = decode(k, index, previous)
                mask = probabilities > 0.5
                similarity = None
                if appearance is not None and mask.any():
                    grid = pp.mask_to_input(mask, geometry, output_size=low).numpy() > 0.5
                    score = appearance.score(embedding(index), grid)
                    similarity = None if score is None else score / max(appearance.reference, 1e-6)
                if index not in labelled:
                    records.append({"case": case.name, "count": count, "segment": segment.name,
                                    "side": "first" if direction < 0 else "last",
                                    "offset": (index - end) * direction, "area": int(mask.sum()) / max(end_area, 1),
                                    "presence": trained / max(reference_presence, 1e-6), "presence_raw": trained,
                                    "base_iou": base, "similarity": similarity})
                if not mask.any():
                    break
                previous = mask
                index += direction
    return records


def summarise(records: list[dict]) -> None:
    for score in ("presence", "base_iou", "similarity", "area"):
        def values(rows):
            return [r[score] if r[score] is not None else 0.0 for r in rows]
        inside = [r for r in records if r["offset"] <= 0]
        outside = [r for r in records if r["offset"] > 0]
        edge_in = [r for r in records if r["offset"] == 0]
        edge_out = [r for r in records if r["offset"] == 1]
        all_auc, edge_auc = auc(values(inside), values(outside)), auc(values(edge_in), values(edge_out))
        print(f"{score:>10}: AUC inside vs past the end {all_auc if all_auc is None else round(all_auc, 3)} "
              f"({len(inside)} / {len(outside)} steps); last inside vs first past "
              f"{edge_auc if edge_auc is None else round(edge_auc, 3)} ({len(edge_in)} / {len(edge_out)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dev", type=Path, default=Path("dev-data"))
    parser.add_argument("--cases", default="sample,ch2_aal_small,ch2_aal_posterior_fossa,ch2_aal_coronal")
    parser.add_argument("--counts", default="3")
    parser.add_argument("--weight", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write every walk step as JSON")
    args = parser.parse_args()
    from SALTSegmentLib.host.choices import DEFAULT_STEPS
    names = args.cases.split(",")
    cases = ([sample_case()] if "sample" in names else []) + development_cases(args.dev, [n for n in names
                                                                                         if n != "sample"])
    records = []
    for case in cases:
        for count in (int(c) for c in args.counts.split(",")):
            rows = walk_records(case, count, args.weight, args.steps or DEFAULT_STEPS, args.seed)
            print(f"== {case.name} at {count}")
            summarise(rows)
            records.extend(rows)
            if args.out:
                args.out.write_text(json.dumps(records))
    print("== all")
    summarise(records)


if __name__ == "__main__":
    main()
