"""The panel's choices as text parameters, so they are saved with the scene (its parameter node).

The module keeps them in the scene's ``vtkMRMLScriptedModuleNode`` for
SALTSegment (node selections as node references, the rest as parameters
here). Reading is forgiving: a value this version does not know (a scene
from another version, a hand edit) falls back to the default instead of
breaking the panel.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Mapping

from .choices import DEVICES, METHODS, MODEL_IDS, PLANES, PROPAGATION_MODES, RANK_PRESETS

# Node references of the parameter node (role -> what the panel selects there).
NODE_ROLES = ("InputVolume", "Segmentation", "ReferenceSegmentation")
RESULT_MODES = ("replace", "add")

_CHOICES = {"method": METHODS, "rank": RANK_PRESETS, "model": MODEL_IDS, "axis": PLANES, "device": DEVICES,
            "mode": PROPAGATION_MODES, "result": RESULT_MODES}


@dataclass
class PanelState:
    method: str = "salt"
    rank: str = "default"
    model: str = "lite_medsam"
    weights: str = ""
    axis: str = "axial"         # the anatomical plane of the labelled slices
    steps: int = 0              # 0: the CLI's default
    device: str = "auto"
    mode: str = "box"
    whole_volume: bool = True
    first: int = 0
    last: int = 0
    result: str = "replace"
    adapter: str = ""           # the adapter file Propagate uses

    def to_parameters(self) -> dict[str, str]:
        values = {}
        for item in fields(self):
            value = getattr(self, item.name)
            values[item.name] = ("true" if value else "false") if isinstance(value, bool) else str(value)
        return values

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> "PanelState":
        state = cls()
        for item in fields(cls):
            text = parameters.get(item.name)
            if text is None or text == "":
                continue
            default = getattr(state, item.name)
            if isinstance(default, bool):
                setattr(state, item.name, text.strip().lower() in ("true", "1", "yes"))
            elif isinstance(default, int):
                try:
                    setattr(state, item.name, max(0, int(text)))
                except ValueError:
                    pass
            elif item.name not in _CHOICES or text in _CHOICES[item.name]:
                setattr(state, item.name, text)
        return state
