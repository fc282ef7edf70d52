"""Train and propagate on arrays in memory: the one core that the file pipeline and the benchmarks share.

``pipeline`` wraps these with everything files need (input checks, the
memory estimate, the output lock, adapter metadata, atomic writes); the
benchmarks call them directly on the arrays they already hold; the demo goes
through ``pipeline`` because it leaves the files a user keeps. So a change to
how an adapter is trained or a volume propagated reaches every caller, and
the benchmarks measure exactly what the CLI runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from .adapter_file import LoadedAdapter
from .adapters import merge_adapters
from .models import PromptableSegmenter
from .preprocessing import IntensityMapping
from .prompts import SegmentPrompts
from .structure_length import DrawnLength, drawn_lengths, lengths_from_records
from .propagation import PropagationConfig, PropagationProgress, PropagationResult, VolumePropagator
from .training import FewShotData, FewShotTrainer, StepReport, TrainingConfig, TrainingResult, WarmStart
from .volume_io import Segment

StopCheck = Optional[Callable[[], bool]]


@dataclass
class AdaptedModel:
    """What propagation needs: the adapted model, one learned prompt per segment, the intensity mapping.

    ``lengths``: how long each segment was drawn in the training cases
    (:mod:`structure_length`), which bounds a walk from a single drawn slice.
    """

    model: PromptableSegmenter
    prompts: SegmentPrompts
    segments: list[Segment]
    intensity: IntensityMapping
    lengths: list[dict[str, DrawnLength]] = field(default_factory=list)

    @classmethod
    def from_file(cls, loaded: LoadedAdapter, segments: Optional[list[Segment]] = None) -> "AdaptedModel":
        """An adapter read from its file; ``segments`` as matched to a volume (default: the adapter's own)."""
        metadata = loaded.metadata
        return cls(loaded.model, loaded.prompts, segments if segments is not None else metadata.segment_list,
                   metadata.intensity_mapping, lengths_from_records(metadata.cases))


@dataclass
class FineTuned:
    trainer: FewShotTrainer
    result: TrainingResult

    def adapted(self) -> AdaptedModel:
        lengths = [drawn_lengths(case.labels, case.segments, case.axis, slices, case.spacing)
                   for case, slices in zip(self.trainer.cases, self.trainer.case_slices)]
        return AdaptedModel(self.trainer.model, self.trainer.prompts, self.trainer.segments,
                            self.trainer.data.intensity, lengths)


def fine_tune(model: PromptableSegmenter, cases: FewShotData | Sequence[FewShotData], config: TrainingConfig,
              segments: Optional[list[Segment]] = None, warm_start: Optional[WarmStart] = None,
              distributed=None, on_step: Optional[Callable[[StepReport], None]] = None,
              should_stop: StopCheck = None,
              on_checkpoint: Optional[Callable[[int, FewShotTrainer], None]] = None) -> FineTuned:
    """Make ``model`` trainable as ``config.method`` says and train it on the labelled slices of ``cases``.

    ``on_checkpoint(step, trainer)`` sees the trainer, so a caller can save
    the adapter and prompts as they are at that step.
    """
    trainer = FewShotTrainer(model, cases, config, segments=segments, warm_start=warm_start,
                             distributed=distributed)
    checkpoint = (lambda step: on_checkpoint(step, trainer)) if on_checkpoint is not None else None
    result = trainer.run(on_step=on_step, should_stop=should_stop, on_checkpoint=checkpoint)
    return FineTuned(trainer, result)


def propagate(adapted: AdaptedModel, image: np.ndarray, spacing: Sequence[float], axis: str,
              config: PropagationConfig, drawn: Optional[np.ndarray] = None, labelled: Sequence[int] = (),
              on_progress: Optional[Callable[[PropagationProgress], None]] = None,
              should_stop: StopCheck = None,
              absent: Optional[Mapping[str, Sequence[int]]] = None) -> PropagationResult:
    """Segment ``image`` along ``axis`` from the user's ``drawn`` slices (box mode) or the prompts alone.

    ``absent`` (segment name -> slices) are slices the user marked without
    that segment (see :meth:`VolumePropagator.run`).

    The adapter is merged into plain weights first (once; merging again
    changes nothing), so propagation pays nothing for it.
    """
    if adapted.model is not None:
        merge_adapters(adapted.model)
    propagator = VolumePropagator(adapted.model, adapted.prompts, adapted.segments, adapted.intensity, axis, config,
                                  adapted.lengths)
    return propagator.run(image, spacing, drawn, list(labelled), on_progress, should_stop, absent)
