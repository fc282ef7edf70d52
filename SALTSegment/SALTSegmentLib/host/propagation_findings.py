"""What a propagation found besides the label map: each segment's extent, the quality estimate, the next slice.

The worker's ``result`` event carries them as plain data (``extents``,
``estimate``, ``suggested_slices``; see ``cli._propagate``). Slicer's own
process reads them here, without torch or numpy, to log the extents, show
the estimate and offer the suggested slices in the panel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(frozen=True)
class NextSlice:
    """A slice the user should draw next for one segment, and why it helps most.

    Made by the engine (``estimate.suggest_next_slices``) and read back here
    from the result event: one class on both sides of the worker boundary.
    """

    segment: str
    slice: int
    reason: str

    def describe(self) -> str:
        return f"{self.segment}: draw slice {self.slice} next ({self.reason})"

    def to_dict(self) -> dict[str, Any]:
        return {"segment": self.segment, "slice": self.slice, "reason": self.reason}


@dataclass(frozen=True)
class PropagationFindings:
    extents: list[str] = field(default_factory=list)        # "Name: slices a-b (first: why; last: why)"
    estimate: Optional[str] = None                           # "expected Dice on unlabelled slices: ..."
    next_slices: list[NextSlice] = field(default_factory=list)

    @classmethod
    def from_summary(cls, summary: Optional[dict[str, Any]]) -> "PropagationFindings":
        """Read a result event's summary; absent or malformed parts are left out, never guessed."""
        summary = summary or {}
        extents = [str(e["text"]) for e in summary.get("extents") or [] if isinstance(e, dict) and "text" in e]
        estimate = summary.get("estimate")
        text = str(estimate["text"]) if isinstance(estimate, dict) and estimate.get("text") else None
        next_slices = []
        for entry in summary.get("suggested_slices") or []:
            try:
                next_slices.append(NextSlice(str(entry["segment"]), int(entry["slice"]), str(entry["reason"])))
            except (KeyError, TypeError, ValueError):
                continue
        return cls(extents, text, next_slices)

    def status_line(self) -> str:
        """One line for the panel under the propagation's own summary."""
        if self.estimate:
            return self.estimate[:1].upper() + self.estimate[1:] + "."
        return ""
