"""Stage one's data path: the world's shards (JPEG in tar, decoded per sample) against its
pre-decoded train arrays (``vlm.world.arrays``), the same pixels and the same collate.

``python -m bench.data_path [--n 512] [--batch 64]`` exports a small world into a temporary directory
and prints the median milliseconds per micro-batch for each path and their ratio: the images alone
(read, decode, normalise into [B,3,S,S]) and the whole stage-one collate (plus tokenising the
captions, the same work on both paths).
"""
from __future__ import annotations

import argparse
import functools
import glob
import tempfile
import time

import torch

from bench.common import Row, format_table
from encoders.objectives.clip import ClipConfig
from encoders.towers import ImageTransform
from training.data import ArrayBatches, ShardBatches, ShardSamples
from training.stage1 import stage1_collate
from vlm.config import ShardDataConfig, WorldConfig
from vlm.data.tokenizer import train_bpe_tokenizer
from vlm.world.arrays import TrainArrays
from vlm.world.export import export_world


def _ms_per_batch(make_batches, n_batches: int) -> float:
    """Median wall milliseconds per batch of the first ``n_batches`` of ``make_batches(0)`` (one warm-up)."""
    it = make_batches(0)
    next(it)
    times = []
    for _ in range(n_batches):
        t0 = time.perf_counter()
        next(it)
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]


def _image_batches(batches, transform: ImageTransform):
    """A ``make_batches`` whose batches are only the pixel tensors of ``batches``' samples."""
    def make(start: int):
        while True:
            yield transform.batch([s["image"] for _, s in next(batches)])
    return make


def _pairs(samples, batch: int):
    """Groups of ``batch`` (position, sample) pairs from an infinite pair iterator."""
    while True:
        yield [next(samples) for _ in range(batch)]


def run(n: int = 512, batch: int = 64, n_batches: int = 6) -> list[Row]:
    """Rows: ms per batch from the shards and from the arrays (images alone, whole collate), ratios."""
    cfg = WorldConfig(n_train=n, n_eval=1)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        export_world(d, cfg, progress=False, samples_per_shard=256)
        tok = train_bpe_tokenizer(iter(TrainArrays(d).index["captions"]), vocab_size=256, model_max_length=48,
                                  add_bos=True, add_eos=True)
        collate = functools.partial(stage1_collate, tokenizer=tok, transform=ImageTransform(cfg.image_size),
                                    objective=ClipConfig(), max_text_len=48, seed=0)
        urls = sorted(glob.glob(f"{d}/shards/*.tar"))
        shard_samples = ShardSamples(urls, ShardDataConfig(shuffle_buffer=256), seed=0)
        rows = TrainArrays(d)
        array_pairs = ((i, rows.sample(i % len(rows))) for i in range(10 ** 9))
        transform = ImageTransform(cfg.image_size)
        ms = {"shards, images": _ms_per_batch(_image_batches(_pairs(shard_samples(), batch), transform), n_batches),
              "arrays, images": _ms_per_batch(_image_batches(_pairs(array_pairs, batch), transform), n_batches),
              "shards, collate": _ms_per_batch(ShardBatches(shard_samples, batch, collate), n_batches),
              "arrays, collate": _ms_per_batch(ArrayBatches(rows, batch, collate, seed=0), n_batches)}
    out = [Row(f"data: {k}, ms per batch of {batch}", v, "ms") for k, v in ms.items()]
    return out + [Row("data: images, shards / arrays", ms["shards, images"] / ms["arrays, images"], "x", "> 1"),
                  Row("data: collate, shards / arrays", ms["shards, collate"] / ms["arrays, collate"], "x", "> 1")]


def main() -> None:
    """``python -m bench.data_path``: parse the command line and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    print(format_table(run(args.n, args.batch), "stage-one data path"))


if __name__ == "__main__":
    main()
