"""AdamW with warmup + cosine decay, as the training loop builds it.

``build_optimizer`` groups the trainable parameters with ``param_groups`` (weight decay on
matrices only) and pairs the optimiser with a ``LambdaLR`` over ``lr_factor``, stepped once per
optimiser step.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from vlm.config import OptimConfig

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
               nn.LocalResponseNorm)
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "module.")


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier for optimiser step ``step`` (0-based): linear warmup to 1 over ``warmup_steps``
    (step 0 gets ``1/warmup_steps``, never 0), then cosine decay reaching ``min_lr_ratio`` at
    ``max_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def is_norm_layer(module: nn.Module) -> bool:
    """True for normalisation layers: torch's norm classes and any class named ``*Norm`` / ``*Norm2d``
    (RMSNorm and the like from other libraries)."""
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith(("Norm", "Norm2d", "RMSNorm"))


def _clean_name(name: str) -> str:
    """``name`` without the prefixes DDP/FSDP/activation-checkpointing wrappers insert."""
    for wrapper in _WRAPPER_PREFIXES:
        if name.startswith(wrapper):
            name = name[len(wrapper):]
        name = name.replace("." + wrapper, ".")
    return name


def param_groups(model: nn.Module, weight_decay: float, overrides: Optional[dict[str, dict]] = None) -> list[dict]:
    """AdamW groups over parameters with ``requires_grad``: weight decay on matrices only.

    No decay for biases, 1-d/0-d tensors (norm gains, learned temperatures/logit scales/biases)
    and any parameter of a normalisation layer (``is_norm_layer``, including RMSNorm).
    ``overrides``: parameter-name prefix -> {"lr", "weight_decay"} for the parameters under it
    (stage two's per-module settings); each prefix gets its own decay / no-decay pair of groups.
    Each group carries ``names`` (wrapper prefixes removed) for inspection. Raises ``ValueError``
    when nothing is trainable.
    """
    overrides = overrides or {}
    no_decay_ids = set()
    for module in model.modules():
        if is_norm_layer(module):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    groups: dict[tuple[str, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        clean = _clean_name(name)
        prefix = next((k for k in overrides if clean.startswith(k)), "")
        decays = not (p.ndim < 2 or clean.endswith("bias") or id(p) in no_decay_ids)
        setting = overrides.get(prefix, {})
        group = groups.setdefault((prefix, decays), {
            "params": [], "names": [], **({"lr": setting["lr"]} if "lr" in setting else {}),
            "weight_decay": setting.get("weight_decay", weight_decay) if decays else 0.0})
        group["params"].append(p)
        group["names"].append(clean)
    if not groups:
        raise ValueError("the model has no parameters with requires_grad=True; nothing to train")
    # The optimiser's own groups first (decay, then no decay, as without overrides), then each prefix's.
    order = sorted(groups, key=lambda k: (k[0] != "", k[0], not k[1]))
    return [groups[k] for k in order]


def build_optimizer(model: nn.Module, optim: OptimConfig,
                    overrides: Optional[dict[str, dict]] = None) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``param_groups(model, ., overrides)`` and the warmup + cosine ``LambdaLR`` (stepped
    once per optimiser step; a group's own ``lr`` follows the same schedule). An override may give
    ``lr_mult`` instead of ``lr``: ``optim.lr`` times it."""
    overrides = {k: _absolute_lr(v, optim.lr) for k, v in (overrides or {}).items()}
    groups = param_groups(model, optim.weight_decay, overrides)
    opt = torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, optim.warmup_steps, optim.max_steps, optim.min_lr_ratio))
    return opt, sched


def _absolute_lr(setting: dict, lr: float) -> dict:
    """An override with ``lr_mult`` -> the same with ``lr = lr * lr_mult``."""
    if "lr_mult" not in setting:
        return setting
    out = {k: v for k, v in setting.items() if k != "lr_mult"}
    out["lr"] = lr * setting["lr_mult"]
    return out
