"""ShardStream at scale: 2 ranks x 2 DataLoader workers read every sample exactly once per epoch,
resampled mode draws shards with replacement for ever, and brace patterns over thousands of shards
expand without listing a directory."""
import collections
import glob
import io
import itertools
import os

import numpy as np

import pytest
import torch
import webdataset as wds
from PIL import Image

from training.data import ShardSamples
from vlm.config import ShardDataConfig
from vlm.data.shards import ShardStream, expand_urls


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """8 shards of 5 samples, keys "shard-k"."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="JPEG")
    d = tmp_path_factory.mktemp("scale")
    for s in range(8):
        with wds.TarWriter(str(d / f"train-{s:06d}.tar")) as w:
            for k in range(5):
                w.write({"__key__": f"{s}-{k}", "jpg": buf.getvalue(), "txt": f"caption {s}-{k}".encode()})
    return d


def _rank_keys(pattern: str, rank: int, **kw) -> list[str]:
    stream = ShardStream(pattern, seed=5, rank=rank, world_size=2, num_workers=2, decode=False, shuffle_buffer=4, **kw)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    return [s["key"] for s in loader]


@pytest.mark.parametrize("pattern", ["train-{000000..000007}.tar", "train-{000000..000001}.tar"],
                         ids=["shard_split", "sample_split"])  # 8 shards >= 4 streams; 2 shards < 4 streams
def test_two_ranks_two_workers_read_each_sample_once_per_epoch(shards, pattern):
    per_rank = [_rank_keys(str(shards / pattern), rank) for rank in (0, 1)]
    counts = collections.Counter(per_rank[0] + per_rank[1])
    n_shards = len(expand_urls(str(shards / pattern)))
    assert set(counts) == {f"{s}-{k}" for s in range(n_shards) for k in range(5)}
    assert set(counts.values()) == {1}
    assert all(per_rank)


def test_resampled_streams_draw_shards_for_ever(shards):
    def keys(rank, n=120, seed=1):
        stream = ShardStream(str(shards / "*.tar"), seed=seed, rank=rank, world_size=2, decode=False,
                             shuffle_buffer=0, resampled=True)
        return [s["key"] for s in itertools.islice(stream, n)]
    a, b = keys(0), keys(1)
    assert len(a) == 120 and a == keys(0) and a != b  # past 3 epochs' worth, deterministic, per rank
    drawn = [a[i].split("-")[0] for i in range(0, 120, 5)]  # whole shards, 5 samples each
    assert all(a[i:i + 5] == [f"{drawn[i // 5]}-{k}" for k in range(5)] for i in range(0, 120, 5))
    assert len(set(drawn)) < len(drawn)  # with replacement: some shard came twice
    cfg = ShardDataConfig(shards=str(shards / "*.tar"), shuffle_buffer=0, resampled=True)
    samples = ShardSamples(expand_urls(cfg.shards), cfg, seed=1, rank=0, world_size=2)  # (stream seed 1_000_003)
    assert [s["key"] for _, s in itertools.islice(samples(), 120)] == keys(0, seed=1_000_003)


def test_brace_pattern_over_thousands_of_shards_lists_no_directory(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("listed a directory")
    for mod, name in [(os, "listdir"), (os, "scandir"), (glob, "glob"), (glob, "iglob")]:
        monkeypatch.setattr(mod, name, refuse)
    urls = expand_urls("/data/laion/{000000..019999}.tar")
    assert len(urls) == 20000 and urls[0] == "/data/laion/000000.tar" and urls[-1] == "/data/laion/019999.tar"
    stream = ShardStream("/data/laion/{000000..019999}.tar", rank=1, world_size=2, num_workers=2, seed=3)
    parts = [stream.stream_shards(0, s, 4) for s in range(4)]
    assert [len(p) for p in parts] == [5000] * 4
    assert sorted(itertools.chain(*parts)) == urls
    assert stream.stream_shards(1, 0, 4) != parts[0]  # reshuffled per epoch
