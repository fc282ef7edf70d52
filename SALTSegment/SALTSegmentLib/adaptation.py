"""What trains for each fine-tuning method, set up the same way for training and loading.

``salt``, ``lora`` and ``ssam`` inject adapter layers into the image encoder
(plus the norms and pos_embed their config names); ``decoder`` trains the mask
decoder alone on a frozen encoder; ``full`` trains everything (for comparison).
The returned dict is the method's metadata saved with the adapter, and
:func:`apply_method` rebuilds exactly the same trainable set from it.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from .adapters import inject_adapters, make_config
from .host.choices import ADAPTER_METHODS, METHODS  # noqa: F401 - listed once, for the CLI and the panel too


def apply_method(model: nn.Module, method: str, options: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Make ``model`` trainable as ``method`` prescribes; return the config to store."""
    if method not in METHODS:
        raise ValueError(f"Unknown method '{method}'; choose one of {', '.join(METHODS)}")
    options = dict(options or {})
    if method in ADAPTER_METHODS:
        config = make_config(method, **options)
        inject_adapters(model, method, config=config)
        return config.to_dict()
    if options:
        raise ValueError(f"Method '{method}' takes no options, got {sorted(options)}")
    model.requires_grad_(method == "full")
    if method == "decoder":
        model.mask_decoder.requires_grad_(True)
    return {}


def encoder_is_frozen(model: nn.Module) -> bool:
    return not any(p.requires_grad for p in model.image_encoder.parameters())


# Named rank settings offered in the module and the CLI (``--rank``). "default"
# is the paper's rank-4 row (SALT: top 99% of singular values scaled/shifted in
# attention, 6.5% in the MLP, residual rank 4; LoRA: rank 4).
RANK_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "salt": {"small": {"attention_rank": 0.5, "mlp_rank": 0.03, "lora_rank": 2}, "default": {},
             "large": {"lora_rank": 32}},
    "lora": {"small": {"rank": 2}, "default": {}, "large": {"rank": 32}},
    "ssam": {"small": {}, "default": {}, "large": {}},
    "decoder": {"small": {}, "default": {}, "large": {}},
    "full": {"small": {}, "default": {}, "large": {}},
}


def preset_options(method: str, preset: str) -> dict[str, Any]:
    """The method options of a rank preset (``small``, ``default``, ``large``)."""
    if method not in RANK_PRESETS:
        raise ValueError(f"Unknown method '{method}'; choose one of {', '.join(METHODS)}")
    try:
        return dict(RANK_PRESETS[method][preset])
    except KeyError:
        raise ValueError(f"Unknown rank preset '{preset}'; choose small, default or large") from None
