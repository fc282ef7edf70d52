"""Make a model trainable as a method prescribes: put adapters into it, count and save what trains, merge them back.

:func:`apply_method` is the entry point the trainer and the adapter loader
share: for an adapter method (SALT, LoRA, S-SAM) it injects the layers; for
the others it sets which base parameters train (see :mod:`.methods`).
Injection freezes the whole model, swaps the target layers for adapter layers in
place, then re-enables gradients only for adapter parameters and the extra
parameters the config names (layer norms, pos_embed, ...). Saving keeps exactly
those tensors, so an adapter file is a few MB and loads into any freshly injected
copy of the same base model.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any, NamedTuple, Optional

import torch
from torch import nn

from .base import AdapterConfig, AdapterLayer
from .methods import METHOD_SPECS, method_spec

logger = logging.getLogger(__name__)

# Method name -> config class, for the methods that inject adapter layers (read from their specs).
CONFIG_CLASSES: dict[str, type[AdapterConfig]] = {
    name: spec.config_class for name, spec in METHOD_SPECS.items() if spec.config_class is not None}


class AdapterLoadResult(NamedTuple):
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]


def make_config(method: str = "salt", config: AdapterConfig | None = None, **overrides: Any) -> AdapterConfig:
    """The method's config (default instance if None) with keyword overrides applied."""
    key = method.lower()
    if key not in CONFIG_CLASSES:
        raise ValueError(f"unknown adapter method {method!r}; choose one of {sorted(CONFIG_CLASSES)}")
    cls = CONFIG_CLASSES[key]
    if config is None:
        config = cls()
    elif not isinstance(config, cls):
        raise TypeError(f"method {key!r} needs a {cls.__name__}, got {type(config).__name__}")
    return config.replace(**overrides) if overrides else config


def _scope(model: nn.Module, scope: str) -> tuple[nn.Module, str]:
    """The submodule named ``scope`` and its name prefix, or the whole model."""
    if scope:
        try:
            return model.get_submodule(scope), scope + "."
        except AttributeError:
            logger.debug("model has no submodule %r: injecting into the whole model", scope)
    return model, ""


def _matches(name: str, prefix: str, module: nn.Module, targets: Iterable[str]) -> bool:
    """Linears match on their last name component; convs only on their full name
    (relative to the scope or to the model), because conv names like ``c`` or ``0``
    are too generic to select by suffix."""
    targets = set(targets)
    if name in targets or prefix + name in targets:
        return isinstance(module, (nn.Linear, nn.Conv2d))
    return isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def mark_trainable(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Enable gradients for extra parameters; returns the names switched on.

    "norm": every parameter of a module whose class name contains "LayerNorm"
    (encoder and decoder); "pos_embed": parameters named ``pos_embed``; anything
    else is a regular expression searched in full parameter names.
    """
    norm_params = {
        id(p) for module in model.modules() if "LayerNorm" in type(module).__name__ for p in module.parameters()
    }
    enabled = []
    for pattern in patterns:
        hits = []
        for name, param in model.named_parameters():
            if pattern == "norm":
                hit = id(param) in norm_params
            elif pattern == "pos_embed":
                hit = "pos_embed" in name.split(".")
            else:
                hit = re.search(pattern, name) is not None
            if hit:
                param.requires_grad_(True)
                hits.append(name)
        if not hits and pattern not in ("norm", "pos_embed"):
            logger.warning("trainable pattern %r matched no parameter", pattern)
        enabled.extend(hits)
    return enabled


def inject_adapters(
    model: nn.Module, method: str = "salt", config: AdapterConfig | None = None, **overrides: Any
) -> dict[str, AdapterLayer]:
    """Replace the config's target layers of ``model`` in place by adapter layers.

    ``method`` is "salt", "lora" or "ssam"; ``config`` the method's dataclass
    (default if None); keyword ``overrides`` replace config fields, e.g.
    ``inject_adapters(sam, "salt", attention_rank=760, mlp_rank=50)``. Every model
    parameter is frozen first; afterwards only adapter parameters and those named by
    ``config.trainable`` train. Returns {full module name: adapter layer}.
    """
    config = make_config(method, config, **overrides)
    existing = [name for name, module in model.named_modules() if isinstance(module, AdapterLayer)]
    if existing:
        raise RuntimeError(
            f"model already has {len(existing)} adapter layer(s) (e.g. {existing[0]!r}); "
            "merge_adapters() it or start from a fresh model before injecting again"
        )
    targets = config.targets
    scope_module, prefix = _scope(model, config.scope)
    model.requires_grad_(False)
    found = [(name, module) for name, module in scope_module.named_modules() if _matches(name, prefix, module, targets)]
    if not found:
        logger.warning("no %s target among %s found in %s", config.method, list(targets), type(scope_module).__name__)
    injected: dict[str, AdapterLayer] = {}
    for name, module in found:
        adapter = config.build_layer(name, module)
        _replace(scope_module, name, adapter)
        for _, param in adapter.adapter_parameters():
            param.requires_grad_(True)
        injected[prefix + name] = adapter
    mark_trainable(model, config.trainable)
    trainable, total = trainable_parameter_count(model)
    adapter_params = sum(a.adapter_parameter_count() for a in injected.values())
    logger.info(
        "injected %d %s layers (%d adapter parameters); trainable %d of %d parameters (%.3f%%)",
        len(injected), config.method, adapter_params, trainable, total, 100.0 * trainable / max(total, 1),
    )
    return injected


def trainable_parameter_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; buffers such as U, S, Vh are not parameters."""
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


def merge_adapters(model: nn.Module) -> nn.Module:
    """Replace every adapter layer in place by its merged plain layer; returns the model."""
    if isinstance(model, AdapterLayer):
        return model.merge()
    names = [name for name, module in model.named_modules() if isinstance(module, AdapterLayer)]
    for name in names:
        _replace(model, name, model.get_submodule(name).merge())
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Snapshot of the trainable tensors only (CPU, detached, contiguous copies)."""
    return {
        name: param.detach().to("cpu", copy=True).contiguous()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


@torch.no_grad()
def load_adapter_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True
) -> AdapterLoadResult:
    """Copy saved trainable tensors back into an injected model.

    The expected keys are the model's trainable parameters. With ``strict`` any
    missing, unexpected or wrongly shaped key raises; otherwise matching keys load
    and the rest is reported.
    """
    params = dict(model.named_parameters())
    expected = {name for name, param in params.items() if param.requires_grad}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    mismatched = sorted(
        name for name in expected & set(state) if tuple(state[name].shape) != tuple(params[name].shape)
    )
    if strict and (missing or unexpected or mismatched):
        details = []
        if missing:
            details.append(f"missing {len(missing)} key(s), e.g. {missing[:3]}")
        if unexpected:
            details.append(f"unexpected {len(unexpected)} key(s), e.g. {unexpected[:3]}")
        if mismatched:
            details.append(
                "shape mismatch for "
                + ", ".join(f"{n}: saved {tuple(state[n].shape)} vs model {tuple(params[n].shape)}" for n in mismatched[:3])
            )
        raise RuntimeError(
            "adapter state does not fit this model (was it injected with the same method and config?): "
            + "; ".join(details)
        )
    for name in sorted(expected & set(state)):
        if name not in mismatched:
            params[name].copy_(state[name].to(device=params[name].device, dtype=params[name].dtype))
    return AdapterLoadResult(missing, unexpected, mismatched)


def apply_method(model: nn.Module, method: str, options: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Make ``model`` trainable as ``method`` prescribes; return the method config to store with the adapter.

    Training and loading both call it, so a saved adapter's tensors fit the
    model it rebuilds. ``options`` are config fields (an adapter method's
    only; the others take none).
    """
    spec = method_spec(method)
    options = dict(options or {})
    if spec.injects_adapters:
        config = make_config(method, **options)
        inject_adapters(model, method, config=config)
        return config.to_dict()
    if options:
        raise ValueError(f"Method '{method}' takes no options, got {sorted(options)}")
    spec.make_trainable(model)
    return {}


def encoder_is_frozen(model: nn.Module) -> bool:
    """True when nothing in the image encoder trains (its output can be computed once per input)."""
    return not any(p.requires_grad for p in model.image_encoder.parameters())
