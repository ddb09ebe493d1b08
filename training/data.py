"""Generic batching helpers that make a recipe's ``make_batches(start)`` a few lines long.

``ResumableBatches`` is the usual answer: a deterministic, infinite, epoch-wise shuffled stream of
micro-batches over an indexable dataset, sharded by rank, that can start at any micro-batch
position in O(1) without replaying the data. It draws only from its own ``torch.Generator``
(seeded by ``(seed, epoch)``), so the loop's RNG state and the data order never interfere, which
is what makes resume exact.

For webdataset shards (stage one, MaskEmbed) the stream is a composition: ``ShardSamples`` yields
this rank's (position, sample) pairs epoch after epoch, and ``ShardBatches`` groups consecutive
samples into micro-batches with a recipe's ``collate(samples, worker) -> dict``. ``make_batches(start)``
skips ``start * batch_size`` samples (decoded, not collated), which is what makes resume exact.
With ``num_workers = W > 0`` DataLoader worker j reads its own share and makes the micro-batches
g = i * W + j, yielded in order of g (so the order depends on W: resume with the same W).

For the embedded world, ``ArrayBatches`` reads the pre-decoded train arrays (``vlm.world.arrays``)
instead: ``ResumableBatches`` over the rows, plus, with a twin fraction, each micro-batch's first rows'
twins (image-side hard negatives) appended to it.

``world_dir_for`` checks that an exported world is on disk before a recipe reads it; the library
never exports one (``vlm train`` / ``vlm demo`` do, see ``vlm.cli.train``).
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlm.config import ConfigError, ShardDataConfig, WorldConfig
from vlm.data.shards import ShardStream
from vlm.world.arrays import TrainArrays
from vlm.world.export import is_world, world_meta

# (position, sample) pairs -> one micro-batch; ``worker`` is the DataLoader worker (0 in-process).
Collate = Callable[[list[tuple[int, dict]], int], dict]


class ResumableBatches:
    """Infinite, deterministic micro-batches over ``n_items`` examples; ``self(start)`` is a ``make_batches``.

    Each epoch shuffles ``range(n_items)`` with a generator seeded by ``(seed, epoch)`` (or keeps
    the order when ``shuffle=False``), gives rank ``r`` the indices ``perm[r::world_size]`` (cut to
    equal length across ranks), and groups them into ``batch_size`` index lists (a short tail is
    dropped), each turned into a batch by ``make_batch(indices) -> dict``. ``self(start)`` yields
    from micro-batch ``start`` of this rank's stream, jumping straight to its epoch.
    ``max_epochs`` (None = infinite) ends the stream. With ``num_workers = W > 0`` the batches are
    made by W DataLoader workers, worker w making batches w, w + W, ...; the DataLoader returns them
    round-robin, so the order is the same as with W = 0.
    With ``lengths`` (one per item) and ``group_by_length = G > 0``, each epoch's shuffled indices
    are cut into megabatches of G batches, each sorted longest first and split into batches, and the
    batches are shuffled (LLaVA's length-grouped sampler): the same examples, less padding.
    """

    def __init__(self, n_items: int, batch_size: int, make_batch: Callable[[list[int]], dict], seed: int = 0,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1, max_epochs: Optional[int] = None,
                 num_workers: int = 0, lengths: Optional[Sequence[int]] = None, group_by_length: int = 0):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        per_rank = n_items // world_size
        if per_rank < batch_size:
            raise ConfigError(f"{n_items} items over {world_size} rank(s) cannot fill one batch of {batch_size}")
        self.n_items, self.batch_size, self.make_batch = n_items, batch_size, make_batch
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.max_epochs, self.num_workers = max_epochs, num_workers
        if group_by_length and (lengths is None or len(lengths) != n_items):
            raise ValueError(f"group_by_length needs one length per item ({n_items}), got "
                             f"{None if lengths is None else len(lengths)}")
        self.lengths, self.group_by_length = lengths, group_by_length
        self.per_rank = per_rank
        self.batches_per_epoch = per_rank // batch_size

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's example indices for ``epoch``, in order (length ``batches_per_epoch * batch_size``)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n_items, generator=g).tolist()
        else:
            perm = list(range(self.n_items))
        mine = perm[self.rank::self.world_size][: self.per_rank]
        mine = mine[: self.batches_per_epoch * self.batch_size]
        if self.group_by_length and self.shuffle:
            mine = self._grouped(mine, g)
        return mine

    def _grouped(self, idx: list[int], g: torch.Generator) -> list[int]:
        """``idx`` reordered so each batch holds similar lengths: megabatches of ``group_by_length``
        batches sorted longest first, then the batches shuffled with ``g``."""
        size, bs = self.group_by_length * self.batch_size, self.batch_size
        ordered = [i for m in range(0, len(idx), size)
                   for i in sorted(idx[m:m + size], key=lambda i: -self.lengths[i])]
        batches = [ordered[b:b + bs] for b in range(0, len(ordered), bs)]
        return [i for b in torch.randperm(len(batches), generator=g).tolist() for i in batches[b]]

    def index_batches(self, start: int = 0) -> Iterator[list[int]]:
        """The index lists of micro-batches ``start, start + 1, ...`` of this rank."""
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        epoch, offset = divmod(start, self.batches_per_epoch)
        while self.max_epochs is None or epoch < self.max_epochs:
            idx = self.epoch_indices(epoch)
            for b in range(offset, self.batches_per_epoch):
                yield idx[b * self.batch_size:(b + 1) * self.batch_size]
            epoch, offset = epoch + 1, 0

    def __call__(self, start: int = 0) -> Iterator[dict]:
        """Micro-batches from position ``start`` (a ``make_batches`` for ``training.loop.train``)."""
        if self.num_workers == 0:
            return (self.make_batch(ids) for ids in self.index_batches(start))
        return iter(DataLoader(_RoundRobinBatches(self, start), batch_size=None, num_workers=self.num_workers))


def twin_pairs(batch_size: int, twin_fraction: float) -> int:
    """How many rows of a micro-batch of ``batch_size`` get their twin beside them: twins make up
    ``twin_fraction`` of the batch (rounded down to whole pairs)."""
    return int(batch_size * twin_fraction) // 2


class ArrayBatches:
    """``make_batches(start)`` over the world's pre-decoded train arrays (``TrainArrays``).

    Micro-batch b holds ``batch_size - T`` rows drawn by ``ResumableBatches`` (epoch-wise shuffle,
    sharded by rank) followed by the twins of its first T rows, T = ``twin_pairs(batch_size,
    twin_fraction)``; ``collate`` gets (position, sample) pairs with position ``b * batch_size + j``.
    The same samples as ``ShardBatches`` would give, as shard-style dicts with uint8 images.
    """

    def __init__(self, arrays: TrainArrays, batch_size: int, collate: Collate, seed: int, rank: int = 0,
                 world_size: int = 1, twin_fraction: float = 0.0) -> None:
        self.pairs = twin_pairs(batch_size, twin_fraction)
        if self.pairs and arrays.twin_images is None:
            raise ConfigError(f"data.twin_fraction={twin_fraction} needs twins: export the world with world.twins=true")
        self.arrays, self.batch_size, self.collate = arrays, batch_size, collate
        self.rows = ResumableBatches(len(arrays), batch_size - self.pairs, lambda ids: {}, seed=seed, rank=rank,
                                     world_size=world_size)

    def samples(self, ids: list[int]) -> list[dict]:
        """The samples of rows ``ids`` followed by the twins of the first ``self.pairs`` of them."""
        return [self.arrays.sample(i) for i in ids] + [self.arrays.sample(i, twin=True) for i in ids[:self.pairs]]

    def __call__(self, start: int = 0) -> Iterator[dict]:
        """Micro-batches from position ``start`` (a ``make_batches`` for ``training.loop.train``)."""
        for b, ids in enumerate(self.rows.index_batches(start), start=start):
            pairs = [(b * self.batch_size + j, s) for j, s in enumerate(self.samples(ids))]
            yield self.collate(pairs, 0)


class _RoundRobinBatches(IterableDataset):
    """Micro-batches ``start, start + 1, ...``; DataLoader worker w builds those with offset % W == w."""

    def __init__(self, batches: ResumableBatches, start: int) -> None:
        self.batches, self.start = batches, start

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for offset, ids in enumerate(self.batches.index_batches(self.start)):
            if offset % workers == worker:
                yield self.batches.make_batch(ids)


# ---------------------------------------------------------------------------------------------
# The exported world as a data source
# ---------------------------------------------------------------------------------------------


def world_dir_for(world_dir: str | Path, world: WorldConfig, what: str, alternative: str) -> Path:
    """``Path(world_dir)`` when it holds the exported world ``world`` (its ``world.json`` records
    that config); else a one-line ``FileNotFoundError`` saying how to make it. ``what`` names the
    data the recipe needs, ``alternative`` the config key that points at other data."""
    out = Path(world_dir)
    make = f"run `vlm world --out {out}` (or `vlm train`, which makes it) or set {alternative}"
    if not (out / "world.json").is_file():
        raise FileNotFoundError(f"no {what} in {out} (no world.json): {make}")
    # The recipe also derives text from ``world`` (the tokenizer corpus), so the files must be that world.
    if not is_world(world_meta(out), world):
        raise FileNotFoundError(f"the world in {out} was made with another config than this recipe's "
                                f"world section: {make}")
    return out


# ---------------------------------------------------------------------------------------------
# Webdataset shards: samples by position, micro-batches by collate
# ---------------------------------------------------------------------------------------------


class ShardSamples:
    """This rank's (and DataLoader worker's) share of ``urls`` as (position, sample) pairs, epoch after
    epoch (infinite); epoch e is shuffled with seed ``seed * 1_000_003 + e``.

    A sample is ``vlm.data.shards.ShardStream``'s ``{"key", "image": PIL RGB, "text", "json"}``;
    ``position`` counts this stream's samples from 0 across epochs. Reads ``data.shuffle_buffer``,
    ``data.num_workers`` and ``data.resampled`` (then one endless epoch of shards drawn with
    replacement, deterministic in ``seed``, so resume stays exact).
    """

    def __init__(self, urls: list[str], data: ShardDataConfig, seed: int, rank: int = 0, world_size: int = 1,
                 name: str = "shard") -> None:
        self.urls, self.seed, self.rank, self.world_size, self.name = urls, seed, rank, world_size, name
        self.shuffle_buffer, self.num_workers, self.resampled = data.shuffle_buffer, data.num_workers, data.resampled

    def samples(self, worker: int = 0) -> Iterator[dict]:
        """The samples alone, epoch after epoch; an epoch without any sample is an error."""
        for epoch in itertools.count():
            stream = ShardStream(self.urls, shuffle_buffer=self.shuffle_buffer, seed=self.seed * 1_000_003 + epoch,
                                 rank=self.rank, world_size=self.world_size, num_workers=self.num_workers,
                                 resampled=self.resampled)
            n = 0
            for sample in stream:
                n += 1
                yield sample
            if n == 0:
                raise RuntimeError(f"rank {self.rank} (worker {worker}) got no samples from {len(self.urls)} "
                                   f"shard(s) in epoch {epoch}; skipped: {stream.stats}")
            if stream.stats["skipped"]:
                print(f"{self.name} data, rank {self.rank} worker {worker}, epoch {epoch}: {stream.stats['ok']} "
                      f"samples read, {stream.stats['skipped']} skipped {stream.stats['reasons']}", file=sys.stderr)

    def __call__(self, worker: int = 0) -> Iterator[tuple[int, dict]]:
        """(position, sample) pairs of this stream (this rank, or one of its DataLoader workers)."""
        return enumerate(self.samples(worker))


class ShardBatches:
    """``make_batches(start)`` over ``ShardSamples``: each run of ``batch_size`` consecutive (position,
    sample) pairs becomes ``collate(pairs, worker)`` (see the module docstring for the order)."""

    def __init__(self, samples: ShardSamples, batch_size: int, collate: Collate) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.samples, self.batch_size, self.collate = samples, batch_size, collate
        self.num_workers = samples.num_workers

    def stream_batches(self, start: int, worker: int = 0) -> Iterator[dict]:
        """Micro-batches ``start, start+1, ...`` of one stream (this rank, or one of its workers)."""
        positioned = itertools.islice(self.samples(worker), start * self.batch_size, None)
        while True:
            yield self.collate(list(itertools.islice(positioned, self.batch_size)), worker)

    def __call__(self, start: int = 0) -> Iterator[dict]:
        """Micro-batches from position ``start`` (a ``make_batches`` for ``training.loop.train``)."""
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        if self.num_workers == 0:
            return self.stream_batches(start)
        loader = DataLoader(_WorkerBatches(self, start), batch_size=None, num_workers=self.num_workers)
        return _in_order(loader, start)


class _WorkerBatches(IterableDataset):
    """In DataLoader worker j of W: (global index, batch) for the global micro-batches g = i * W + j
    (i = local index in worker j's stream) with g >= start."""

    def __init__(self, batches: ShardBatches, start: int) -> None:
        self.batches, self.start = batches, start

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        info = get_worker_info()
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
