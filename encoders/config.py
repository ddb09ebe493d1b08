"""Stage one's recipe config, ``Stage1Config``, and how the objective shapes the encoder.

``objective`` is a section chosen by name (``vlm.config.chosen_by_name``): ``objective.name``
picks the dataclass defined next to that loss (``SparcConfig`` in encoders/objectives/sparc.py,
...), and the other ``objective.*`` keys are that dataclass's fields, with the paper's defaults.
The encoder choices that depend on the objective, ``model.pool``, ``model.global_mlp`` and
``model.local_heads``, stay null unless a recipe sets them; building the config fills them from the
objective's ``encoder_defaults`` (so ``objective.name=sparc`` alone gives SPARC's encoder) and
rejects separate local heads for an objective that never reads local embeddings. The resolved
values are what the ``DualEncoder`` saves in ``encoder.yaml``.

It lives here, one layer above ``vlm.config`` (which imports nothing of ours), because it names
the objectives' dataclasses.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from encoders.objectives.base import ObjectiveConfig
from encoders.objectives.sparc import SparcConfig
from encoders.registry import objective_config_class
from vlm.config import (ConfigError, EncoderConfig, OptimConfig, RunConfig, ShardDataConfig, WorldConfig,
                        chosen_by_name)


def resolve_encoder(model: EncoderConfig, objective: ObjectiveConfig) -> EncoderConfig:
    """``model`` with its null ``pool`` / ``global_mlp`` / ``local_heads`` set to ``objective``'s
    ``encoder_defaults``. Raises ``ConfigError`` naming both keys when ``model.local_heads`` is true
    for an objective that does not use local embeddings."""
    unset = {k: v for k, v in objective.encoder_defaults.items() if getattr(model, k) is None}
    resolved = dataclasses.replace(model, **unset) if unset else model
    if resolved.local_heads and not objective.uses_local_embeddings:
        raise ConfigError(f"model.local_heads=true with objective.name={objective.name}: {objective.name} reads no "
                          "patch / token embeddings, so separate local heads would never train; set "
                          "model.local_heads=false or pick an objective that uses them")
    return resolved


@dataclass
class Stage1Config:
    """``vlm train stage1``: a dual encoder trained with one objective."""

    model: EncoderConfig = field(default_factory=EncoderConfig)
    objective: ObjectiveConfig = chosen_by_name(objective_config_class, SparcConfig)
    data: ShardDataConfig = field(default_factory=ShardDataConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="runs/stage1/sparc"))

    def __post_init__(self) -> None:
        self.model = resolve_encoder(self.model, self.objective)
