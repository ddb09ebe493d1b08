"""MaskEmbed locality alignment (``vlm train maskembed``): post-train a vision tower with
``encoders.maskembed.MaskEmbedModel`` through the shared loop (``training.loop.train``).

``run(cfg)``:
1. loads the teacher with ``encoders.towers.load_vision_tower(cfg.maskembed.teacher)``: our
   stage-one checkpoint dir (its ``vision/``), a previous MaskEmbed output, or a local HF
   CLIP/SigLIP (vision) dir; its ``ImageTransform`` preprocesses the images;
2. streams images (captions are ignored) from ``cfg.data.shards`` or the embedded world's train
   shards (exported on first use), in the same order and with the same exact-resume rule as stage
   one (``training.stage1.Stage1Batches``: ``make_batches(start)`` skips ``start * batch_size``
   samples of the deterministic stream);
3. draws each micro-batch's patch masks from a generator seeded by (run.seed, rank, worker, data
   position), never from the global RNGs, so the masks of a resumed run are the uninterrupted run's;
4. calibrates the target scale on the first micro-batch of the single-process stream (identical
   on every rank and on resume), builds the model after ``torch.manual_seed(run.seed)`` and trains;
5. exports the student to ``out_dir/final`` as a plain HF vision-tower dir with the teacher's
   ``preprocessor_config.json``: stock ``CLIPVisionModel`` / ``SiglipVisionModel.from_pretrained``
   loads it, and so do stage two and ``eval.encoder``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from encoders.maskembed import MaskEmbedModel, sample_patch_masks
from encoders.towers import ImageTransform, load_vision_tower, num_patches
from training import distributed
from training.loop import check_out_dir, train
from training.stage1 import Stage1Batches, resolve_shards
from vlm.config import MaskEmbedRunConfig, replace


class MaskEmbedBatches(Stage1Batches):
    """``make_batches(start)`` for MaskEmbed: micro-batches ``pixel_values`` [B,3,H,W] float and
    ``patch_mask`` [B,P] bool (True = kept), in stage one's data order (see the module docstring)."""

    def __init__(self, urls: list[str], cfg: MaskEmbedRunConfig, transform: ImageTransform, num_patches: int,
                 rank: int = 0, world_size: int = 1) -> None:
        # Stage1Batches reads only data.*, run.seed and optim.batch_size from the config, which
        # MaskEmbedRunConfig shares; there is no text, hence no tokenizer.
        super().__init__(urls, cfg, tokenizer=None, transform=transform, max_text_len=0, rank=rank,
                         world_size=world_size)
        self.num_patches = num_patches

    def collate(self, samples: list[tuple[int, dict]], worker: int = 0) -> dict:
        """(position, sample) pairs -> {"pixel_values", "patch_mask"}; the masks' generator is seeded
        by (seed, rank, worker, first position), so they are a function of the data position only."""
        first = samples[0][0]
        key = ((self.cfg.run.seed * 1_000_003 + self.rank) * 1_000_003 + worker) * 1_000_003 + first
        g = torch.Generator().manual_seed(key % 2 ** 63)
        pixels = torch.stack([self.transform(sample["image"]) for _, sample in samples])
        return {"pixel_values": pixels, "patch_mask": sample_patch_masks(len(samples), self.num_patches, g)}


def build_model(cfg: MaskEmbedRunConfig) -> tuple[MaskEmbedModel, ImageTransform]:
    """Teacher loaded from ``cfg.maskembed.teacher``, student and decoder initialised from
    ``torch.manual_seed(run.seed)``; not yet calibrated."""
    if not cfg.maskembed.teacher:
        raise ValueError("maskembed.teacher is empty: name a stage-one checkpoint dir or a local HF "
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
    batches = MaskEmbedBatches(urls, cfg, transform, num_patches(model.teacher), info.rank, info.world_size)
    # The same calibration batches on every rank: the first maskembed.calibration_batches micro-batches
    # of the single-process stream (calibrate takes that many; population std of their targets).
    single = replace(cfg, data=replace(cfg.data, num_workers=0))
    calibration = MaskEmbedBatches(urls, single, transform, num_patches(model.teacher))
    scale = model.calibrate(batch["pixel_values"] for batch in calibration.stream_batches(0))
    if info.is_main:
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"maskembed: teacher {cfg.maskembed.teacher}, {len(urls)} shard(s), target scale {scale:.4f}, "
              f"{n_train / 1e6:.2f}M trainable parameters, {info.world_size} process(es)", file=sys.stderr)
    result = train(model, batches, cfg.optim, cfg.run, config=cfg)
    return result.final_dir


__all__ = ["MaskEmbedBatches", "build_model", "run"]
