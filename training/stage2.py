"""Stage two: train the bridge (and LoRA) of a VLM on LLaVA conversations (``vlm train stage2``).

``run(cfg)`` reads a LLaVA json: ``cfg.data.json`` with images under ``cfg.data.image_root``
(default: the json's folder), or the exported world's ``llava/train.json`` with images under
``cfg.data.world_dir/images`` (the world must exist: ``vlm train`` makes it, the library only reads). It builds the
``VisionLanguageModel`` (``torch.manual_seed(run.seed)`` first, so the bridge and LoRA init are
reproducible) and hands ``training.loop.train`` a deterministic, resumable ``make_batches``:
``training.data.ResumableBatches`` over the records (epoch-wise seeded shuffle, split by rank;
with ``data.num_workers`` DataLoader workers, in the same order), each micro-batch built by
``LlavaExamples.make_batch`` with ``VLMProcessor.conversations`` (every gpt turn is a target).
Text-only records (no ``image``) are trained with no image tokens in their sequence (the LLM
sees no image; the bridge reads nothing for them). Multi-image records are trained with a bridge
that takes several images per sequence (``multi_image``: flamingo, each token attending to the
image before it) and otherwise skipped, counted and named in one warning (``trainable_records``). The final artifact is ``VisionLanguageModel.save_pretrained`` (bridge, LoRA adapter,
``vlm.yaml``). With ``model.vision_tower=oracle`` the oracle tower (``vlm.model.oracle``) reads
``model.oracle_world``, by default the world in ``data.world_dir``.
"""
from __future__ import annotations

import dataclasses
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from PIL import Image

from training import distributed
from training.data import ResumableBatches, world_dir_for
from training.loop import check_out_dir, train
from vlm.config import ConfigError, Stage2Config, VLMConfig
from vlm.data.formats import LlavaRecord, read_llava
from vlm.files import DEFAULT_MAX_IMAGE_PIXELS, ImageError, VlmError, check_image, open_image
from vlm.model.oracle import is_oracle
from vlm.model.vision_language_model import VisionLanguageModel
from vlm.model.processor import VLMProcessor


def resolve_data(cfg: Stage2Config) -> tuple[Path, Path]:
    """(LLaVA json path, image root) for ``cfg.data``: ``data.json`` or the exported world's
    ``llava/train.json``; a one-line ``FileNotFoundError`` saying what to do when missing."""
    if cfg.data.json:
        json_path = Path(cfg.data.json)
        if not json_path.is_file():
            raise FileNotFoundError(f"data.json: {json_path} does not exist")
        return json_path, Path(cfg.data.image_root) if cfg.data.image_root else json_path.parent
    world_dir = world_dir_for(cfg.data.world_dir, cfg.world, "LLaVA conversations", "data.json")
    json_path = world_dir / "llava" / "train.json"
    if not json_path.is_file():
        raise FileNotFoundError(f"{json_path} missing: {world_dir} is not a complete world export; "
                                f"run `vlm world --out {world_dir}` or set data.json")
    return json_path, Path(cfg.data.image_root) if cfg.data.image_root else world_dir / "images"


def usable_records(records: Sequence[LlavaRecord], image_root: Path, max_pixels: int) -> tuple[list, list[str]]:
    """(records whose every image header reads and is at most ``max_pixels`` pixels, text-only ones
    included; one reason per record left out). Only headers are read (``vlm.files.check_image``),
    so checking every record before training is cheap; a bad image would otherwise stop the run mid-way."""
    kept, skipped = [], []
    errors: dict[str, Optional[str]] = {}  # image name -> why it is unusable (None: usable), each read once
    for record in records:
        for name in record.images:
            if name not in errors:
                try:
                    check_image(Path(image_root) / name, max_pixels)
                    errors[name] = None
                except ImageError as e:
                    errors[name] = str(e)
        bad = next((errors[name] for name in record.images if errors[name] is not None), None)
        if bad is not None:
            skipped.append(f"record {record.id!r}: {bad}")
            continue
        kept.append(record)
    return kept, skipped


def trainable_records(records: Sequence[LlavaRecord], bridge: str, multi_image: bool = False) -> list[LlavaRecord]:
    """The records stage two trains on: single-image and text-only ones, and multi-image ones when
    the bridge takes several images (``multi_image``). Otherwise those are left out with one
    warning that counts them and names the first ids, never silently."""
    multi = [r for r in records if len(r.images) > 1]
    if multi_image:
        return list(records)
    if multi:
        names = ", ".join(repr(r.id) for r in multi[:5]) + (", ..." if len(multi) > 5 else "")
        warnings.warn(f"stage two: skipping {len(multi)} multi-image record(s) of {len(records)} ({names}): the "
                      f"{bridge} bridge takes one image per sequence", stacklevel=2)
    return [r for r in records if len(r.images) <= 1]


def text_length(record: LlavaRecord) -> int:
    """A record's conversation length in characters (the length-grouped sampler's proxy for tokens)."""
    return sum(len(text) for _, text in record.conversations)


class LlavaExamples:
    """Records of a LLaVA json + their images -> micro-batches (``make_batch(indices) -> dict``).
    Give it ``usable_records``: an image that fails to decode anyway raises ``ImageError`` naming it."""

    def __init__(self, records: Sequence, image_root: Path, processor: VLMProcessor,
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        if not records:
            raise VlmError("the LLaVA json has no records")
        self.records, self.image_root, self.processor = list(records), Path(image_root), processor
        self.max_pixels = max_pixels
        first = next((r for r in self.records if r.image is not None), None)
        if first is not None and not self.image_path(first).is_file():
            raise FileNotFoundError(f"image {self.image_path(first)} of record {first.id!r} not found; set "
                                    "data.image_root to the folder the json's image paths are relative to")

    def image_path(self, record) -> Path:
        """Where a record's image file is."""
        return self.image_root / record.image

    def load_image(self, record) -> Union[None, Image.Image, list[Image.Image]]:
        """A record's image as RGB, None for a text-only record, a list for a multi-image one (an
        unreadable file raises ``ImageError`` naming it and the record)."""
        if record.image is None:
            return None
        if record.more_images:
            return [self._read(record, self.image_root / p) for p in record.images]
        return self._read(record, self.image_path(record))

    def _read(self, record, path: Path) -> Image.Image:
        try:
            return open_image(path, self.max_pixels)
        except ImageError as e:
            raise ImageError(f"{e} (record {record.id!r})") from e

    def make_batch(self, indices: list[int]) -> dict:
        """pixel_values [B,3,H,W], input_ids / attention_mask / labels [B,T] for records ``indices``."""
        recs = [self.records[i] for i in indices]
        return self.processor.conversations([self.load_image(r) for r in recs],
                                            [list(r.conversations) for r in recs])


def oracle_world_filled(cfg: Stage2Config) -> VLMConfig:
    """``cfg.model``, with ``oracle_world`` set to the world stage two reads (``data.world_dir``) when
    the tower is the oracle and names no world; ``ConfigError`` when it trains on other data."""
    model = cfg.model
    if not is_oracle(model.vision_tower) or model.oracle_world:
        return model
    if cfg.data.json:
        raise ConfigError("model.oracle_world: the oracle tower reads a world export; set it (data.json is no world)")
    return dataclasses.replace(model, oracle_world=str(cfg.data.world_dir))


def trainable_table(per_module: dict[str, dict], cfg: Stage2Config) -> str:
    """The run log's per-module lines: mode, trainable / total parameters, lr and weight decay."""
    lines = []
    for name, row in per_module.items():
        m = getattr(cfg.model.train, name)
        lr = m.lr if m.lr is not None else cfg.optim.lr
        wd = m.weight_decay if m.weight_decay is not None else cfg.optim.weight_decay
        lines.append(f"  {name:<6} {row['mode']:<6} {row['trainable']:>12,} / {row['total']:,} trainable, "
                     f"lr {lr:g}, weight decay {wd:g}")
    return "\n".join(lines)


def _checked_records(json_path: Path, image_root: Path, max_pixels: int, verbose: bool) -> list:
    """The json's records whose images are usable (``usable_records``; text-only ones too); the
    skipped ones are counted on stderr, and none usable is a ``VlmError`` naming the first reason."""
    records = read_llava(json_path)
    if not records:
        raise VlmError(f"{json_path} has no records")
    kept, skipped = usable_records(records, image_root, max_pixels)
    if not kept:
        raise VlmError(f"{json_path}: none of its {len(records)} records has usable images under {image_root} "
                       f"(first: {skipped[0]}); set data.image_root to the folder the json's image paths are relative to")
    if skipped and verbose:
        print(f"stage two: skipped {len(skipped)} of {len(records)} records with a bad image (first: {skipped[0]})",
              file=sys.stderr)
    return kept


def run(cfg: Stage2Config) -> Path:
    """Train stage two with ``cfg``; returns ``out_dir/final`` (a ``VisionLanguageModel`` checkpoint)."""
    info = distributed.setup(cfg.run.device)
    check_out_dir(Path(cfg.run.out_dir), cfg.run)  # fails early on a non-resumed existing run
    distributed.barrier()
    json_path, image_root = resolve_data(cfg)
    records = _checked_records(json_path, image_root, cfg.data.max_image_pixels, info.is_main)
    torch.manual_seed(cfg.run.seed)
    model = VisionLanguageModel.build(oracle_world_filled(cfg), max_len=cfg.data.max_len)
    records = trainable_records(records, cfg.model.bridge.name, model.bridge.multi_image)
    if not records:
        raise VlmError(f"{json_path} has no records stage two can train on")
    examples = LlavaExamples(records, image_root, model.processor, cfg.data.max_image_pixels)
    batches = ResumableBatches(len(records), cfg.optim.batch_size, examples.make_batch, seed=cfg.run.seed,
                               rank=info.rank, world_size=info.world_size, num_workers=cfg.data.num_workers,
                               lengths=[text_length(r) for r in records], group_by_length=cfg.data.group_by_length)
    if info.is_main:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        text_only, multi = sum(r.image is None for r in records), sum(len(r.images) > 1 for r in records)
        print(f"stage two: {len(records)} conversations ({text_only} text-only, {multi} multi-image) from {json_path}, bridge "
              f"{cfg.model.bridge.name}, "
              f"{trainable:,} trainable parameters", file=sys.stderr)
        print(trainable_table(model.trainable_parameters(), cfg), file=sys.stderr)
    result = train(model, batches, cfg.optim, cfg.run, config=cfg)
    return result.final_dir
