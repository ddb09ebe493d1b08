"""Stage one: train a dual encoder with CLIP, SigLIP, SPARC or FLAIR (``vlm train stage1``).

``run(cfg)`` resolves the data (``cfg.data.shards``, or the embedded world's train shards, which
must already exist: ``vlm train`` makes them), builds or loads the tokenizer (a BPE trained on the
training texts when ``model.text.pretrained`` is empty; cached in ``out_dir/tokenizer`` so a resumed
run reuses it), builds the model with ``torch.manual_seed(run.seed)`` and hands
``training.loop.train`` a deterministic ``make_batches(start)``. The final artifact
(``out_dir/final``) is the ``DualEncoder`` checkpoint plus the objective's learned state
(``Stage1Model.save_pretrained``).

Data order on the embedded world: ``training.data.ArrayBatches`` over its pre-decoded train arrays
(``data.world_arrays``, the default; with ``data.twin_fraction`` image-side twins in every batch).
Data order on shards: ``training.data.ShardBatches`` over ``ShardSamples`` (every process reads its own share
of the shards, epoch after epoch; consecutive samples form micro-batches of ``optim.batch_size``;
``make_batches(start)`` skips ``start * batch_size`` samples, which makes resume exact; with
``data.num_workers = W`` resume with the same W). With ``optim.accum_freq = a`` the loop encodes
each batch in ``a`` micro-batches against cached features (``encoders.stage1_model``): the same data
order, the same loss and gradient, less activation memory. ``stage1_collate`` turns samples into a batch;
its per-sample randomness (FLAIR's sub-caption sampling) comes from a ``random.Random`` seeded by
(seed, rank, worker, sample position), never from the global RNGs.
Runs unchanged under ``torchrun`` (gloo on CPU, NCCL on CUDA).
"""
from __future__ import annotations

import functools
import glob
import itertools
import random
import sys
from pathlib import Path
from typing import Iterator

import torch
from braceexpand import braceexpand
from transformers import PreTrainedTokenizerBase

from encoders.config import Stage1Config
from encoders.objectives.base import ObjectiveConfig
from encoders.dual_encoder import DualEncoder, tokenize_texts
from encoders.registry import captions_for
from encoders.stage1_model import Stage1Model
from encoders.towers import ImageTransform
from training import distributed
from training.data import ArrayBatches, Collate, ShardBatches, ShardSamples, world_dir_for
from training.loop import check_out_dir, train
from vlm.config import ConfigError, MaskEmbedRunConfig
from vlm.data.shards import ShardStream
from vlm.data.tokenizer import load_tokenizer, train_bpe_tokenizer
from vlm.world.arrays import TrainArrays
from vlm.world.generator import world_corpus, world_split

TOKENIZER_CORPUS_LIMIT = 200_000  # captions read from real shards to train a BPE when none is given
# World samples whose texts train the BPE: the world's vocabulary is closed (a few hundred tokens),
# so a prefix of the train split covers it and saves regenerating all of them.
TOKENIZER_WORLD_SAMPLES = 5_000


def resolve_shards(cfg: Stage1Config | MaskEmbedRunConfig) -> list[str]:
    """The training shard paths: ``data.shards`` (brace pattern and/or glob) or the exported world's
    ``shards/train-*.tar`` (``vlm train`` makes it; the library only reads). Raises
    ``FileNotFoundError`` saying what to do when they do not exist."""
    if cfg.data.shards:
        urls = [u for pattern in braceexpand(cfg.data.shards) for u in (sorted(glob.glob(pattern)) or [pattern])]
        missing = [u for u in urls if "://" not in u and not Path(u).is_file()]
        if missing:
            raise FileNotFoundError(f"data.shards: {len(missing)} of {len(urls)} shards missing, e.g. {missing[0]}")
        return urls
    world_dir = world_dir_for(cfg.data.world_dir, cfg.world, "train shards", "data.shards")
    urls = sorted(glob.glob(str(world_dir / "shards" / "train-*.tar")))
    if not urls:
        raise FileNotFoundError(f"no train shards in {world_dir / 'shards'}: run `vlm world --out {world_dir}` "
                                "or set data.shards")
    return urls


def tokenizer_corpus(cfg: Stage1Config, urls: list[str]) -> Iterator[str]:
    """Texts the BPE is trained on: the world's corpus of the first ``TOKENIZER_WORLD_SAMPLES`` of
    its train split, or the captions (and long captions) of the first ``TOKENIZER_CORPUS_LIMIT``
    samples of the shards, in shard order."""
    if not cfg.data.shards:
        yield from world_corpus(cfg.world, world_split(cfg.world)[0][:TOKENIZER_WORLD_SAMPLES])
        return
    stream = ShardStream(urls, shuffle_buffer=0, seed=0, rank=0, world_size=1)
    for sample in itertools.islice(stream, TOKENIZER_CORPUS_LIMIT):
        yield sample["text"]
        if sample["json"].get("long_caption"):
            yield sample["json"]["long_caption"]


def build_tokenizer(cfg: Stage1Config, urls: list[str], resuming: bool) -> PreTrainedTokenizerBase:
    """The pretrained text tower's tokenizer, or a BPE (vocab ``model.text.vocab_size``, ``<s>``
    prepended and ``</s>`` appended) trained on rank 0 and saved to ``out_dir/tokenizer``; every
    rank loads the saved one, so all ranks and resumed runs tokenise identically."""
    if cfg.model.text.pretrained:
        return load_tokenizer(cfg.model.text.pretrained)
    tok_dir = Path(cfg.run.out_dir) / "tokenizer"
    if distributed.is_main() and not (resuming and (tok_dir / "tokenizer.json").is_file()):
        tok = train_bpe_tokenizer(tokenizer_corpus(cfg, urls), vocab_size=cfg.model.text.vocab_size,
                                  model_max_length=cfg.model.text.max_len, add_bos=True, add_eos=True)
        tok.save_pretrained(str(tok_dir))
    distributed.barrier()
    return load_tokenizer(tok_dir)


def stage1_collate(samples: list[tuple[int, dict]], worker: int = 0, *, tokenizer: PreTrainedTokenizerBase,
                   transform: ImageTransform, objective: ObjectiveConfig, max_text_len: int, seed: int,
                   rank: int = 0) -> dict:
    """(position, sample) pairs -> one stage-one micro-batch of B = len(samples):
    ``pixel_values`` [B,3,H,W] float and ``input_ids`` / ``attention_mask`` long: [B,L], the
    captions, or, when the objective samples K sub-captions (FLAIR), [B*K,L], the sub-captions
    image-major (sub-caption k of image i is row i*K + k). The caption itself is then not
    tokenised: no FLAIR loss uses it (as the reference, which encodes only the sampled captions),
    so the text tower runs once per sub-caption and never on the caption.
    Sample i's captions are drawn by ``random.Random(f"{seed}:{rank}:{worker}:{position}")``."""
    images, captions, subs = [], [], []
    for position, sample in samples:
        rng = random.Random(f"{seed}:{rank}:{worker}:{position}")
        texts = captions_for(objective, sample["text"], sample["json"].get("long_caption"), rng)
        images.append(sample["image"])
        captions.append(texts[0])
        subs.extend(texts[1:])
    ids, mask = tokenize_texts(tokenizer, subs if subs else captions, max_text_len)
    return {"pixel_values": transform.batch(images), "input_ids": ids, "attention_mask": mask}


def uses_world_arrays(cfg: Stage1Config) -> bool:
    """Whether stage one reads the embedded world's pre-decoded arrays (no ``data.shards`` given and
    ``data.world_arrays``) rather than shards."""
    return not cfg.data.shards and cfg.data.world_arrays


def stage1_batches(urls: list[str], cfg: Stage1Config, tokenizer: PreTrainedTokenizerBase, transform: ImageTransform,
                   max_text_len: int, rank: int = 0, world_size: int = 1) -> ShardBatches | ArrayBatches:
    """``make_batches(start)`` for stage one: this rank's samples (the world's arrays, or shard samples)
    collated by ``stage1_collate`` into micro-batches of ``optim.batch_size`` (see the module
    docstring for the order)."""
    collate = functools.partial(stage1_collate, tokenizer=tokenizer, transform=transform, objective=cfg.objective,
                                max_text_len=max_text_len, seed=cfg.run.seed, rank=rank)
    if uses_world_arrays(cfg):
        return world_array_batches(cfg, collate, rank, world_size)
    if cfg.data.twin_fraction:
        raise ConfigError("data.twin_fraction needs the world's arrays (data.world_arrays=true, no data.shards)")
    samples = ShardSamples(urls, cfg.data, cfg.run.seed, rank, world_size, name="stage1")
    return ShardBatches(samples, cfg.optim.batch_size, collate)


def world_array_batches(cfg: Stage1Config, collate: Collate, rank: int = 0, world_size: int = 1) -> ArrayBatches:
    """``make_batches(start)`` over the embedded world's pre-decoded train arrays (with
    ``data.twin_fraction`` of each batch made of image-side twins)."""
    world_dir = world_dir_for(cfg.data.world_dir, cfg.world, "train arrays", "data.shards")
    return ArrayBatches(TrainArrays(world_dir), cfg.optim.batch_size, collate, cfg.run.seed, rank, world_size,
                        cfg.data.twin_fraction)


def build_model(cfg: Stage1Config, tokenizer: PreTrainedTokenizerBase) -> Stage1Model:
    """The dual encoder and the objective, initialised from ``torch.manual_seed(run.seed)``."""
    torch.manual_seed(cfg.run.seed)
    encoder = DualEncoder(cfg.model, tokenizer)
    return Stage1Model.build(encoder, cfg.objective)


def run(cfg: Stage1Config) -> Path:
    """Train stage one with ``cfg``; returns ``out_dir/final`` (the encoder checkpoint)."""
    info = distributed.setup(cfg.run.device)
    resuming = check_out_dir(Path(cfg.run.out_dir), cfg.run) is not None  # fails early on an existing run
    distributed.barrier()
    urls = resolve_shards(cfg)
    tokenizer = build_tokenizer(cfg, urls, resuming)
    model = build_model(cfg, tokenizer)
    encoder = model.encoder
    max_text_len = min(cfg.data.max_text_len, encoder.max_text_len)
    batches = stage1_batches(urls, cfg, tokenizer, encoder.transform, max_text_len, info.rank, info.world_size)
    if info.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"stage1 {cfg.objective.name}: {len(urls)} shard(s), vocabulary {len(tokenizer)}, "
              f"{n_params / 1e6:.2f}M parameters, {info.world_size} process(es)", file=sys.stderr)
    result = train(model, batches, cfg.optim, cfg.run, config=cfg)
    return result.final_dir


__all__ = ["build_model", "build_tokenizer", "resolve_shards", "run", "stage1_batches", "stage1_collate",
           "tokenizer_corpus"]
