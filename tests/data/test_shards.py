"""ShardStream: bad samples and shards skipped and counted; rank/worker splits; determinism."""
import io
import itertools
import json
import logging

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from vlm.data.shards import ShardStream, expand_urls


def _jpeg(seed, size=16):
    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _good(key, seed=0):
    return {"__key__": key, "jpg": _jpeg(seed), "txt": f"caption {key}".encode(), "json": json.dumps({"key": key}).encode()}


def _write(path, samples):
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)


@pytest.fixture(scope="module")
def clean_shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("clean")
    for s in range(4):
        _write(d / f"train-{s:06d}.tar", [_good(f"{s}{k:03d}", k) for k in range(10)])
    return d


def test_bad_samples_are_skipped_and_counted(tmp_path, caplog):
    big = io.BytesIO()
    Image.new("RGB", (100, 100)).save(big, format="PNG")
    samples = [_good("a0"), {"__key__": "a1", "jpg": _jpeg(1)[:200], "txt": b"truncated"},
               {"__key__": "a2", "jpg": _jpeg(2), "json": b"{}"},  # no caption
               {"__key__": "a3", "txt": b""},  # empty sample
               {"__key__": "a4", "jpg": b"this is not an image", "txt": b"x"},
               {"__key__": "a5", "png": big.getvalue(), "txt": b"huge"},
               {"__key__": "a6", "jpg": _jpeg(6), "txt": b"bad json", "json": b"{not json"},
               _good("a7", 7)]
    _write(tmp_path / "s-0.tar", samples)
    (tmp_path / "s-1.tar").write_bytes(b"\x00garbage" * 100)  # not a tar at all
    full = (tmp_path / "s-0.tar").read_bytes()
    (tmp_path / "s-2.tar").write_bytes(full[: len(full) // 2 + 100])  # truncated mid-shard
    stream = ShardStream(str(tmp_path / "s-{0..2}.tar"), shuffle_buffer=0, max_pixels=5000)
    with caplog.at_level(logging.WARNING, logger="vlm.data.shards"):
        got = list(stream)
    keys = [g["key"] for g in got]
    assert keys[:2] == ["a0", "a7"] and set(keys) <= {"a0", "a7"}
    reasons = stream.stats["reasons"]
    assert reasons["bad_image"] >= 2 and reasons["missing_text"] >= 1 and reasons["empty_sample"] >= 1
    assert reasons["too_large"] >= 1 and reasons["bad_json"] >= 1 and reasons["corrupt_shard"] >= 1
    assert stream.stats["ok"] == len(got) and stream.stats["skipped"] == sum(reasons.values())
    for g in got:
        assert isinstance(g["image"], Image.Image) and g["image"].mode == "RGB" and g["image"].size == (16, 16)
        assert g["text"] == f"caption {g['key']}" and g["json"] == {"key": g["key"]}
    warned = [r.getMessage() for r in caplog.records]
    for reason in reasons:  # one warning per reason, not per sample
        assert sum(f"skipping {reason} " in m for m in warned) == 1


def test_expand_urls(clean_shards):
    braces = expand_urls(str(clean_shards / "train-{000000..000003}.tar"))
    assert braces == expand_urls(str(clean_shards / "train-*.tar")) == sorted(braces)
    assert len(braces) == 4
    with pytest.raises(ValueError):
        ShardStream(str(clean_shards / "train-*.tar"), rank=2, world_size=2)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 6])
def test_ranks_get_disjoint_covering_subsets(clean_shards, world_size):
    parts = [[s["key"] for s in ShardStream(str(clean_shards / "*.tar"), seed=3, rank=r, world_size=world_size,
                                            decode=False)] for r in range(world_size)]
    flat = [k for p in parts for k in p]
    assert len(flat) == len(set(flat)) == 40  # disjoint and covering (6 ranks > 4 shards: sample-level split)
    assert all(parts)


def test_dataloader_workers_split_the_stream(clean_shards):
    stream = ShardStream(str(clean_shards / "*.tar"), seed=0, num_workers=2, decode=False, shuffle_buffer=4)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    keys = [s["key"] for s in loader]
    assert sorted(keys) == sorted(f"{s}{k:03d}" for s in range(4) for k in range(10))


def test_deterministic_shuffle_and_repeat(clean_shards):
    def keys(seed, **kw):
        return [s["key"] for s in ShardStream(str(clean_shards / "*.tar"), seed=seed, shuffle_buffer=8, decode=False, **kw)]
    a = keys(0)
    assert a == keys(0) and a != keys(1) and sorted(a) == sorted(keys(1))
    assert a != sorted(a)  # actually shuffled
    stream = ShardStream(str(clean_shards / "*.tar"), seed=0, shuffle_buffer=8, decode=False, repeat=True)
    two = [s["key"] for s in itertools.islice(stream, 80)]
    assert two[:40] == a and sorted(two[40:]) == sorted(a) and two[40:] != a  # reshuffled per epoch
    assert [s["key"] for s in itertools.islice(stream.skip(35), 10)] == two[35:45]


def test_training_run_through_a_bad_shard_skips_and_counts(tmp_path, monkeypatch, caplog, capsys):
    """Stage one trains through a shard holding corrupt, empty, caption-less and huge samples (and a
    shard that is not a tar at all): the run finishes and every bad sample is skipped and counted."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
    from test_stage1 import _image, tiny_cfg
    from training import stage1

    huge = io.BytesIO()
    Image.new("L", (4100, 4100)).save(huge, format="PNG")  # 16.8M px > ShardStream's default max_pixels
    bad = [{"__key__": "bad-trunc", "jpg": _jpeg(1)[:150], "txt": b"a truncated jpeg"},
           {"__key__": "bad-empty", "txt": b""},
           {"__key__": "bad-nocap", "jpg": _jpeg(2), "json": b"{}"},
           {"__key__": "bad-blank", "jpg": _jpeg(3), "txt": b"   "},
           {"__key__": "bad-huge", "png": huge.getvalue(), "txt": b"a huge image"},
           {"__key__": "bad-bytes", "jpg": b"not an image at all", "txt": b"garbage"}]
    samples = []
    for i in range(24):
        buf = io.BytesIO()
        color, shape = ("red", "green", "blue", "yellow")[i % 4], ("square", "bar", "dot", "frame")[i // 4 % 4]
        _image(color, shape).save(buf, format="JPEG", quality=95)
        samples.append({"__key__": f"good-{i:03d}", "jpg": buf.getvalue(), "txt": f"a {color} {shape}.".encode()})
        if i % 4 == 3:
            samples.append(bad[i // 4])
    _write(tmp_path / "000000.tar", samples)
    (tmp_path / "000001.tar").write_bytes(b"\x00not a tar" * 64)
    streams = []
    real_init = ShardStream.__init__

    def recording_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        streams.append(self)

    monkeypatch.setattr(ShardStream, "__init__", recording_init)
    cfg = tiny_cfg(str(tmp_path / "{000000..000001}.tar"), tmp_path / "run", "clip", steps=4)
    with caplog.at_level(logging.WARNING, logger="vlm.data.shards"):
        final = stage1.run(cfg)
    assert final.is_dir() and any(final.iterdir())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and np.isfinite([r["loss"] for r in rows]).all()
    # streams[0] trained the tokenizer; streams[1] is training epoch 0 (3 batches of 8), fully read
    want = {"bad_image": 2, "empty_sample": 1, "missing_text": 1, "empty_text": 1, "too_large": 1, "corrupt_shard": 1}
    for stream in streams[:2]:
        assert stream.stats["reasons"] == want and stream.stats["ok"] == 24
        assert stream.stats["skipped"] == sum(want.values())
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert all(f"skipping {reason} " in warned for reason in want)
    assert "epoch 0: 24 samples read, 7 skipped" in capsys.readouterr().err  # the run reports the counts
