"""The trainer's set-up: its learning-rate schedule (torch's own schedulers) and an object ready once constructed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from SALTSegmentLib import preprocessing as pp
from SALTSegmentLib.adapters import METHOD_SPECS
from SALTSegmentLib.host.choices import DEFAULT_STEPS
from SALTSegmentLib.training import FewShotData, FewShotTrainer, TrainingConfig, warmup_cosine_schedule
from SALTSegmentLib.volume_io import read_image, read_label_map


def _formula(steps: int, warmup_fraction: float, floor: float = 0.05) -> list[float]:
    """Linear warm-up then cosine to the floor, written out (the hand-made LambdaLR this replaced)."""
    warmup = max(1, int(warmup_fraction * steps))
    factors = []
    for step in range(steps):
        if step < warmup:
            factors.append((step + 1) / warmup)
        else:
            progress = (step - warmup) / max(1, steps - warmup)
            factors.append(floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
    return factors


@pytest.mark.parametrize("steps", [1, 2, 5, 10, 37, DEFAULT_STEPS, 100])
@pytest.mark.parametrize("warmup_fraction", [0.0, 0.1, 0.3])
def test_warmup_cosine_schedule_gives_the_formula(steps, warmup_fraction):
    base = 3e-3
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=base)
    schedule = warmup_cosine_schedule(optimizer, steps, warmup_fraction)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    np.testing.assert_allclose(rates, [base * f for f in _formula(steps, warmup_fraction)], rtol=1e-12, atol=0)


def test_the_trainer_is_ready_to_step_once_constructed(sample_image_path, sample_labels_path):
    """No prepare() phase: the bank, the prompts, the optimiser and what the encoder does are set by __init__."""
    from SALTSegmentLib.models import load_model

    image, geometry = read_image(sample_image_path)
    labels, _, segments = read_label_map(sample_labels_path)
    image, labels = image[26:32], labels[26:32]
    kept = [s for s in segments if s.name == "Thalamus_L"]
    drawn = np.where(labels == kept[0].label, labels, 0)
    drawn[[0, 1, 3, 5]] = 0
    data = FewShotData(image, drawn, geometry.spacing, kept, pp.parse_intensity("auto", image), "k")
    model = load_model("lite_medsam")
    trainer = FewShotTrainer(model, data, TrainingConfig(method="decoder", steps=3, copies_per_slice=2,
                                                         batch_size=1, checkpoint_every=0))
    assert trainer.frozen_encoder and trainer.prefix_depth == model.frozen_prefix_depth()
    assert trainer.learning_rate == METHOD_SPECS["decoder"].learning_rate
    assert trainer.slices and trainer.bank.features.shape[0] == 2 * len(trainer.slices)   # two copies each
    loss, rate = trainer.step()
    assert math.isfinite(loss) and rate == pytest.approx(trainer.learning_rate)
    result = trainer.run()                 # continues from where step() left it: no hidden re-initialisation
    assert result.steps_done == 3 and all(math.isfinite(v) for v in result.losses)


def test_recomputing_activations_gives_the_same_gradients_as_keeping_them(sample_image_path):
    """The CPU default (recompute each encoder block in the backward pass) changes memory, not the result."""
    import copy

    from SALTSegmentLib.adapters import apply_method
    from SALTSegmentLib.models import load_model

    image, geometry = read_image(sample_image_path)
    slice_geometry = pp.slice_geometry_for(image.shape[1:], pp.slice_pixel_spacing(geometry.spacing, "k"), 256)
    model = load_model("lite_medsam")
    apply_method(model, "salt", {})
    depth = model.frozen_prefix_depth()
    assert depth > 0
    scaled = pp.parse_intensity("auto", image).apply(image)
    inputs = torch.stack([pp.slice_to_input(pp.rescale_slice(scaled[i]), slice_geometry) for i in (30, 34)])
    with torch.no_grad():
        prefix = model.encode_prefix(inputs, slice_geometry.resized_shape, depth)
    gradients = []
    for recompute in (False, True):
        trained = copy.deepcopy(model)
        embedding = trained.encode_rest(prefix, depth, recompute=recompute)
        (embedding.float() ** 2).mean().backward()
        gradients.append({n: p.grad.clone() for n, p in trained.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys() and len(gradients[0]) > 0
    encoder = [n for n in gradients[0] if n.startswith("image_encoder.layers")]
    assert sum(bool(gradients[0][n].abs().sum() > 0) for n in encoder) > len(encoder) // 2   # the blocks train
    for name in gradients[0]:
        torch.testing.assert_close(gradients[1][name], gradients[0][name], rtol=1e-5, atol=1e-7)


def test_a_slice_marked_without_a_segment_trains_it_as_absent_and_leaves_the_others_unknown(sample_image_path,
                                                                                           sample_labels_path):
    """A slice the user checked for one segment only says nothing of the others: no loss term for them there."""
    from SALTSegmentLib.models import load_model
    from SALTSegmentLib.training import TrainingInputError

    image, geometry = read_image(sample_image_path)
    labels, _, segments = read_label_map(sample_labels_path)
    image, labels = image[40:56], labels[40:56]
    kept = [s for s in segments if s.name in ("Thalamus_L", "Caudate_L")]
    thalamus = kept[0] if kept[0].name == "Thalamus_L" else kept[1]
    drawn = np.where(np.isin(labels, [s.label for s in kept]), labels, 0)
    drawn[[i for i in range(16) if i not in (2, 6)]] = 0
    assert not (labels[13] == thalamus.label).any() and (labels[13] != 0).any()   # past the thalamus, not empty
    intensity = pp.parse_intensity("auto", image)
    data = FewShotData(image, drawn, geometry.spacing, kept, intensity, "k", absent={"Thalamus_L": [13]})
    trainer = FewShotTrainer(load_model("lite_medsam"), data,
                             TrainingConfig(method="decoder", steps=1, copies_per_slice=2, batch_size=1))
    assert trainer.slices == [2, 6]                       # the labelled slices stay what the user drew
    bank = trainer.bank
    assert bank.features.shape[0] == 2 * 3                # slices 2, 6 and the marked slice 13, two copies each
    order = [s.name for s in trainer.segments]
    marked_rows = bank.known[4:]
    assert marked_rows[:, order.index("Thalamus_L")].all() and not marked_rows[:, order.index("Caudate_L")].any()
    assert not bank.present[4:].any() and bank.known[:4].all()
    assert math.isfinite(trainer.step()[0])

    for absent, message in (({"Putamen_L": [13]}, "not a selected segment"), ({"Thalamus_L": [16]}, "outside"),
                            ({"Thalamus_L": [6]}, "drawn on slice")):
        bad = FewShotData(image, drawn, geometry.spacing, kept, intensity, "k", absent=absent)
        with pytest.raises(TrainingInputError, match=message):
            FewShotTrainer(load_model("lite_medsam"), bad, TrainingConfig(method="decoder", steps=1))
