"""Registry of the stage-one objectives: a config names the key, ``build_objective`` builds it."""

from __future__ import annotations

import random
from typing import Optional

from encoders.objectives.base import Objective
from encoders.objectives.clip import ClipObjective
from encoders.objectives.flair import FlairObjective
from encoders.objectives.siglip import SiglipObjective
from encoders.objectives.sparc import SparcObjective
from vlm.config import OBJECTIVE_NAMES, ObjectiveConfig

OBJECTIVES: dict[str, type[Objective]] = {
    "clip": ClipObjective,
    "siglip": SiglipObjective,
    "sparc": SparcObjective,
    "flair": FlairObjective,
}
assert set(OBJECTIVES) == set(OBJECTIVE_NAMES), "encoders.registry.OBJECTIVES and vlm.config.OBJECTIVE_NAMES differ"


def _lookup(name: str) -> type[Objective]:
    if name not in OBJECTIVES:
        raise KeyError(f"unknown objective {name!r}; valid keys: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def build_objective(cfg: ObjectiveConfig, embed_dim: int, vision_width: Optional[int] = None) -> Objective:
    """The objective module named by ``cfg.name``.

    embed_dim: width d of the shared embedding space; vision_width: width w of the vision tower's
    patch tokens (needed by FLAIR's text-conditioned pooling, ignored by the others).
    """
    cls = _lookup(cfg.name)
    if cls is FlairObjective:
        if vision_width is None:
            raise ValueError("the flair objective needs vision_width (the vision tower's hidden size)")
        return FlairObjective(cfg, embed_dim, vision_width)
    return cls(cfg, embed_dim)


def captions_for(cfg: ObjectiveConfig, caption: str, long_caption: Optional[str] = None,
                 rng: Optional[random.Random] = None) -> list[str]:
    """Texts one sample needs under ``cfg``: ``[caption]``, or for FLAIR ``[caption, *K sub-captions]``."""
    return _lookup(cfg.name).captions_for(cfg, caption, long_caption, rng)
