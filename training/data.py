"""Generic batching helpers that make a recipe's ``make_batches(start)`` a few lines long.

``ResumableBatches`` is the usual answer: a deterministic, infinite, epoch-wise shuffled stream of
micro-batches over an indexable dataset, sharded by rank, that can start at any micro-batch
position in O(1) without replaying the data. It draws only from its own ``torch.Generator``
(seeded by ``(seed, epoch)``), so the loop's RNG state and the data order never interfere, which
is what makes resume exact.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch


def collate_dicts(items: Sequence[dict]) -> dict:
    """Collate a list of dicts sharing keys into one dict.

    Tensors of equal shape are stacked (``[B, ...]``); ints/floats/bools become a 1-d tensor
    ``[B]``; anything else (strings, PIL images, dicts) is kept as a list of length B.
    Raises ``ValueError`` for an empty list, mismatched keys or tensors of different shapes.
    """
    if not items:
        raise ValueError("collate_dicts: empty list")
    keys = list(items[0])
    for i, it in enumerate(items):
        if list(it) != keys and set(it) != set(keys):
            raise ValueError(f"collate_dicts: item {i} has keys {sorted(it)}, item 0 has {sorted(keys)}")
    out: dict[str, Any] = {}
    for k in keys:
        values = [it[k] for it in items]
        first = values[0]
        if isinstance(first, torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) != 1:
                raise ValueError(f"collate_dicts: key {k!r} has tensors of different shapes {sorted(shapes)}; "
                                 "pad them first")
            out[k] = torch.stack(values)
        elif isinstance(first, bool):
            out[k] = torch.tensor(values, dtype=torch.bool)
        elif isinstance(first, int):
            out[k] = torch.tensor(values, dtype=torch.long)
        elif isinstance(first, float):
            out[k] = torch.tensor(values, dtype=torch.float32)
        else:
            out[k] = values
    return out


def batched(iterable: Iterable[Any], batch_size: int, collate: Callable[[list], Any] = collate_dicts,
            drop_last: bool = True) -> Iterator[Any]:
    """Group ``iterable`` into lists of ``batch_size`` and ``collate`` each; a short last group is
    dropped when ``drop_last`` (the default: every micro-batch has the same size)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    it = iter(iterable)
    while True:
        group = list(itertools.islice(it, batch_size))
        if not group or (drop_last and len(group) < batch_size):
            return
        yield collate(group)


def skip(iterable: Iterable[Any], n: int) -> Iterator[Any]:
    """``iterable`` without its first ``n`` items (lazy; ``itertools.islice``)."""
    if n < 0:
        raise ValueError(f"cannot skip a negative number of items: {n}")
    return itertools.islice(iterable, n, None)


class ResumableBatches:
    """Infinite, deterministic micro-batches over ``n_items`` examples; ``self(start)`` is a ``make_batches``.

    Each epoch shuffles ``range(n_items)`` with a generator seeded by ``(seed, epoch)`` (or keeps
    the order when ``shuffle=False``), gives rank ``r`` the indices ``perm[r::world_size]`` (cut to
    equal length across ranks), and groups them into ``batch_size`` index lists (a short tail is
    dropped), each turned into a batch by ``make_batch(indices) -> dict``. ``self(start)`` yields
    from micro-batch ``start`` of this rank's stream, jumping straight to its epoch.
    ``max_epochs`` (None = infinite) ends the stream.
    """

    def __init__(self, n_items: int, batch_size: int, make_batch: Callable[[list[int]], dict], seed: int = 0,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1, max_epochs: Optional[int] = None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        per_rank = n_items // world_size
        if per_rank < batch_size:
            raise ValueError(f"{n_items} items over {world_size} rank(s) cannot fill one batch of {batch_size}")
        self.n_items, self.batch_size, self.make_batch = n_items, batch_size, make_batch
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.max_epochs = max_epochs
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
        return mine[: self.batches_per_epoch * self.batch_size]

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
        return (self.make_batch(ids) for ids in self.index_batches(start))
