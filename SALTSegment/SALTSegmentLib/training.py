"""Few-shot fine-tuning: a handful of labelled slices -> an adapted model with learned prompts.

The base model stays frozen; the method (see :mod:`adapters.methods`) decides what
trains. The cost that matters on a CPU is the image encoder, so:

- every labelled slice is augmented a fixed number of times up front, and the
  encoder stages with nothing to train (TinyViT's high-resolution conv stage,
  or the whole encoder for ``decoder``) run once per augmented copy, not at
  every step;
- each step decodes only a few segments per slice (present ones first), and
  slices holding rare segments are drawn more often, so a structure seen on
  two slices is not drowned by one seen on ten;
- a slice is sometimes prompted with the learned tokens alone and sometimes
  with tokens plus a jittered box, so the same adapter serves token-only
  propagation and box-guided propagation from the labelled slices.

Several volumes (cases) train one adapter: their segments are matched by
name, each case's slices go into one bank, and the draw balances cases as well
as segments, so a small volume is not drowned by a large one. A segment a case
does not hold is unknown there (no loss term), never a negative. A warm start
(:class:`WarmStart`) continues a parent adapter: the model already carries its
tensors, and its segments keep their tokens.

Under ``torchrun`` (:mod:`distributed`) every rank draws the same global batch
of ``batch_size`` x ranks rows and computes its own share; DistributedDataParallel
averages the gradients, scaled so that the step equals one process's step on
the whole global batch.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import preprocessing as pp
from .adapters import apply_method, encoder_is_frozen, method_spec
from .augmentation import AugmentationConfig, augment
from .devices import autocast, autocast_dtype, resolve_device
from .label_layers import value_mask
from .losses import dice_bce_loss
from .models import PromptableSegmenter
from .host.choices import DEFAULT_STEPS
from .prompts import SegmentPrompts
from .slices import labelled_slices, voxel_axis
from .volume_io import Segment

if TYPE_CHECKING:
    from .distributed import Distributed


class TrainingInputError(ValueError):
    """The labelled data cannot train an adapter (no labelled slice, an empty segment, ...)."""


@dataclass
class TrainingConfig:
    """Hyper-parameters of one fine-tuning run; stored with the adapter."""

    method: str = "salt"
    method_options: dict = field(default_factory=dict)
    steps: int = DEFAULT_STEPS
    batch_size: int = 2
    learning_rate: Optional[float] = None      # None: the method's default (its MethodSpec.learning_rate)
    weight_decay: float = 1e-2
    warmup_fraction: float = 0.1
    segments_per_slice: int = 4
    box_prompt_fraction: float = 0.5
    box_jitter_pixels: float = 6.0
    copies_per_slice: int = 6
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    checkpoint_every: int = 25
    recompute_activations: Optional[bool] = None   # None: on for the CPU (memory), off on a GPU (speed)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FewShotData:
    """A volume with some labelled slices: what the radiologist drew."""

    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    segments: list[Segment]
    intensity: pp.IntensityMapping
    axis: str = "k"                            # a voxel axis key (see slices.py); "axial" still reads as k
    labelled_slices: Optional[list[int]] = None
    name: str = ""                             # the case's name in messages (its image file name)
    # Segment name -> slices the user marked without it (not labelled for the others): negatives for it alone.
    absent: dict[str, list[int]] = field(default_factory=dict)

    def resolved_slices(self) -> list[int]:
        """The explicit list, or every slice where a selected segment has voxels."""
        count = pp.slice_count(self.labels.shape, self.axis)
        if self.labelled_slices is not None:
            bad = [s for s in self.labelled_slices if not 0 <= s < count]
            if bad:
                raise TrainingInputError(f"Labelled slice(s) {bad} outside 0..{count - 1} along voxel axis "
                                         f"{voxel_axis(self.axis)}")
            return sorted(set(int(s) for s in self.labelled_slices))
        return labelled_slices(self.labels, [s.label for s in self.segments], self.axis)

    def marked_only_slices(self, labelled: Sequence[int]) -> list[int]:
        """Slices marked without some segment that are not labelled slices (known for those segments alone)."""
        return sorted({int(i) for slices in self.absent.values() for i in slices} - set(labelled))


def check_absent_marks(data: FewShotData) -> None:
    """Refuse marks of a segment the case does not train, off the volume, or on a slice where it is drawn."""
    count = pp.slice_count(data.labels.shape, data.axis)
    by_name = {s.name: s.label for s in data.segments}
    what = f"{data.name}: " if data.name else ""
    for name, slices in data.absent.items():
        if name not in by_name:
            raise TrainingInputError(f"{what}marked absent: '{name}' is not a selected segment "
                                     f"({', '.join(by_name)})")
        outside = [int(i) for i in slices if not 0 <= int(i) < count]
        if outside:
            raise TrainingInputError(f"{what}'{name}' marked absent on slice(s) {outside}, outside 0..{count - 1} "
                                     f"along voxel axis {voxel_axis(data.axis)}")
        drawn_on = [int(i) for i in slices if (pp.take_slice(data.labels, data.axis, int(i)) == by_name[name]).any()]
        if drawn_on:
            raise TrainingInputError(f"{what}'{name}' is drawn on slice(s) {drawn_on}, which are marked without it")


def check_training_data(data: FewShotData, slices: Optional[list[int]] = None) -> list[int]:
    """Refuse data that cannot train an adapter; return the labelled slices.

    Cheap (no model needed), so the pipeline runs it before loading a model.
    """
    if not data.segments:
        raise TrainingInputError("The label map holds no segment: draw at least one segment on one slice")
    check_absent_marks(data)
    slices = data.resolved_slices() if slices is None else slices
    if not slices:
        if data.labels.any():  # something is drawn, just not the segments chosen
            names = ", ".join(f"'{s.name}'" for s in data.segments)
            raise TrainingInputError(f"Segment {names} has no voxels in the label map; draw it on at least one "
                                     "slice or leave it out" if len(data.segments) == 1 else
                                     f"Segments {names} have no voxels in the label map; draw them first")
        raise TrainingInputError("No labelled slice: draw at least one selected segment on one slice")
    stack = np.stack([pp.take_slice(data.labels, data.axis, s) for s in slices])
    for segment in data.segments:
        if not (stack == segment.label).any():
            raise TrainingInputError(
                f"Segment '{segment.name}' has no voxels on the labelled slices; draw it on at least one "
                "slice or leave it out")
    return slices


def merge_segments(cases: Sequence[FewShotData], first: Sequence[Segment] = ()) -> list[Segment]:
    """The adapter's segments: ``first`` (a parent adapter's), then every case's, matched by name.

    A segment keeps the label value and colour it has where it first
    appears; a value already taken by another name moves to the lowest free one.
    """
    merged = list(first)
    for case in cases:
        for segment in case.segments:
            if any(s.name == segment.name for s in merged):
                continue
            taken = {s.label for s in merged}
            label = segment.label if segment.label not in taken else next(v for v in range(1, 1 << 16)
                                                                          if v not in taken)
            merged.append(Segment(label, segment.name, segment.color))
    return merged


def check_training_cases(cases: Sequence[FewShotData]) -> list[list[int]]:
    """Refuse cases that cannot train one adapter together; return each case's labelled slices.

    One case is checked as always (:func:`check_training_data`). With several,
    each needs a labelled slice, and each segment voxels on the labelled
    slices of at least one case; a case may leave a segment out.
    """
    if len(cases) == 1:
        return [check_training_data(cases[0])]
    all_slices, drawn = [], set()
    for number, case in enumerate(cases, start=1):
        what = case.name or f"case {number}"
        if not case.segments:
            raise TrainingInputError(f"{what}: the label map holds no segment")
        check_absent_marks(case)
        slices = case.resolved_slices()
        if not slices:
            raise TrainingInputError(f"{what}: no labelled slice (no selected segment has voxels)")
        stack = np.stack([pp.take_slice(case.labels, case.axis, s) for s in slices])
        drawn |= {s.name for s in case.segments if (stack == s.label).any()}
        all_slices.append(slices)
    missing = [s.name for s in merge_segments(cases) if s.name not in drawn]
    if missing:
        raise TrainingInputError(f"Segment{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
                                 "has no voxels on the labelled slices of any case; draw it or leave it out")
    return all_slices


@dataclass
class WarmStart:
    """What a parent adapter hands to a continued training (the model already carries its tensors)."""

    method_config: dict
    tokens: dict[str, torch.Tensor]     # segment name -> its learned tokens (tokens, width)


@dataclass
class StepReport:
    step: int
    total: int
    loss: float
    learning_rate: float
    elapsed_s: float
    eta_s: float


@dataclass
class TrainingResult:
    steps_done: int
    losses: list[float]
    learning_rates: list[float]
    setup_seconds: float
    train_seconds: float
    interrupted: bool
    labelled_slices: list[int]
    device: str
    precision: str
    world_size: int = 1

    def summary(self) -> dict:
        summary = {
            "steps": self.steps_done, "final_loss": self.losses[-1] if self.losses else None,
            "setup_seconds": round(self.setup_seconds, 2), "train_seconds": round(self.train_seconds, 2),
            "interrupted": self.interrupted, "labelled_slices": self.labelled_slices,
            "device": self.device, "precision": self.precision,
        }
        if self.world_size > 1:
            summary["processes"] = self.world_size
        return summary


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, steps: int, warmup_fraction: float,
                           floor: float = 0.05) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up over ``warmup_fraction`` of the steps (at least one), then a cosine down to ``floor``.

    Factor of the base rate at step s (w warm-up steps): (s + 1) / w during
    warm-up, then floor + (1 - floor) (1 + cos(pi (s - w) / (steps - w))) / 2.
    """
    warmup = max(1, int(warmup_fraction * steps))
    lowest = floor * optimizer.param_groups[0]["lr"]   # read before LinearLR scales the rate down
    schedulers = torch.optim.lr_scheduler
    return schedulers.SequentialLR(optimizer, [
        schedulers.LinearLR(optimizer, start_factor=1.0 / warmup, end_factor=1.0, total_iters=max(warmup - 1, 1)),
        schedulers.CosineAnnealingLR(optimizer, T_max=max(1, steps - warmup), eta_min=lowest),
    ], milestones=[warmup])


@dataclass
class _Bank:
    """Augmented copies of the labelled slices, with whatever encoder work is input-only done."""

    features: torch.Tensor        # images, prefix features or embeddings, per copy
    targets: torch.Tensor         # (copies, K, L, L) bool
    boxes: torch.Tensor           # (copies, K, 4) in the input frame; NaN where absent
    present: torch.Tensor         # (copies, K) bool
    weights: torch.Tensor         # sampling weight per copy
    known: torch.Tensor           # (copies, K) bool: the copy's case holds the segment (else no loss term)
    case_index: torch.Tensor      # (copies,) which case a copy comes from
    valid_hw: torch.Tensor        # (copies, 2) the unpadded input size of the copy's case


@dataclass
class _RowPlan:
    """One row of a step: a copy of the bank, the segments decoded on it, and its box prompts (or None)."""

    copy_index: int
    chosen: torch.Tensor
    boxes: Optional[torch.Tensor]


class _StepLoss(torch.nn.Module):
    """The model and the prompts as one module whose forward is a step's loss (what DDP wraps)."""

    def __init__(self, trainer: "FewShotTrainer") -> None:
        super().__init__()
        self.model = trainer.model
        self.prompts = trainer.prompts
        self._loss = trainer._step_loss

    def forward(self, plans: list[_RowPlan]) -> torch.Tensor:
        return self._loss(plans)


class FewShotTrainer:
    """Fine-tune ``model`` (in place) and learn one prompt per segment.

    Ready to :meth:`step` once constructed: the constructor applies the
    method (or, with ``warm_start``, takes the model as its parent left it),
    then builds the bank of augmented copies of every case's labelled slices
    (with the input-only encoder work done), initialises the prompts and
    creates the optimiser and its schedule (``setup_seconds`` is that last
    part). ``data`` is one case or several; ``segments`` (default: every
    case's, matched by name) are the adapter's. ``distributed`` makes the
    trainer one rank of a ``torchrun`` job.
    """

    def __init__(self, model: PromptableSegmenter, data: FewShotData | Sequence[FewShotData],
                 config: TrainingConfig, segments: Optional[Sequence[Segment]] = None,
                 warm_start: Optional[WarmStart] = None, distributed: Optional["Distributed"] = None) -> None:
        self.model = model
        self.cases = [data] if isinstance(data, FewShotData) else list(data)
        self.data = self.cases[0]
        self.config = config
        self.distributed = distributed
        self.rank = distributed.rank if distributed is not None else 0
        self.world_size = distributed.world_size if distributed is not None else 1
        self.device = distributed.device(config.device) if distributed is not None else resolve_device(config.device)
        self.dtype = autocast_dtype(self.device, config.precision)
        self.case_slices = check_training_cases(self.cases)
        self.slices = self.case_slices[0]
        self.segments = list(segments) if segments is not None else merge_segments(self.cases)
        torch.manual_seed(config.seed)  # adapter initialisation (e.g. SALT's residual X) draws from it
        if warm_start is None:
            self.method_config = apply_method(model, config.method, config.method_options)
        else:
            self.method_config = dict(warm_start.method_config)
        self.model.to(self.device).eval()  # frozen BatchNorm statistics; there is no dropout to disable
        self.prompts = SegmentPrompts(len(self.segments)).to(self.device)
        self.slice_geometry = self._geometry(self.data)
        self.low_res = 4 * model.embedding_size[0]
        self.learning_rate = config.learning_rate or method_spec(config.method).learning_rate
        # What the method left trainable decides how much encoder work is input-only (done once per copy).
        self.prefix_depth = model.frozen_prefix_depth()
        self.frozen_encoder = encoder_is_frozen(model)
        self.recompute_activations = (config.recompute_activations if config.recompute_activations is not None
                                      else self.device.type == "cpu")

        start = time.perf_counter()
        torch.manual_seed(config.seed)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.bank = self._build_bank(self.generator)
        self._init_prompts(self.bank, warm_start)
        self.loss_module = _StepLoss(self)
        if distributed is not None and self.world_size > 1:
            self.loss_module = distributed.wrap(self.loss_module, self.device)
        self.optimizer = torch.optim.AdamW(self.trainable_parameters(), lr=self.learning_rate,
                                           weight_decay=config.weight_decay)
        self.schedule = warmup_cosine_schedule(self.optimizer, config.steps, config.warmup_fraction)
        self.setup_seconds = time.perf_counter() - start

    # ------------------------------------------------------------------ data
    def _geometry(self, case: FewShotData) -> pp.SliceGeometry:
        return pp.slice_geometry_for(pp.take_slice(case.image, case.axis, 0).shape,
                                     pp.slice_pixel_spacing(case.spacing, case.axis), self.model.input_size)

    def _labelled_inputs(self, case: FewShotData, slices: list[int],
                         geometry: pp.SliceGeometry) -> tuple[torch.Tensor, torch.Tensor]:
        """A case's labelled slices as model inputs, and their masks in the adapter's segment order."""
        volume01 = case.intensity.apply(case.image)
        by_name = {s.name: s.label for s in case.segments}
        images, masks = [], []
        for index in slices:
            image = pp.rescale_slice(pp.take_slice(volume01, case.axis, index))
            labels = pp.take_slice(case.labels, case.axis, index)
            images.append(pp.slice_to_input(image, geometry))
            masks.append(torch.stack([pp.mask_to_input(value_mask(labels, by_name[s.name], 2), geometry)
                                      if s.name in by_name else torch.zeros(geometry.input_size, geometry.input_size)
                                      for s in self.segments]))
        return torch.stack(images), torch.stack(masks)

    def _known(self, case: FewShotData, slices: list[int]) -> torch.Tensor:
        """Which of the adapter's segments the case holds on its labelled slices (elsewhere: unknown)."""
        stack = np.stack([pp.take_slice(case.labels, case.axis, s) for s in slices])
        held = {s.name for s in case.segments if (stack == s.label).any()}
        return torch.tensor([s.name in held for s in self.segments])

    def _known_per_slice(self, case: FewShotData, labelled: list[int], marked: list[int]) -> torch.Tensor:
        """(slices, K): a labelled slice knows the case's segments; a marked-only slice those marked absent there."""
        on_labelled = self._known(case, labelled)
        rows = [on_labelled] * len(labelled)
        for index in marked:
            rows.append(torch.tensor([index in case.absent.get(s.name, ()) for s in self.segments]))
        return torch.stack(rows)

    def _build_bank(self, generator: torch.Generator) -> _Bank:
        parts = []
        for number, (case, labelled) in enumerate(zip(self.cases, self.case_slices)):
            geometry = self._geometry(case)
            marked = case.marked_only_slices(labelled)
            slices = labelled + marked
            images, masks = self._labelled_inputs(case, slices, geometry)
            copies_images, copies_masks = [], []
            for image, mask in zip(images, masks):
                copies_images.append(image)
                copies_masks.append(mask)
                for _ in range(self.config.copies_per_slice - 1):
                    augmented_image, augmented_mask = augment(image, mask, self.config.augmentation, generator)
                    copies_images.append(augmented_image)
                    copies_masks.append(augmented_mask)
            images, masks = torch.stack(copies_images), torch.stack(copies_masks)
            known = self._known_per_slice(case, labelled, marked).repeat_interleave(self.config.copies_per_slice, 0)
            parts.append((self._input_features(images, geometry), masks, known,
                          torch.full((masks.shape[0],), number, dtype=torch.long),
                          torch.tensor(geometry.resized_shape).expand(masks.shape[0], -1)))
        features = torch.cat([part[0] for part in parts])
        masks = torch.cat([part[1] for part in parts])
        known = torch.cat([part[2] for part in parts])
        case_index = torch.cat([part[3] for part in parts])
        valid_hw = torch.cat([part[4] for part in parts])
        present = masks.flatten(2).amax(2) > 0
        boxes = torch.full((*present.shape, 4), float("nan"))
        for copy_index, segment_index in zip(*torch.nonzero(present, as_tuple=True)):
            box = pp.mask_box(masks[copy_index, segment_index].numpy() > 0)
            boxes[copy_index, segment_index] = torch.from_numpy(box).float()
        factor = masks.shape[-1] // self.low_res
        coverage = F.avg_pool2d(masks, factor) if factor > 1 else masks
        targets = torch.stack([torch.stack([pp.binarize_keeping_small(c) for c in copy]) for copy in coverage])
        return _Bank(features, targets, boxes, present, self._sampling_weights(present, case_index), known,
                     case_index, valid_hw)

    def _sampling_weights(self, present: torch.Tensor, case_index: torch.Tensor) -> torch.Tensor:
        """How often each copy is drawn: rare segments pull their slices up, and so do small cases.

        Segment term: sum over present segments of 1 / (copies holding it).
        With several cases it is mixed half and half with a case term that
        gives every case the same share, so each case gets at least half its
        fair share of the draws whatever its size.
        """
        counts = present.sum(0).clamp(min=1).float()
        weights = (present.float() / counts).sum(1)
        weights = torch.where(weights > 0, weights, weights[weights > 0].min())
        if len(self.cases) == 1:
            return weights
        per_case = torch.bincount(case_index, minlength=len(self.cases)).float()
        case_weights = 1.0 / (len(self.cases) * per_case[case_index])
        return 0.5 * weights / weights.sum() + 0.5 * case_weights

    @torch.no_grad()
    def _input_features(self, images: torch.Tensor, geometry: pp.SliceGeometry) -> torch.Tensor:
        """Run the input-only part of the encoder once per copy."""
        if not self.frozen_encoder and self.prefix_depth == 0:
            return images
        outputs = []
        for chunk in images.split(4):
            chunk = chunk.to(self.device)
            with autocast(self.device, self.dtype):
                if self.frozen_encoder:
                    outputs.append(self.model.encode(chunk, geometry.resized_shape))
                else:
                    outputs.append(self.model.encode_prefix(chunk, geometry.resized_shape, self.prefix_depth))
        return torch.cat(outputs)

    def _embeddings(self, features: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        if self.frozen_encoder:
            return features
        if self.prefix_depth:
            return self.model.encode_rest(features, self.prefix_depth, recompute=self.recompute_activations)
        sizes = self.bank.valid_hw[batch]
        if bool((sizes == sizes[0]).all()):
            return self.model.encode(features, tuple(sizes[0].tolist()))
        # Cases of different shapes: each image's padding is zeroed on its own size.
        return torch.cat([self.model.encode(features[row:row + 1], tuple(sizes[row].tolist()))
                          for row in range(features.shape[0])])

    # ------------------------------------------------------------------ prompts
    @torch.no_grad()
    def _init_prompts(self, bank: _Bank, warm_start: Optional[WarmStart] = None) -> None:
        """Each segment's tokens start as the embedding of its box over all labelled copies.

        With a warm start, the parent's segments keep their learned tokens.
        """
        boxes = bank.boxes
        union = torch.stack([
            torch.nan_to_num(boxes[..., 0], nan=math.inf).amin(0), torch.nan_to_num(boxes[..., 1], nan=math.inf).amin(0),
            torch.nan_to_num(boxes[..., 2], nan=-math.inf).amax(0), torch.nan_to_num(boxes[..., 3], nan=-math.inf).amax(0),
        ], dim=1)
        unseen = ~torch.isfinite(union).all(1)   # a parent's segment no case holds: its own tokens follow
        union[unseen] = torch.tensor([0.0, 0.0, self.model.input_size - 1.0, self.model.input_size - 1.0])
        self.prompts.init_from_boxes(self.model, union.to(self.device))
        for index, segment in enumerate(self.segments):
            if warm_start is not None and segment.name in warm_start.tokens:
                self.prompts.tokens[index].copy_(warm_start.tokens[segment.name].to(self.prompts.tokens))

    def _choose_segments(self, present: torch.Tensor, generator: torch.Generator,
                         known: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, bool]:
        """Segments to decode on one copy (present ones first, then at least one absent), and box or not.

        Absent segments are kept in box mode too: prompted with a box taken
        from another slice, they teach the model to answer "not here", which
        is what stops a box walk at the end of a structure. Only segments the
        copy's case holds can be absent; the others are unknown there.
        """
        limit = self.config.segments_per_slice
        present_idx = torch.nonzero(present, as_tuple=True)[0]
        absent_idx = torch.nonzero(~present if known is None else known & ~present, as_tuple=True)[0]
        use_box = float(torch.rand((), generator=generator)) < self.config.box_prompt_fraction
        present_idx = present_idx[torch.randperm(present_idx.numel(), generator=generator)][:limit]
        room = max(limit - present_idx.numel(), 1 if absent_idx.numel() else 0)
        absent_idx = absent_idx[torch.randperm(absent_idx.numel(), generator=generator)][:room]
        return torch.cat([present_idx, absent_idx]), use_box

    def _prompt_boxes(self, bank: _Bank, copy_index: int, chosen: torch.Tensor,
                      generator: torch.Generator) -> torch.Tensor:
        """Each chosen segment's box on this copy, or, where it is absent, its box on another copy."""
        boxes = bank.boxes[copy_index, chosen].clone()
        for row, segment in enumerate(chosen.tolist()):
            if torch.isnan(boxes[row, 0]):
                donors = torch.nonzero(bank.present[:, segment], as_tuple=True)[0]
                donor = donors[torch.randint(donors.numel(), (1,), generator=generator)]
                boxes[row] = bank.boxes[donor[0], segment]
        return self._jittered_boxes(boxes, generator)

    def _jittered_boxes(self, boxes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Boxes grown by a random margin and shifted a little, as a user's or a neighbour's box would be."""
        scale = self.config.box_jitter_pixels * self.model.input_size / 256.0
        margin = torch.rand(boxes.shape[0], 1, generator=generator) * scale
        shift = (torch.rand(boxes.shape, generator=generator) - 0.5) * scale
        grown = boxes + torch.cat([-margin, -margin, margin, margin], dim=1) + shift
        return grown.clamp(0, self.model.input_size - 1)

    # ------------------------------------------------------------------ loop
    def _plan_row(self, copy_index: int, generator: torch.Generator) -> _RowPlan:
        """The random choices of one row, drawn in a fixed order (every rank draws every row's)."""
        chosen, use_box = self._choose_segments(self.bank.present[copy_index], generator,
                                                self.bank.known[copy_index])
        boxes = self._prompt_boxes(self.bank, copy_index, chosen, generator) if use_box else None
        return _RowPlan(copy_index, chosen, boxes)

    def _decode_rows(self, plans: list[_RowPlan]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every (row, segment) pair of ``plans`` decoded: logits (N, H, W), targets (N, H, W) and the
        decoder's predicted IoU (N,), which the loss leaves out (``scripts/presence_study.py`` trains it)."""
        bank = self.bank
        batch = torch.tensor([plan.copy_index for plan in plans])
        features = bank.features[batch].to(self.device)
        with autocast(self.device, self.dtype):
            embeddings = self._embeddings(features, batch)
            all_logits, all_targets, all_quality = [], [], []
            for row, plan in enumerate(plans):
                sparse = self.prompts(plan.chosen.to(self.device))
                if plan.boxes is not None:
                    boxes = plan.boxes.to(self.device)
                    sparse = torch.cat([sparse, self.model.embed_boxes(boxes).to(sparse.dtype)], dim=1)
                logits, quality = self.model.decode(embeddings[row:row + 1], sparse)
                all_logits.append(logits[:, 0])
                all_quality.append(quality[:, 0])
                all_targets.append(bank.targets[plan.copy_index, plan.chosen].to(self.device))
        return torch.cat(all_logits), torch.cat(all_targets), torch.cat(all_quality)

    def _step_loss(self, plans: list[_RowPlan]) -> torch.Tensor:
        """Mean Dice + BCE over the (row, segment) pairs of ``plans``."""
        logits, targets, _ = self._decode_rows(plans)
        return dice_bce_loss(logits, targets)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad] + list(self.prompts.parameters())

    def step(self) -> tuple[float, float]:
        """One optimisation step; returns (loss, learning rate used).

        Every rank draws the same global batch (``batch_size`` rows per rank)
        and the same choices for each row, then computes the loss of its own
        rows, weighted by its share of the (row, segment) pairs: averaged over
        the ranks, the gradient is that of the mean over every pair of the
        global batch, as one process with the whole batch computes it.
        """
        weights = self.bank.weights
        rows = self.config.batch_size * self.world_size
        batch = torch.multinomial(weights, rows, replacement=weights.numel() < rows, generator=self.generator)
        plans = [self._plan_row(copy_index, self.generator) for copy_index in batch.tolist()]
        mine = plans[self.rank * self.config.batch_size:(self.rank + 1) * self.config.batch_size]
        share = sum(p.chosen.numel() for p in mine) * self.world_size / sum(p.chosen.numel() for p in plans)
        loss = self.loss_module(mine) * share
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        rate = self.optimizer.param_groups[0]["lr"]
        self.schedule.step()
        value = loss.detach().float()
        if self.world_size > 1:
            value = self.distributed.mean(value)
        return float(value), rate

    def _stop_requested(self, should_stop: Optional[Callable[[], bool]]) -> bool:
        """Whether to stop now: asked here, or, under torchrun, on any rank (all ranks stop at the same step)."""
        asked = should_stop is not None and should_stop()
        if self.world_size > 1:
            return self.distributed.any(asked)
        return asked

    def run(self, on_step: Optional[Callable[[StepReport], None]] = None,
            should_stop: Optional[Callable[[], bool]] = None,
            on_checkpoint: Optional[Callable[[int], None]] = None) -> TrainingResult:
        """Train; ``should_stop`` is polled between steps (SIGTERM lands there), checkpoints every N steps."""
        losses, rates = [], []
        interrupted = False
        train_start = time.perf_counter()
        for step in range(self.config.steps):
            if self._stop_requested(should_stop):
                interrupted = True
                break
            loss, rate = self.step()
            losses.append(loss)
            rates.append(rate)
            done = step + 1
            if on_step is not None:
                elapsed = time.perf_counter() - train_start
                on_step(StepReport(done, self.config.steps, loss, rate, elapsed + self.setup_seconds,
                                   elapsed / done * (self.config.steps - done)))
            if on_checkpoint is not None and self.config.checkpoint_every and done % self.config.checkpoint_every == 0 \
                    and done < self.config.steps:
                on_checkpoint(done)
        return TrainingResult(
            steps_done=len(losses), losses=losses, learning_rates=rates, setup_seconds=self.setup_seconds,
            train_seconds=time.perf_counter() - train_start, interrupted=interrupted,
            labelled_slices=self.slices, device=str(self.device),
            precision="bf16" if self.dtype == torch.bfloat16 else "fp32", world_size=self.world_size)
