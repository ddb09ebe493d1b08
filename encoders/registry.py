"""Registry of the stage-one objectives: a config names the key, ``build_objective`` builds it.

A new objective is one module (its ``ObjectiveConfig`` subclass and its ``Objective`` subclass with
``config_class`` set) plus one line here. Every objective is built as ``cls(cfg, embed_dim,
vision_width)``.
"""

from __future__ import annotations

import random
from typing import Optional

from encoders.objectives.base import Objective, ObjectiveConfig
from encoders.objectives.clip import ClipObjective
from encoders.objectives.flair import FlairObjective
from encoders.objectives.siglip import SiglipObjective
from encoders.objectives.sparc import SparcObjective
from vlm.config import ConfigError

OBJECTIVES: dict[str, type[Objective]] = {
    "clip": ClipObjective,
    "siglip": SiglipObjective,
    "sparc": SparcObjective,
    "flair": FlairObjective,
}


def objective_class(name: str) -> type[Objective]:
    """The objective registered as ``name``; ``ConfigError`` listing the valid keys otherwise."""
    if name not in OBJECTIVES:
        raise ConfigError(f"objective.name: unknown objective {name!r}; valid keys: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def objective_config_class(name: str) -> type[ObjectiveConfig]:
    """The config dataclass of the objective registered as ``name`` (``load_config``'s chooser)."""
    return objective_class(name).config_class


def build_objective(cfg: ObjectiveConfig, embed_dim: int, vision_width: int) -> Objective:
    """The objective module named by ``cfg.name``.

    embed_dim: width d of the shared embedding space; vision_width: width w of the vision tower's
    patch tokens (FLAIR's text-conditioned pooling reads them; the others ignore it).
    """
    return objective_class(cfg.name)(cfg, embed_dim, vision_width)


def captions_for(cfg: ObjectiveConfig, caption: str, long_caption: Optional[str] = None,
                 rng: Optional[random.Random] = None) -> list[str]:
    """Texts one sample needs under ``cfg`` (``Objective.captions_for`` of its class): ``[caption]``,
    or for FLAIR ``[caption, *K sub-captions]``."""
    return objective_class(cfg.name).captions_for(cfg, caption, long_caption, rng)
