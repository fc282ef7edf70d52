"""Promptable prediction on real data and parity with segment_anything's own predictor.

- Real LiteMedSAM on the embedded T1 MR sample: oracle boxes (+5 px) segment
  the thalamus well, a random-weight model of the same architecture does not
  (a drop of the first towards the second means a loading or preprocessing bug).
- Parity: ViT-B with random weights at native 1024 input gives the same box
  and point logits through :class:`SlicePredictor` as through
  ``segment_anything.SamPredictor`` sharing the same modules.

Costly on a small CPU (the parity test runs the ViT-B encoder at 1024 twice);
each model is built once.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from SALTSegmentLib import preprocessing as pp
from SALTSegmentLib.models import load_model
from SALTSegmentLib.predictor import SlicePredictor

THALAMUS_L = 1
DICE_SLICES = (33, 38, 43, 48)  # axial slices through Thalamus_L (present on 30..51)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


@pytest.fixture(scope="module")
def sample(sample_image_path, sample_labels_path):
    """The sample mapped to [0, 1] with the 'auto' (MR: percentiles) setting, labels and axial pixel spacing."""
    from SALTSegmentLib.volume_io import read_image, read_label_map

    image, geometry = read_image(sample_image_path)
    labels, label_geometry, segments = read_label_map(sample_labels_path)
    assert not geometry.differences(label_geometry)
    assert {s.name: s.label for s in segments}["Thalamus_L"] == THALAMUS_L
    mapping = pp.parse_intensity("auto", image)
    assert mapping.kind == "percentile"
    return mapping.apply(image), labels, geometry.spacing


def thalamus_dice(model, sample) -> list[float]:
    volume, labels, spacing_xyz = sample
    predictor = SlicePredictor(model)
    scores = []
    for index in DICE_SLICES:
        mask = pp.take_slice(labels, "axial", index) == THALAMUS_L
        assert mask.sum() > 20
        predictor.set_slice(pp.take_slice(volume, "axial", index), pp.slice_pixel_spacing(spacing_xyz, "axial"))
        logits, iou = predictor.predict_boxes(pp.mask_box(mask, margin=5)[None])
        assert logits.shape == (1, *mask.shape) and iou.shape == (1,)
        scores.append(dice(logits[0].numpy() > 0, mask))
    return scores


def test_lite_medsam_segments_the_thalamus_from_a_box(lite_medsam, sample):
    scores = thalamus_dice(lite_medsam, sample)
    assert np.mean(scores) >= 0.75, scores
    assert min(scores) >= 0.5, scores


def test_random_weights_fail_on_the_same_prompts(sample):
    torch.manual_seed(0)
    random_model = load_model("lite_medsam", pretrained=False)
    assert random_model.weights_sha256 == "random"
    scores = thalamus_dice(random_model, sample)
    assert np.mean(scores) < 0.2, scores


@pytest.fixture(scope="module")
def coronal_predictor(lite_medsam, sample):
    """The real model on a coronal slice of the sample (62 x 124 pixels: non-square input)."""
    volume, labels, spacing_xyz = sample
    index = 60
    predictor = SlicePredictor(lite_medsam)
    with pytest.raises(RuntimeError, match="set_slice"):
        predictor.predict_boxes(np.array([[0, 0, 5, 5]]))
    predictor.set_slice(pp.take_slice(volume, "coronal", index), pp.slice_pixel_spacing(spacing_xyz, "coronal"))
    return predictor, pp.take_slice(labels, "coronal", index)


def test_prompts_on_a_non_square_slice_return_slice_grid_logits(coronal_predictor):
    predictor, labels = coronal_predictor
    rows, cols = labels.shape
    assert predictor.slice_geometry.resized_shape == (128, 256)  # 62 x 124 mm -> long side 256
    assert predictor.embedding.shape == (1, 256, 64, 64)
    embedding = predictor.embedding

    present = [label for label in np.unique(labels) if label]
    assert len(present) >= 2
    centres = np.array([[np.argwhere(labels == label).mean(axis=0)[::-1]] for label in present])  # (N, 1, x y)
    logits, iou = predictor.predict_points(centres, np.ones((len(present), 1)))
    assert logits.shape == (len(present), rows, cols) and iou.shape == (len(present),)
    assert torch.isfinite(logits).all() and torch.isfinite(iou).all()

    # Positive + negative points, several per prompt.
    points = np.array([[[40.0, 30.0], [10.0, 5.0], [100.0, 50.0]]])
    logits, iou = predictor.predict_points(points, np.array([[1, 0, 0]]))
    assert logits.shape == (1, rows, cols) and iou.shape == (1,)

    boxes = np.stack([pp.mask_box(labels == label, margin=5) for label in present])
    logits, iou = predictor.predict_boxes(boxes)
    assert logits.shape == (len(present), rows, cols)
    scores = [dice(logits[i].numpy() > 0, labels == label) for i, label in enumerate(present)]
    assert np.mean(scores) > 0.5, scores  # box prompts also work on coronal slices

    tokens = torch.randn(3, 2, 256)
    logits, iou = predictor.predict_tokens(tokens)
    assert logits.shape == (3, rows, cols) and iou.shape == (3,)
    assert predictor.embedding is embedding  # computed once per slice, reused by every prompt


@pytest.fixture(scope="module")
def parity_case():
    """Our ViT-B (random weights, 1024) and a segment_anything SamPredictor sharing its modules, one image each."""
    from segment_anything import SamPredictor
    from segment_anything.modeling import Sam

    torch.manual_seed(0)
    ours = load_model("sam_vit_b", pretrained=False)
    assert ours.input_size == 1024
    sam = Sam(image_encoder=ours.image_encoder, prompt_encoder=ours.prompt_encoder,
              mask_decoder=ours.mask_decoder).eval()

    # 1024 x 768 grey image spanning exactly 0..255: no resize on either side, and our per-slice min-max
    # rescaling leaves image / 255 unchanged.
    rng = np.random.default_rng(0)
    rows, cols = np.indices((1024, 768))
    grey = 127.5 + 90 * np.sin(rows / 60.0) * np.cos(cols / 45.0) + rng.normal(0, 15, (1024, 768))
    grey[300:650, 250:500] += 60  # a bright block for the box
    grey = np.clip(np.round(grey), 0, 255).astype(np.uint8)
    grey[0, 0], grey[-1, -1] = 0, 255

    reference = SamPredictor(sam)
    reference.set_image(np.repeat(grey[..., None], 3, axis=2))
    predictor = SlicePredictor(ours)
    predictor.set_slice(grey.astype(np.float32) / 255.0, (1.0, 1.0))
    return reference, predictor


def test_embeddings_match_segment_anything(parity_case):
    reference, predictor = parity_case
    assert reference.input_size == predictor.slice_geometry.resized_shape == (1024, 768)
    expected = reference.features
    assert predictor.embedding.shape == expected.shape == (1, 256, 64, 64)
    assert torch.allclose(predictor.embedding, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_box_logits_match_segment_anything(parity_case):
    reference, predictor = parity_case
    for box in ([250, 300, 499, 649], [10, 900, 700, 1010]):
        box = np.array(box)
        masks, iou, _ = reference.predict(box=box, multimask_output=False, return_logits=True)
        logits, our_iou = predictor.predict_boxes(box[None])
        assert masks.shape == (1, 1024, 768) and logits.shape == (1, 1024, 768)
        scale = np.abs(masks).max()
        assert np.abs(logits.numpy() - masks).max() <= 1e-3 * scale + 1e-4, box
        assert np.allclose(our_iou.numpy(), iou, rtol=1e-4, atol=1e-5)


def test_point_logits_match_segment_anything(parity_case):
    reference, predictor = parity_case
    points = np.array([[400.0, 500.0], [100.0, 120.0]])
    labels = np.array([1, 0])
    masks, iou, _ = reference.predict(point_coords=points, point_labels=labels, multimask_output=False,
                                      return_logits=True)
    logits, our_iou = predictor.predict_points(points[None], labels[None])
    assert np.abs(logits.numpy() - masks).max() <= 1e-3 * np.abs(masks).max() + 1e-4
    assert np.allclose(our_iou.numpy(), iou, rtol=1e-4, atol=1e-5)
