"""Stage one: train a dual encoder with CLIP, SigLIP, SPARC or FLAIR (``vlm train stage1``).

``run(cfg)`` resolves the data (``cfg.data.shards`` or the embedded world's train shards, exported
on first use), builds or loads the tokenizer (a BPE trained on the training texts when
``model.text.pretrained`` is empty; cached in ``out_dir/tokenizer`` so a resumed run reuses it),
builds the model with ``torch.manual_seed(run.seed)`` and hands ``training.loop.train`` a
deterministic ``make_batches(start)``. The final artifact (``out_dir/final``) is the
``DualEncoder`` checkpoint plus the objective's learned state (``Stage1Model.save_pretrained``).

Data order. Every process reads its own share of the shards (``ShardStream`` split by rank), epoch
after epoch (epoch e shuffled with seed ``(run.seed, e)``); consecutive samples form micro-batches
of ``optim.batch_size``. ``make_batches(start)`` skips ``start * batch_size`` samples of that
stream (their images are decoded by the stream but not transformed or tokenised), which is what
makes resume exact. The per-sample randomness (FLAIR's sub-caption sampling) comes from a
``random.Random`` seeded by (seed, rank, worker, sample position), never from the global RNGs.
With ``data.num_workers = W > 0`` each DataLoader worker j reads its own ``ShardStream`` share and
makes the micro-batches g = i * W + j; the main process yields them in order of g, so the order
depends on W: resume with the same W.
Runs unchanged under ``torchrun`` (gloo on CPU, NCCL on CUDA).
"""
from __future__ import annotations

import glob
import itertools
import random
import sys
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset
from transformers import PreTrainedTokenizerBase

from encoders.config import Stage1Config
from encoders.dual_encoder import DualEncoder, load_tokenizer, tokenize_texts
from encoders.registry import captions_for
from encoders.stage1_model import Stage1Model
from encoders.towers import ImageTransform
from training import distributed
from training.loop import check_out_dir, train
from vlm.data.tokenizer import train_bpe_tokenizer

TOKENIZER_CORPUS_LIMIT = 200_000  # captions read from real shards to train a BPE when none is given
# World samples whose texts train the BPE: the world's vocabulary is closed (a few hundred tokens),
# so a prefix of the train split covers it and saves regenerating all of them.
TOKENIZER_WORLD_SAMPLES = 5_000


def resolve_shards(cfg: Stage1Config) -> list[str]:
    """The training shard paths: ``data.shards`` (brace pattern and/or glob) or the world's
    ``shards/train-*.tar`` (exported on rank 0 first if missing). Raises if none exist."""
    if cfg.data.shards:
        from braceexpand import braceexpand

        urls = [u for pattern in braceexpand(cfg.data.shards) for u in (sorted(glob.glob(pattern)) or [pattern])]
        missing = [u for u in urls if "://" not in u and not Path(u).is_file()]
        if missing:
            raise FileNotFoundError(f"data.shards: {len(missing)} of {len(urls)} shards missing, e.g. {missing[0]}")
        return urls
    from vlm.world.export import ensure_world

    if distributed.is_main():
        ensure_world(cfg.data.world_dir, cfg.world)
    distributed.barrier()
    urls = sorted(glob.glob(str(Path(cfg.data.world_dir) / "shards" / "train-*.tar")))
    if not urls:
        raise FileNotFoundError(f"no train shards in {cfg.data.world_dir}/shards")
    return urls


def tokenizer_corpus(cfg: Stage1Config, urls: list[str]) -> Iterator[str]:
    """Texts the BPE is trained on: the world's corpus of the first ``TOKENIZER_WORLD_SAMPLES`` of
    its train split, or the captions (and long captions) of the first ``TOKENIZER_CORPUS_LIMIT``
    samples of the shards, in shard order."""
    if not cfg.data.shards:
        from vlm.world.generator import world_split
        from vlm.world.generator import world_corpus

        yield from world_corpus(cfg.world, world_split(cfg.world)[0][:TOKENIZER_WORLD_SAMPLES])
        return
    from vlm.data.shards import ShardStream

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


class Stage1Batches:
    """``make_batches(start)`` for stage one (see the module docstring for the order).

    Batches: ``pixel_values`` [B,3,H,W] float, ``input_ids`` / ``attention_mask`` [B,L] long, and
    for FLAIR ``sub_input_ids`` / ``sub_attention_mask`` [B,K,L].
    """

    def __init__(self, urls: list[str], cfg: Stage1Config, tokenizer: PreTrainedTokenizerBase,
                 transform: ImageTransform, max_text_len: int, rank: int = 0, world_size: int = 1) -> None:
        self.urls, self.cfg, self.tokenizer, self.transform = urls, cfg, tokenizer, transform
        self.max_text_len = max_text_len
        self.rank, self.world_size = rank, world_size
        self.batch_size = cfg.optim.batch_size
        self.num_workers = cfg.data.num_workers

    def samples(self, worker: int = 0) -> Iterator[dict]:
        """This rank's (and DataLoader worker's) samples, epoch after epoch (infinite)."""
        from vlm.data.shards import ShardStream

        for epoch in itertools.count():
            stream = ShardStream(self.urls, shuffle_buffer=self.cfg.data.shuffle_buffer,
                                 seed=self.cfg.run.seed * 1_000_003 + epoch, rank=self.rank,
                                 world_size=self.world_size, num_workers=self.num_workers)
            n = 0
            for sample in stream:
                n += 1
                yield sample
            if n == 0:
                raise RuntimeError(f"rank {self.rank} (worker {worker}) got no samples from {len(self.urls)} "
                                   f"shard(s) in epoch {epoch}; skipped: {stream.stats}")
            if stream.stats["skipped"]:
                print(f"stage1 data, rank {self.rank} worker {worker}, epoch {epoch}: {stream.stats['ok']} "
                      f"samples read, {stream.stats['skipped']} skipped {stream.stats['reasons']}", file=sys.stderr)

    def collate(self, samples: list[tuple[int, dict]], worker: int = 0) -> dict:
        """(position, sample) pairs -> one micro-batch dict."""
        seed, ocfg = self.cfg.run.seed, self.cfg.objective
        pixels, captions, subs = [], [], []
        for position, sample in samples:
            rng = random.Random(f"{seed}:{self.rank}:{worker}:{position}")
            texts = captions_for(ocfg, sample["text"], sample["json"].get("long_caption"), rng)
            pixels.append(self.transform(sample["image"]))
            captions.append(texts[0])
            subs.extend(texts[1:])
        ids, mask = tokenize_texts(self.tokenizer, captions, self.max_text_len)
        batch = {"pixel_values": torch.stack(pixels), "input_ids": ids, "attention_mask": mask}
        if subs:
            sub_ids, sub_mask = tokenize_texts(self.tokenizer, subs, self.max_text_len)
            shape = (len(samples), len(subs) // len(samples), -1)
            batch["sub_input_ids"], batch["sub_attention_mask"] = sub_ids.view(shape), sub_mask.view(shape)
        return batch

    def stream_batches(self, start: int, worker: int = 0) -> Iterator[dict]:
        """Micro-batches ``start, start+1, ...`` of one stream (this rank, or one of its workers)."""
        positioned = itertools.islice(enumerate(self.samples(worker)), start * self.batch_size, None)
        while True:
            yield self.collate(list(itertools.islice(positioned, self.batch_size)), worker)

    def __call__(self, start: int = 0) -> Iterator[dict]:
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        if self.num_workers == 0:
            return self.stream_batches(start)
        loader = DataLoader(_WorkerBatches(self, start), batch_size=None, num_workers=self.num_workers)
        return _in_order(loader, start)


class _WorkerBatches(IterableDataset):
    """In DataLoader worker j of W: (global index, batch) for the global micro-batches g = i * W + j
    (i = local index in worker j's stream) with g >= start."""

    def __init__(self, batches: Stage1Batches, start: int) -> None:
        self.batches, self.start = batches, start

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        info = torch.utils.data.get_worker_info()
        if info is None:
            raise RuntimeError("_WorkerBatches runs inside DataLoader workers only")
        j, workers = info.id, info.num_workers
        first = max(0, -(-(self.start - j) // workers))  # ceil((start - j) / W)
        for i, batch in enumerate(self.batches.stream_batches(first, worker=j), start=first):
            yield i * workers + j, batch


def _in_order(tagged: Iterable[tuple[int, dict]], start: int) -> Iterator[dict]:
    """Yield the batches of (global index, batch) pairs in index order from ``start`` (a resumed
    run's workers start at different local positions, so arrival order may differ slightly)."""
    pending: dict[int, dict] = {}
    expected = start
    for index, batch in tagged:
        pending[index] = batch
        while expected in pending:
            yield pending.pop(expected)
            expected += 1


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
    batches = Stage1Batches(urls, cfg, tokenizer, encoder.transform, max_text_len, info.rank, info.world_size)
    if info.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"stage1 {cfg.objective.name}: {len(urls)} shard(s), vocabulary {len(tokenizer)}, "
              f"{n_params / 1e6:.2f}M parameters, {info.world_size} process(es)", file=sys.stderr)
    result = train(model, batches, cfg.optim, cfg.run, config=cfg)
    return result.final_dir


__all__ = ["Stage1Batches", "build_model", "build_tokenizer", "resolve_shards", "run", "tokenizer_corpus"]
