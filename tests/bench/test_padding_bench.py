"""bench.stage2's padding count: tokens of an epoch with each batch padded to its longest."""
from __future__ import annotations

from bench.stage2 import padded_tokens


def test_padded_tokens_by_hand():
    # shuffle=True in ResumableBatches: with equal lengths any order costs the same
    assert padded_tokens([5] * 8, 4, 0) == 40 and padded_tokens([5] * 8, 4, 2) == 40
    lengths = [1, 100] * 8  # every shuffled batch of 4 is likely to hold a 100; grouped: one megabatch
    assert padded_tokens(lengths, 4, 4) == 2 * 4 * 100 + 2 * 4 * 1  # two batches of 100s, two of 1s
    assert padded_tokens(lengths, 4, 0) >= padded_tokens(lengths, 4, 4)
