"""MaskEmbed locality alignment (``vlm train maskembed``): post-train a vision tower with
``encoders.maskembed.MaskEmbedModel`` through the shared loop (``training.loop.train``).

``run(cfg)``:
1. loads the teacher with ``encoders.towers.load_vision_tower(cfg.maskembed.teacher)``: our
   stage-one checkpoint dir (its ``vision/``), a previous MaskEmbed output, or a local HF
   CLIP/SigLIP (vision) dir; its ``ImageTransform`` preprocesses the images;
2. streams images (captions are ignored) from ``cfg.data.shards`` or the exported world's train
   shards (``vlm train`` makes them), in the same order and with the same exact-resume rule as stage
   one (``training.data.ShardBatches``: ``make_batches(start)`` skips ``start * batch_size``
   samples of the deterministic stream), collated by ``maskembed_collate``;
3. draws each micro-batch's patch masks from a generator seeded by (run.seed, rank, worker, data
   position), never from the global RNGs, so the masks of a resumed run are the uninterrupted run's;
4. calibrates the target scale (population std) on the first ``maskembed.calibration_batches``
   micro-batches of the single-process stream (identical on every rank and on resume), builds the model after ``torch.manual_seed(run.seed)`` and trains;
5. exports the student to ``out_dir/final`` as a plain HF vision-tower dir with the teacher's
   ``preprocessor_config.json``: stock ``CLIPVisionModel`` / ``SiglipVisionModel.from_pretrained``
   loads it, and so do stage two and ``eval.encoder``.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch

from encoders.maskembed import MaskEmbedModel, sample_patch_masks
from encoders.towers import ImageTransform, load_vision_tower, num_patches
from training import distributed
from training.data import ShardBatches, ShardSamples
from training.loop import check_out_dir, train
from training.stage1 import resolve_shards
from vlm.config import ConfigError, MaskEmbedRunConfig, replace


def maskembed_collate(samples: list[tuple[int, dict]], worker: int = 0, *, transform: ImageTransform,
                      num_patches: int, seed: int, rank: int = 0) -> dict:
    """(position, sample) pairs -> ``pixel_values`` [B,3,H,W] float and ``patch_mask`` [B,P] bool
    (True = kept, P = ``num_patches``). The masks' generator is seeded by (seed, rank, worker, first
    position), so they are a function of the data position only."""
    first = samples[0][0]
    key = ((seed * 1_000_003 + rank) * 1_000_003 + worker) * 1_000_003 + first
    g = torch.Generator().manual_seed(key % 2 ** 63)
    pixels = torch.stack([transform(sample["image"]) for _, sample in samples])
    return {"pixel_values": pixels, "patch_mask": sample_patch_masks(len(samples), num_patches, g)}


def maskembed_batches(urls: list[str], cfg: MaskEmbedRunConfig, transform: ImageTransform, num_patches: int,
                      rank: int = 0, world_size: int = 1) -> ShardBatches:
    """``make_batches(start)`` for MaskEmbed: stage one's data order (``ShardSamples``), micro-batches
    of ``optim.batch_size`` made by ``maskembed_collate``."""
    samples = ShardSamples(urls, cfg.data, cfg.run.seed, rank, world_size, name="maskembed")
    collate = functools.partial(maskembed_collate, transform=transform, num_patches=num_patches, seed=cfg.run.seed,
                                rank=rank)
    return ShardBatches(samples, cfg.optim.batch_size, collate)


def build_model(cfg: MaskEmbedRunConfig) -> tuple[MaskEmbedModel, ImageTransform]:
    """Teacher loaded from ``cfg.maskembed.teacher``, student and decoder initialised from
    ``torch.manual_seed(run.seed)``; not yet calibrated."""
    if not cfg.maskembed.teacher:
        raise ConfigError("maskembed.teacher is empty: name a stage-one checkpoint dir or a local HF "
                         "CLIP/SigLIP vision dir")
    teacher, transform = load_vision_tower(cfg.maskembed.teacher)
    torch.manual_seed(cfg.run.seed)
    return MaskEmbedModel(teacher, cfg.maskembed, transform), transform


def run(cfg: MaskEmbedRunConfig) -> Path:
    """Post-train ``cfg.maskembed.teacher`` with MaskEmbed; returns ``out_dir/final`` (a vision-tower dir)."""
    info = distributed.setup(cfg.run.device)
    check_out_dir(Path(cfg.run.out_dir), cfg.run)  # fails early on an existing run without resume
    distributed.barrier()
    model, transform = build_model(cfg)
    urls = resolve_shards(cfg)
    batches = maskembed_batches(urls, cfg, transform, num_patches(model.teacher), info.rank, info.world_size)
    # The same calibration batches on every rank: the first maskembed.calibration_batches micro-batches
    # of the single-process stream (calibrate takes that many; population std of their targets).
    single = replace(cfg, data=replace(cfg.data, num_workers=0))
    calibration = maskembed_batches(urls, single, transform, num_patches(model.teacher))
    scale = model.calibrate(batch["pixel_values"] for batch in calibration.stream_batches(0))
    if info.is_main:
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"maskembed: teacher {cfg.maskembed.teacher}, {len(urls)} shard(s), target scale {scale:.4f}, "
              f"{n_train / 1e6:.2f}M trainable parameters, {info.world_size} process(es)", file=sys.stderr)
    result = train(model, batches, cfg.optim, cfg.run, config=cfg)
    return result.final_dir


__all__ = ["build_model", "maskembed_batches", "maskembed_collate", "run"]
