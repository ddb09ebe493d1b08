"""Supervised tower pretraining on the world's labels (``vlm train tower``).

A vision tower learns which of the 8 shapes and which of the 8 colours each train image holds
(multi-label, binary cross-entropy on a linear head over the pooled patch grid). The labels are the
world's own annotations of its train split; no eval image is read. ``final/`` is the tower alone,
saved with its stock class and preprocessing (the head is dropped), so stage one starts from it
with ``model.vision.pretrained=<out_dir>/final``, every objective from the same weights. This is
the world's stand-in for an ImageNet-pretrained backbone: measured on the world, contrastive
training from random weights did not find shape within the demo's budget (see README).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from encoders.towers import (ImageTransform, build_vision_tower, default_transform, patch_tokens, pool_patch_grid,
                             tower_width)
from training import distributed
from training.data import ResumableBatches, world_dir_for
from training.loop import check_out_dir, train
from vlm.config import TowerPretrainConfig
from vlm.world.arrays import TrainArrays
from vlm.world.vocab import COLORS, SHAPES

LABELS = (*SHAPES, *COLORS)  # the head's outputs: shape presence, then colour presence


def presence_labels(objects: list[list[str]]) -> torch.Tensor:
    """[[shape, colour, size], ...] -> multi-hot float [16]: which shapes, then which colours."""
    y = torch.zeros(len(LABELS))
    for shape, color, *_ in objects:
        y[SHAPES.index(shape)] = 1.0
        y[len(SHAPES) + list(COLORS).index(color)] = 1.0
    return y


class TowerClassifier(nn.Module):
    """A tower, a pooling and a linear head: ``forward({"pixel_values", "labels"}) -> {"loss", ...}``."""

    def __init__(self, tower: nn.Module, transform: ImageTransform, pool: str, num_labels: int = len(LABELS)):
        super().__init__()
        self.tower, self.transform, self.pool = tower, transform, pool
        self.head = nn.Linear(tower_width(tower), num_labels)

    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B,3,H,W] -> label logits [B,16]."""
        return self.head(pool_patch_grid(patch_tokens(self.tower, pixel_values), self.pool))

    def forward(self, batch: dict) -> dict:
        logits = self.logits(batch["pixel_values"]).float()
        labels = batch["labels"]
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        with torch.no_grad():
            n = len(SHAPES)
            shape_hit = (logits[:, :n] > 0).eq(labels[:, :n] > 0).float().mean()
        return {"loss": loss, "shape_label_acc": shape_hit}

    def save_pretrained(self, directory: Union[str, Path]) -> None:
        """The tower alone (stock ``save_pretrained``) and its ``preprocessor_config.json``."""
        self.tower.save_pretrained(str(directory))
        self.transform.save_pretrained(directory)


def tower_batches(arrays: TrainArrays, cfg: TowerPretrainConfig, transform: ImageTransform, rank: int,
                  world_size: int) -> ResumableBatches:
    """Micro-batches {"pixel_values" [B,3,S,S], "labels" [B,16]} over the world's train arrays."""
    objects = arrays.index["objects"]

    def make(ids: list[int]) -> dict:
        pixels = transform.batch([np.asarray(arrays.images[i]) for i in ids])
        return {"pixel_values": pixels, "labels": torch.stack([presence_labels(objects[i]) for i in ids])}

    return ResumableBatches(len(arrays), cfg.optim.batch_size, make, seed=cfg.run.seed, rank=rank,
                            world_size=world_size)


def run(cfg: TowerPretrainConfig) -> Path:
    """Pretrain the tower ``cfg.model`` on the world's labels; returns ``out_dir/final``."""
    info = distributed.setup(cfg.run.device)
    check_out_dir(Path(cfg.run.out_dir), cfg.run)
    world_dir = world_dir_for(cfg.data.world_dir, cfg.world, "train arrays", "data.world_dir")
    torch.manual_seed(cfg.run.seed)
    tower = build_vision_tower(cfg.model)
    transform = default_transform(tower)
    model = TowerClassifier(tower, transform, cfg.pool)
    batches = tower_batches(TrainArrays(world_dir), cfg, transform, info.rank, info.world_size)
    if info.is_main:
        print(f"tower {cfg.model.arch}: {sum(p.numel() for p in tower.parameters()) / 1e6:.2f}M parameters, "
              f"{cfg.pool}-pooled, {len(LABELS)} labels", file=sys.stderr)
    return train(model, batches, cfg.optim, cfg.run, config=cfg).final_dir


__all__ = ["LABELS", "TowerClassifier", "presence_labels", "run", "tower_batches"]
