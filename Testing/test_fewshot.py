"""Few-shot fine-tuning, the adapter file and propagation on a small crop of the real sample.

The crop (12 axial slices, two structures, two labelled slices) keeps each
training run to tens of seconds on two CPU cores while still using the real
LiteMedSAM weights and real MR.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SALTSegmentLib import preprocessing as pp
from SALTSegmentLib.adapter_file import AdapterFileError, load_adapter, read_adapter_metadata, save_adapter
from SALTSegmentLib.models import load_model
from SALTSegmentLib.pipeline import PropagateJob, TrainJob, run_propagation, run_training
from SALTSegmentLib.predictor import SlicePredictor
from SALTSegmentLib.propagation import PropagationConfig
from SALTSegmentLib.training import (FewShotData, FewShotTrainer, TrainingConfig, TrainingInputError)
from SALTSegmentLib.volume_io import read_image, read_label_map, write_label_map

# Axial slices 26..37 of the sample hold the left thalamus and left caudate together.
CROP_FIRST, CROP_COUNT = 26, 12
KEEP = {"Thalamus_L": 1, "Caudate_L": 2}
LABELLED = [3, 8]          # in crop coordinates
FAST = dict(copies_per_slice=3, batch_size=1, checkpoint_every=0)


@pytest.fixture(scope="module")
def small_case(tmp_path_factory, sample_image_path, sample_labels_path):
    """Image, full reference and 'drawn' labels (two labelled slices) of a crop of the sample."""
    folder = tmp_path_factory.mktemp("small_case")
    image = sitk.ReadImage(str(sample_image_path))
    size = list(image.GetSize())
    start, extent = [0, 0, CROP_FIRST], [size[0], size[1], CROP_COUNT]
    sitk.WriteImage(sitk.RegionOfInterest(image, extent, start), str(folder / "image.nrrd"))
    labels, geometry, segments = read_label_map(sample_labels_path)
    labels = labels[CROP_FIRST:CROP_FIRST + CROP_COUNT]
    kept = [s for s in segments if s.name in KEEP]
    reference = np.zeros_like(labels)
    for segment in kept:
        reference[labels == segment.label] = KEEP[segment.name]
    kept = [replace(s, label=KEEP[s.name]) for s in kept]
    _, crop_geometry = read_image(folder / "image.nrrd")
    drawn = np.zeros_like(reference)
    drawn[LABELLED] = reference[LABELLED]
    write_label_map(folder / "reference.seg.nrrd", reference, crop_geometry, kept)
    write_label_map(folder / "drawn.seg.nrrd", drawn, crop_geometry, kept)
    return folder


@pytest.fixture(scope="module")
def trained(small_case):
    """A short real SALT run on the crop; its adapter is shared by the tests below."""
    job = TrainJob(image=str(small_case / "image.nrrd"), labels=str(small_case / "drawn.seg.nrrd"),
                   out=str(small_case / "adapter.safetensors"),
                   config=TrainingConfig(steps=12, seed=1, **FAST))
    return run_training(job)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def _heldout_dice(model, tokens, image, reference, spacing) -> float:
    """Mean Dice over held-out slices of both segments, token prompts only."""
    volume01 = pp.parse_intensity("auto", image).apply(image)
    predictor = SlicePredictor(model)
    scores = []
    for index in (1, 5, 10):
        predictor.set_slice(pp.take_slice(volume01, "axial", index), pp.slice_pixel_spacing(spacing, "axial"))
        logits, _ = predictor.predict_tokens(tokens)
        for k, label in enumerate((1, 2)):
            truth = reference[index] == label
            if truth.any():
                scores.append(_dice(logits[k].numpy() > 0, truth))
    return float(np.mean(scores))


def test_training_lowers_loss_and_beats_the_untrained_model(small_case, trained):
    losses = trained.result.losses
    assert len(losses) == 12
    assert np.mean(losses[-4:]) < np.mean(losses[:4])

    image, geometry = read_image(small_case / "image.nrrd")
    reference, _, _ = read_label_map(small_case / "reference.seg.nrrd")
    loaded = load_adapter(trained.adapter_path)
    after = _heldout_dice(loaded.model, loaded.prompts.tokens, image, reference, geometry.spacing)

    # The untrained model: same base, prompts at their initial value (box embeddings), no adaptation.
    drawn, _, segments = read_label_map(small_case / "drawn.seg.nrrd")
    base = load_model("lite_medsam")
    data = FewShotData(image, drawn, geometry.spacing, segments, pp.parse_intensity("auto", image), "axial")
    untrained = FewShotTrainer(base, data, TrainingConfig(steps=0, **FAST))
    untrained.run()
    before = _heldout_dice(base, untrained.prompts.tokens.detach(), image, reference, geometry.spacing)
    # Box-initialised prompts are already good on this crop (~0.85): training must still add to that.
    assert after > before + 0.02, (before, after)
    assert after > 0.8


def test_adapter_metadata_records_what_reuse_needs(trained):
    metadata = read_adapter_metadata(trained.adapter_path)
    assert metadata["base_model"] == "lite_medsam"
    assert metadata["base_weights_sha256"] == load_model("lite_medsam").weights_sha256
    assert metadata["method"] == "salt" and metadata["method_config"]["lora_rank"] == 4
    assert [s["name"] for s in metadata["segments"]] == ["Thalamus_L", "Caudate_L"]
    assert metadata["intensity"]["kind"] == "percentile"
    assert metadata["axis"] == "k" and metadata["plane"] == "axial" and metadata["input_size"] == 256
    assert metadata["training"]["steps"] == 12 and metadata["training"]["labelled_slices"] == LABELLED
    assert trained.adapter_path.stat().st_size < 5 * 1024 * 1024


def test_propagation_keeps_grid_and_labelled_slices(small_case, trained, tmp_path):
    out = tmp_path / "propagated.seg.nrrd"
    outcome = run_propagation(PropagateJob(image=str(small_case / "image.nrrd"), adapter=str(trained.adapter_path),
                                           out=str(out), labels=str(small_case / "drawn.seg.nrrd")))
    labels, geometry, segments = read_label_map(out)
    _, image_geometry = read_image(small_case / "image.nrrd")
    assert geometry == image_geometry
    assert [s.name for s in segments] == ["Thalamus_L", "Caudate_L"]
    drawn, _, _ = read_label_map(small_case / "drawn.seg.nrrd")
    np.testing.assert_array_equal(labels[LABELLED], drawn[LABELLED])
    reference, _, _ = read_label_map(small_case / "reference.seg.nrrd")
    unlabelled = [i for i in range(CROP_COUNT) if i not in LABELLED]
    assert _dice(labels[unlabelled] == 1, reference[unlabelled] == 1) > 0.5
    assert outcome.labelled_slices == LABELLED


def test_box_propagation_walks_from_the_labelled_slices(small_case, trained, tmp_path):
    out = tmp_path / "box.nrrd"
    run_propagation(PropagateJob(image=str(small_case / "image.nrrd"), adapter=str(trained.adapter_path),
                                 out=str(out), labels=str(small_case / "drawn.seg.nrrd"),
                                 config=PropagationConfig(mode="box")))
    labels, _, _ = read_label_map(out)
    reference, _, _ = read_label_map(small_case / "reference.seg.nrrd")
    between = [4, 5, 6, 7]  # between the two labelled slices
    assert _dice(labels[between] == 1, reference[between] == 1) > 0.6


def test_saved_adapter_reproduces_predictions(small_case, trained, tmp_path):
    first = load_adapter(trained.adapter_path)
    copy = tmp_path / "copy.safetensors"
    save_adapter(copy, first.model, first.prompts, first.metadata)
    second = load_adapter(copy)
    image, geometry = read_image(small_case / "image.nrrd")
    volume01 = pp.parse_intensity("auto", image).apply(image)
    outputs = []
    for loaded in (first, second):
        predictor = SlicePredictor(loaded.model)
        predictor.set_slice(pp.take_slice(volume01, "axial", 5))
        outputs.append(predictor.predict_tokens(loaded.prompts.tokens)[0])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def test_adapter_for_other_base_weights_is_refused(trained):
    random_model = load_model("lite_medsam", pretrained=False)
    with pytest.raises(AdapterFileError, match="sha256"):
        load_adapter(trained.adapter_path, model=random_model)


def test_foreign_and_corrupt_files_are_refused(trained, tmp_path):
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, str(foreign))
    with pytest.raises(AdapterFileError, match="not a SALTSegment adapter"):
        load_adapter(foreign)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(trained.adapter_path.read_bytes()[:1000])
    with pytest.raises(AdapterFileError):
        load_adapter(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(AdapterFileError):
        read_adapter_metadata(garbage)


def test_segment_without_voxels_on_labelled_slices_is_refused(small_case):
    image, geometry = read_image(small_case / "image.nrrd")
    drawn, _, segments = read_label_map(small_case / "drawn.seg.nrrd")
    drawn[drawn == 2] = 0
    data = FewShotData(image, drawn, geometry.spacing, segments, pp.parse_intensity("auto", image), "axial",
                       labelled_slices=LABELLED)
    with pytest.raises(TrainingInputError, match="Caudate_L"):
        FewShotTrainer(load_model("lite_medsam"), data, TrainingConfig(steps=1, **FAST))
    nothing = np.zeros_like(drawn)
    with pytest.raises(TrainingInputError, match="No labelled slice"):
        FewShotTrainer(load_model("lite_medsam"),
                       FewShotData(image, nothing, geometry.spacing, segments, data.intensity, "axial"),
                       TrainingConfig(steps=1, **FAST))


def test_training_is_deterministic_under_a_seed(small_case):
    image, geometry = read_image(small_case / "image.nrrd")
    drawn, _, segments = read_label_map(small_case / "drawn.seg.nrrd")
    data = FewShotData(image, drawn, geometry.spacing, segments, pp.parse_intensity("auto", image), "axial")
    runs = []
    for _ in range(2):
        trainer = FewShotTrainer(load_model("lite_medsam"), data, TrainingConfig(steps=2, seed=7, **FAST))
        runs.append(trainer.run().losses)
    # Same batches, augmentations and prompts; only the last bits of parallel bf16 reductions may differ.
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-6)
