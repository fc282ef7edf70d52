"""Structures smaller than one pixel of the model's input still train (issue: they crashed the sampler).

A radiologist labels exactly these: a one-voxel mark on a 512 x 512 slice,
or a thin structure on a coronal cut of a 0.1 x 0.1 x 10 mm volume, where a
slice is 100 times longer one way than the other. Resized to the model's
256 px, such a mask covers under half a pixel; thresholding the resized
coverage at 0.5 lost it and training failed deep in the sampler
(``random_ expects 'from' to be less than 'to'``). Each segment keeps at
least its strongest pixel, in the bank and in every augmented copy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from SALTSegmentLib import preprocessing as pp
from SALTSegmentLib.models import load_model
from SALTSegmentLib.training import FewShotData, FewShotTrainer, TrainingConfig
from SALTSegmentLib.volume_io import Segment

FAST = dict(copies_per_slice=2, batch_size=1, checkpoint_every=0, steps=1, seed=0)


def _noise_volume(shape: tuple[int, int, int]) -> np.ndarray:
    return np.random.default_rng(0).normal(100.0, 20.0, size=shape).astype(np.float32)


def _train_one_step(data: FewShotData) -> FewShotTrainer:
    trainer = FewShotTrainer(load_model("lite_medsam"), data, TrainingConfig(**FAST))
    loss, _ = trainer.step()
    assert np.isfinite(loss)
    return trainer


def test_binarizing_keeps_a_segment_below_half_a_pixel():
    coverage = torch.zeros(8, 8)
    coverage[3, 4] = 0.04                       # a voxel shrunk to 1/25 of a pixel
    kept = pp.binarize_keeping_small(coverage)
    assert kept.sum() == 1 and kept[3, 4]
    assert not pp.binarize_keeping_small(torch.zeros(8, 8)).any()     # nothing stays nothing
    large = torch.zeros(8, 8)
    large[2:6, 2:6] = 0.9
    large[0, 0] = 0.2
    assert torch.equal(pp.binarize_keeping_small(large), large >= 0.5)  # ordinary masks: plain threshold


def test_one_voxel_on_a_512_slice_trains():
    image = _noise_volume((3, 512, 512))
    labels = np.zeros(image.shape, np.uint8)
    labels[1, 200, 301] = 1
    data = FewShotData(image, labels, (0.5, 0.5, 2.0), [Segment(1, "dot")],
                       pp.parse_intensity("auto", image), "k")
    trainer = _train_one_step(data)
    assert trainer.bank.present[:, 0].all()
    assert (trainer.bank.targets[:, 0].flatten(1).sum(1) >= 1).all()   # every augmented copy keeps the dot


def test_a_thin_structure_on_coronal_slices_of_a_very_anisotropic_volume_trains():
    # (z, y, x) = (12, 8, 64) voxels of 10 x 0.1 x 0.1 mm: a coronal slice (fixed y) is 6.4 mm by 120 mm.
    image = _noise_volume((12, 8, 64))
    labels = np.zeros(image.shape, np.uint8)
    labels[5, 4, 30] = 1                        # one voxel: 0.1 mm wide on a 120 mm tall slice
    labels[6, 4, 30] = 1
    data = FewShotData(image, labels, (0.1, 0.1, 10.0), [Segment(1, "vessel")],
                       pp.parse_intensity("auto", image), "j")
    trainer = _train_one_step(data)
    assert (trainer.bank.targets[:, 0].flatten(1).sum(1) >= 1).all()


@pytest.mark.parametrize("shape", [(3, 512, 512)])
def test_a_mask_that_is_one_voxel_is_not_refused_as_empty(shape):
    # The input check counts voxels, not resized pixels: a one-voxel segment is a labelled segment.
    from SALTSegmentLib.training import check_training_data

    image = _noise_volume(shape)
    labels = np.zeros(shape, np.uint8)
    labels[2, 0, 0] = 1                         # in the corner, where cropping or padding could lose it
    data = FewShotData(image, labels, (1.0, 1.0, 1.0), [Segment(1, "corner")], pp.parse_intensity("auto", image),
                       "k")
    assert check_training_data(data) == [2]
