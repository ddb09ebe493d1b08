"""Pieces shared by the objective modules: the config and module bases, learnable scales and
precision handling.

An objective is one module holding its config dataclass (a subclass of ``ObjectiveConfig`` with its
paper's defaults, the encoder settings of that paper included) and its ``Objective`` subclass
(``config_class`` names the dataclass); ``encoders.registry.OBJECTIVES`` lists them by name.
"""

from __future__ import annotations

import math
import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Optional

import torch
from torch import nn

from vlm.config import ConfigError


def require(cond: bool, key: str, msg: str) -> None:
    """Raise ``ConfigError("<key>: <msg>")`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"{key}: {msg}")


@dataclass
class ObjectiveConfig:
    """Config keys every stage-one objective has (``objective.*``); see ../shared/METHODS.md.

    Each objective's module subclasses it, setting ``name`` to its registry key and the paper's
    defaults. Class-level, not config keys: ``encoder_defaults``, the paper's ``model.pool`` /
    ``model.global_mlp`` / ``model.local_heads`` (used where a recipe leaves them null), and
    ``uses_local_embeddings``, whether the loss reads ``patch_emb`` / ``token_emb`` (separate local
    heads are only allowed for such an objective: they would never train otherwise).
    """

    name: str = ""  # registry key; each subclass's default, which must not change
    max_logit_scale: float = 100.0  # ceiling of the learned logit scale (clamped after each optimizer step)
    # Distributed global terms: all-gather with gradients. False gathers without them: only the local
    # slice gets gradient, which biases the gradient (not the concatenated-batch one); see gather.py.
    gather_with_grad: bool = True
    # Learning-rate multiplier for the objective's logit scale and bias (``Objective.optimizer_overrides``).
    # 1 = the papers' (one lr for all). Adam moves a scalar by ~lr a step, so in a few hundred steps at
    # lr 1e-3 SigLIP's t = exp(t') and b barely leave their init (10, -10); short recipes raise it.
    logit_lr_mult: float = 1.0

    encoder_defaults: ClassVar[dict[str, Any]] = {"pool": "cls", "global_mlp": False, "local_heads": False}
    uses_local_embeddings: ClassVar[bool] = False

    def __post_init__(self) -> None:
        own = type(self).name  # the dataclass default of ``name``
        require(self.name == own, "objective.name", f"{self.name!r} does not match {type(self).__name__} ({own!r})")
        require(self.max_logit_scale >= 1, "objective.max_logit_scale",
                f"must be >= 1 (the log-scale is clamped to [0, ln max]), got {self.max_logit_scale}")
        require(self.logit_lr_mult > 0, "objective.logit_lr_mult", f"must be > 0, got {self.logit_lr_mult}")


class LogScale(nn.Module):
    """A positive learnable scale held as exp(log_scale), as CLIP's ``logit_scale``.

    ``forward() -> exp(log_scale)``, a scalar tensor, never clamped: a clamp inside forward would
    stop the gradient once the scale reaches the bound. The bound is kept instead by ``clamp_()``,
    which the training loop calls after every optimizer step (``Objective.after_optimizer_step``),
    as open_clip does: ``log_scale`` is clamped in place to [ln min_value, ln max_value]
    (default [0, ln max_value], open_clip's ``clamp_(0, math.log(100))``).
    """

    def __init__(self, init_value: float, max_value: float, min_value: float = 1.0) -> None:
        super().__init__()
        if not 0 < min_value <= init_value <= max_value:
            raise ValueError(f"init scale {init_value} must be in [min {min_value}, max {max_value}] (min > 0)")
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_value)))
        self.min_value = float(min_value)
        self.max_value = float(max_value)

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp ``log_scale`` in place to [ln min_value, ln max_value] (call after the optimizer step).

        Elementwise, so it also works on an FSDP shard of the parameter (``use_orig_params``)."""
        self.log_scale.clamp_(math.log(self.min_value), math.log(self.max_value))


def check_global_pair(image_emb: torch.Tensor, text_emb: torch.Tensor) -> None:
    """Raise ValueError unless image_emb and text_emb are both [B, d] with B >= 1."""
    if image_emb.dim() != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(f"expected image_emb and text_emb of equal shape [B, d], got "
                         f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    if image_emb.shape[0] == 0:
        raise ValueError("empty batch")


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """Upcast half / bfloat16 tensors to float32 (losses are computed at full precision)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


@contextmanager
def no_autocast(device: torch.device) -> Iterator[None]:
    """Disable autocast around a loss so softmax / log-sigmoid run in float32 or better."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


class Objective(nn.Module):
    """Base of the stage-one objective modules, all built as ``cls(cfg, embed_dim, vision_width)``.

    Subclasses set ``config_class`` and implement ``forward(img: ImageFeatures, txt: TextFeatures,
    batch: dict) -> dict`` of scalar terms with ``"loss"``. ``captions_for`` tells the data pipeline
    which texts a sample needs; the default is the caption alone. ``fixed_random_inputs`` draws
    the randomness of ``forward`` up front (for accumulation). ``after_optimizer_step`` keeps
    every ``LogScale`` within its bounds (the loop calls it after each step).
    """

    config_class: ClassVar[type[ObjectiveConfig]] = ObjectiveConfig

    def __init__(self, cfg: ObjectiveConfig, embed_dim: int, vision_width: int) -> None:
        """cfg: this objective's config; embed_dim: width d of the shared embedding space;
        vision_width: width w of the vision tower's patch tokens (used by FLAIR's pooling)."""
        super().__init__()
        if not isinstance(cfg, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(cfg).__name__}")
        self.cfg = cfg

    @classmethod
    def captions_for(cls, cfg: ObjectiveConfig, caption: str, long_caption: Optional[str] = None,
                     rng: Optional[random.Random] = None) -> list[str]:
        """Texts to tokenise for one sample: ``[caption]`` for single-caption objectives.

        A classmethod so the data pipeline can ask before any model is built.
        """
        return [caption]

    def fixed_random_inputs(self, batch: dict, num_images: int, device: torch.device) -> dict:
        """Random inputs ``forward`` would otherwise draw itself, drawn once for a whole batch of
        ``num_images`` images and merged into ``batch`` (keys the batch already holds are never
        drawn), so that every pass of a cached accumulation step (``optim.accum_freq``, see
        ``Stage1Model``) scores the same loss. None by default; FLAIR draws its negatives."""
        return {}

    def after_optimizer_step(self) -> None:
        """Called by the training loop after every optimizer step (through ``Stage1Model``): clamps
        each ``LogScale`` of this objective in place to its bounds, as open_clip clamps
        ``logit_scale`` after ``optimizer.step()``. Subclasses holding other bounded parameters
        extend it (calling ``super()``)."""
        for module in self.modules():
            if isinstance(module, LogScale):
                module.clamp_()

    def optimizer_overrides(self) -> dict[str, dict]:
        """Parameter-name prefix (relative to this module) -> {"lr_mult": ``cfg.logit_lr_mult``} for its
        logit scales (each ``LogScale``) and ``logit_bias``; empty at multiplier 1."""
        if self.cfg.logit_lr_mult == 1.0:
            return {}
        names = [name for name, m in self.named_modules() if isinstance(m, LogScale)]
        names += [name for name, _ in self.named_parameters() if name.split(".")[-1] == "logit_bias"]
        return {name: {"lr_mult": self.cfg.logit_lr_mult} for name in names}
