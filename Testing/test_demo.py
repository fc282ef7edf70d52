"""``saltsegment demo``, the README's first command, end to end on the embedded sample (two training steps).

The demo's numbers at its 40 steps are measured by running it (README,
"Quality"); this checks that every output is written and that the model's
score on the slices it filled in comes with Fill between slices' score on
the same slices, from the same drawn slices.
"""

from __future__ import annotations

import json

import numpy as np

from SALTSegmentLib.demo import run_demo
from SALTSegmentLib.interpolation import fill_between_slices
from SALTSegmentLib.metrics import evaluate_label_maps
from SALTSegmentLib.volume_io import read_image, read_label_map
from SALTSegmentLib.worker_protocol import EXIT_OK


def test_the_demo_writes_every_output_and_scores_fill_between_slices_beside_the_model(tmp_path, capsys,
                                                                                     sample_labels_path):
    out = tmp_path / "demo"
    assert run_demo(out, steps=2, device="cpu") == EXIT_OK
    for name in ("segmentation.seg.nrrd", "adapter.safetensors", "labelled_slices.seg.nrrd", "report.json",
                 "report.md", "montage.png", "loss_curve.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    labelled = report["settings"]["labelled_slices"]
    assert len(labelled) == 5 and report["settings"]["steps"] == 2

    reference, _, segments = read_label_map(sample_labels_path)
    drawn, _, _ = read_label_map(out / "labelled_slices.seg.nrrd")
    assert np.array_equal(drawn[labelled], reference[labelled]) and not np.delete(drawn, labelled, axis=0).any()
    _, geometry = read_image(out / "segmentation.seg.nrrd")
    fill = evaluate_label_maps(fill_between_slices(drawn, "axial"), reference, segments, geometry.spacing, "axial",
                               exclude_slices=set(labelled))
    assert report["fill_between_slices_mean_dice_unlabelled_slices"] == round(fill.mean_dice, 4)
    assert set(report["fill_between_slices_dice_unlabelled_slices"]) == {s.name for s in segments}
    assert 0.5 < fill.mean_dice < 0.9                      # the shape alone: good between slices, nothing beyond

    printed = capsys.readouterr().out
    model = report["mean_dice_unlabelled_slices"]
    assert (f"slices the model filled in: {model:.3f} (Fill between slices from the same drawn slices: "
            f"{fill.mean_dice:.3f})") in printed
