"""The demo: what a radiologist's session does, on the embedded real sample.

Five axial slices spread over the structures are "drawn" (copied from the
reference), a SALT adapter is fine-tuned on LiteMedSAM, the volume is
propagated, and the result is scored against the full reference, on all
slices and on the slices the model had to fill in itself, beside what Slicer's
*Fill between slices* makes of the same drawn slices. Everything lands in
one folder: segmentation, adapter, JSON + Markdown report, a montage and the
loss curve.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .host.choices import DEFAULT_STEPS
from .interpolation import fill_between_slices
from .metrics import evaluate_label_maps, format_table
from .pipeline import PropagateJob, TrainJob, run_propagation, run_training
from .progress import make_reporter
from .propagation import PropagationConfig
from .report import write_loss_curve, write_montage, write_report
from .sample_data import sample_paths, spread_slices
from .slices import array_axis
from .training import TrainingConfig
from .volume_io import read_image, read_label_map, write_label_map
from .worker_protocol import EXIT_INTERRUPTED, EXIT_OK


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_demo(out: Path, method: str = "salt", steps: int = DEFAULT_STEPS, mode: str = "box",
             labelled_count: int = 5, device: str = "auto", should_stop: Optional[Callable[[], bool]] = None,
             reporter=None) -> int:
    """Run the demo into ``out``; print the Dice table; return an exit code.

    Progress goes through the CLI's reporter (``progress.make_reporter``), so
    the demo shows the same bars and messages as ``train`` and ``propagate``.
    """
    reporter = reporter or make_reporter("bar")
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    image_path, labels_path = sample_paths()
    image, geometry = read_image(image_path)
    reference, _, segments = read_label_map(labels_path)
    labelled = spread_slices(reference, labelled_count, axis=array_axis("axial"))
    drawn = np.zeros_like(reference)
    drawn[labelled] = reference[labelled]
    drawn_path = write_label_map(out / "labelled_slices.seg.nrrd", drawn, geometry, segments)
    _say(f"sample: {image_path.name} {image.shape[::-1]} voxels, {len(segments)} structures; "
         f"labelled axial slices {labelled}")

    train_job = TrainJob(image=str(image_path), labels=str(drawn_path), out=str(out / "adapter.safetensors"),
                         axis="axial", config=TrainingConfig(method=method, steps=steps, device=device))
    trained = run_training(train_job, on_step=reporter.train_step, should_stop=should_stop,
                           on_message=reporter.message, on_ready=lambda: reporter.start("train", steps))
    reporter.close()
    if trained.result.interrupted:
        _say(f"stopped; adapter saved to {trained.adapter_path}")
        return EXIT_INTERRUPTED

    propagate_job = PropagateJob(image=str(image_path), adapter=str(trained.adapter_path),
                                 out=str(out / "segmentation.seg.nrrd"), labels=str(drawn_path),
                                 config=PropagationConfig(mode=mode, device=device))
    propagated = run_propagation(propagate_job, on_progress=reporter.propagation_step, should_stop=should_stop,
                                 on_message=reporter.message, on_ready=lambda: reporter.start("propagate", 0))
    reporter.close()
    if propagated.result.interrupted:
        return EXIT_INTERRUPTED

    prediction = propagated.result.labels
    evaluation = evaluate_label_maps(prediction, reference, segments, geometry.spacing, "axial")
    unseen = evaluate_label_maps(prediction, reference, segments, geometry.spacing, "axial",
                                 exclude_slices=set(labelled))
    fill_unseen = evaluate_label_maps(fill_between_slices(drawn, "axial"), reference, segments, geometry.spacing,
                                      "axial", exclude_slices=set(labelled))   # what the user has without us
    write_montage(out / "montage.png", image, reference, prediction, segments, axis="axial",
                  labelled=set(labelled), spacing_xyz=geometry.spacing)
    write_loss_curve(out / "loss_curve.png", trained.result.losses, trained.result.learning_rates,
                     title=f"{method} fine-tuning loss")
    total_seconds = time.perf_counter() - started
    summary = {
        "title": "SALTSegment demo",
        "settings": {"model": trained.metadata.base_model, "method": method, "steps": steps,
                     "labelled_slices": labelled, "propagation": mode, "device": trained.result.device,
                     "precision": trained.result.precision},
        "timings": {"setup_s": round(trained.result.setup_seconds, 1),
                    "training_s": round(trained.result.train_seconds, 1),
                    "propagation_s": round(propagated.result.seconds, 1), "total_s": round(total_seconds, 1)},
        "dice_unlabelled_slices": {s.name: round(s.dice, 4) for s in unseen.segments},
        "extents": [e.to_dict() for e in propagated.result.extents],
        "estimate": propagated.result.estimate.to_dict() if propagated.result.estimate else None,
        "suggested_slices": [s.to_dict() for s in propagated.result.suggestions],
        "mean_dice_unlabelled_slices": round(unseen.mean_dice, 4),
        "fill_between_slices_dice_unlabelled_slices": {s.name: round(s.dice, 4) for s in fill_unseen.segments},
        "fill_between_slices_mean_dice_unlabelled_slices": round(fill_unseen.mean_dice, 4),
        "final_loss": trained.result.losses[-1],
    }
    write_report(out, "report", summary, evaluation)
    print(format_table(evaluation))
    if propagated.result.estimate is not None:
        print(f"before scoring, the propagation's own {propagated.result.estimate.describe()}")
    print(f"mean Dice on the {image.shape[0] - len(labelled)} slices the model filled in: {unseen.mean_dice:.3f} "
          f"(Fill between slices from the same drawn slices: {fill_unseen.mean_dice:.3f})")
    print(f"total {total_seconds:.0f} s (training {trained.result.train_seconds:.0f} s, "
          f"propagation {propagated.result.seconds:.0f} s); outputs in {out}")
    return EXIT_OK
