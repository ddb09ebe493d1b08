"""The one table of training recipes: ``vlm train NAME`` and the pipelines (``vlm demo`` /
``vlm ablate``) both read ``RECIPES``.

A ``Recipe`` is its config dataclass, its ``run(cfg) -> final dir`` (which writes ``out_dir/final``
with the model's ``save_pretrained``), the default YAML (a shipped config, found from any folder: ``vlm.config.resolve_config_path``) and
``world_dir(cfg)``: where the recipe reads the exported synthetic world, or None when its data
section points elsewhere (the library never exports the world; the command line does, first).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from encoders.config import Stage1Config
from training import lm, maskembed, stage1, stage2, tower
from vlm.config import LMConfig, MaskEmbedRunConfig, Stage2Config, TowerPretrainConfig


def _no_world(cfg: Any) -> Optional[Path]:
    """The world LM generates its text from ``cfg.world`` in memory: it reads no exported world."""
    return None


def _shard_world(cfg: Stage1Config | MaskEmbedRunConfig) -> Optional[Path]:
    """``data.world_dir`` when ``data.shards`` is empty (the embedded world's train shards)."""
    return None if cfg.data.shards else Path(cfg.data.world_dir)


def _array_world(cfg: TowerPretrainConfig) -> Optional[Path]:
    """``data.world_dir``: the embedded world's pre-decoded train arrays and labels."""
    return Path(cfg.data.world_dir)


def _llava_world(cfg: Stage2Config) -> Optional[Path]:
    """``data.world_dir`` when ``data.json`` is empty (the embedded world's LLaVA json)."""
    return None if cfg.data.json else Path(cfg.data.world_dir)


@dataclass(frozen=True)
class Recipe:
    """One ``vlm train`` recipe: ``run(config_class instance) -> out_dir/final``."""

    config_class: type
    run: Callable[[Any], Path]
    default_config: str
    world_dir: Callable[[Any], Optional[Path]] = _no_world


RECIPES: dict[str, Recipe] = {
    "tower": Recipe(TowerPretrainConfig, tower.run, "configs/tower/resnet_world.yaml", _array_world),
    "stage1": Recipe(Stage1Config, stage1.run, "configs/stage1/sparc_tiny.yaml", _shard_world),
    "lm": Recipe(LMConfig, lm.run, "configs/lm/tiny_world.yaml"),
    "maskembed": Recipe(MaskEmbedRunConfig, maskembed.run, "configs/posttrain/maskembed_tiny.yaml", _shard_world),
    "stage2": Recipe(Stage2Config, stage2.run, "configs/stage2/projector_tiny.yaml", _llava_world),
}

__all__ = ["RECIPES", "Recipe"]
