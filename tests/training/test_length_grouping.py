"""The length-grouped sampler (``ResumableBatches(lengths=..., group_by_length=G)``) and its length keys."""
from __future__ import annotations

import random

import pytest
import torch

from training.data import ResumableBatches
from training.lm import labelled_lengths
from training.stage2 import text_length
from vlm.data.formats import LlavaRecord
from vlm.model.processor import IGNORE_INDEX


def lengths(n: int = 200, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(10, 300) for _ in range(n)]


def padded_cost(batches: list[list[int]], lens: list[int]) -> int:
    """Tokens computed when each batch is padded to its longest item."""
    return sum(max(lens[i] for i in b) * len(b) for b in batches)


def epoch_batches(rb: ResumableBatches, epoch: int) -> list[list[int]]:
    idx = rb.epoch_indices(epoch)
    return [idx[b:b + rb.batch_size] for b in range(0, len(idx), rb.batch_size)]


def test_same_examples_per_epoch_less_padding():
    lens = lengths()
    plain = ResumableBatches(len(lens), 8, lambda ids: ids, seed=3)
    grouped = ResumableBatches(len(lens), 8, lambda ids: ids, seed=3, lengths=lens, group_by_length=5)
    for epoch in range(3):
        assert sorted(grouped.epoch_indices(epoch)) == sorted(plain.epoch_indices(epoch))
        cost_plain = padded_cost(epoch_batches(plain, epoch), lens)
        cost_grouped = padded_cost(epoch_batches(grouped, epoch), lens)
        assert cost_grouped < 0.8 * cost_plain
    assert grouped.epoch_indices(0) != grouped.epoch_indices(1)


def test_each_batch_comes_from_one_sorted_megabatch():
    """Megabatch m = sorted(shuffled[m*G*B:(m+1)*G*B]) longest first, cut into batches, batches shuffled."""
    lens = lengths(96, seed=1)
    bs, group = 4, 3
    plain = ResumableBatches(len(lens), bs, lambda ids: ids, seed=0)
    grouped = ResumableBatches(len(lens), bs, lambda ids: ids, seed=0, lengths=lens, group_by_length=group)
    shuffled = plain.epoch_indices(0)
    expected = []
    for m in range(0, len(shuffled), bs * group):
        mega = sorted(shuffled[m:m + bs * group], key=lambda i: -lens[i])
        expected += [tuple(mega[b:b + bs]) for b in range(0, len(mega), bs)]
    got = [tuple(b) for b in epoch_batches(grouped, 0)]
    assert sorted(got) == sorted(expected) and got != expected  # same batches, shuffled order
    for b in got:
        assert [lens[i] for i in b] == sorted((lens[i] for i in b), reverse=True)


def test_grouped_stream_is_deterministic_and_resumable():
    lens = lengths(64)
    a = ResumableBatches(len(lens), 4, lambda ids: ids, seed=2, lengths=lens, group_by_length=4)
    b = ResumableBatches(len(lens), 4, lambda ids: ids, seed=2, lengths=lens, group_by_length=4)
    first = [x for _, x in zip(range(40), a(0))]
    assert first == [x for _, x in zip(range(40), b(0))]
    assert first[23:] == [x for _, x in zip(range(17), b(23))]  # resumes mid-epoch and across epochs


def test_group_by_length_needs_one_length_per_item():
    with pytest.raises(ValueError, match="one length per item"):
        ResumableBatches(10, 2, lambda ids: ids, lengths=[1, 2], group_by_length=2)
    with pytest.raises(ValueError, match="one length per item"):
        ResumableBatches(10, 2, lambda ids: ids, group_by_length=2)


def test_no_shuffle_keeps_order():
    lens = lengths(20)
    rb = ResumableBatches(20, 4, lambda ids: ids, shuffle=False, lengths=lens, group_by_length=2)
    assert rb.epoch_indices(0) == list(range(20))


def test_length_keys():
    labels = torch.full((3, 6), IGNORE_INDEX)
    labels[0, 2] = 5
    labels[1, [1, 4]] = 7
    assert labelled_lengths(labels).tolist() == [3, 5, 0]  # 1 + the last labelled position; none -> 0
    rec = LlavaRecord(id="a", image="x.jpg", conversations=[("human", "<image>\nabc"), ("gpt", "de")])
    assert text_length(rec) == len("<image>\nabc") + 2
