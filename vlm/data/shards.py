"""Streaming image-text pairs from img2dataset-style webdataset shards.

``ShardStream(urls, ...)`` yields ``{"key", "image": PIL RGB, "text", "json"}`` dicts. Tar reading
and key grouping are webdataset's (``webdataset.tarfile_samples``); shard assignment, shuffling
and decoding are done here so that every choice is deterministic and every bad sample is counted.

How the data is split across ``world_size`` ranks and ``num_workers`` DataLoader workers: there are
S = world_size * max(num_workers, 1) streams; stream s = rank * max(num_workers, 1) + worker_id.
Every stream shuffles the shard list with the same seeded permutation (``(seed, epoch)``), then
- when there are at least S shards, stream s reads shards ``perm[s::S]`` (shard-level split; the
  usual webdataset ``split_by_node`` + ``split_by_worker``, but deterministic);
- otherwise every stream reads every shard and keeps the samples whose running position is
  ``s mod S`` (sample-level split: slower, but no rank is left without data).
Either way the streams are disjoint and together cover every sample once per epoch.

With ``resampled=True`` (webdataset's ``resampled=True``, for multi-epoch runs on many nodes) there
are no epochs: stream s draws shards with replacement, for ever, from its own generator seeded by
``(seed, s)``, so no rank waits for another at an epoch boundary and the streams differ; each
shard is read as often as any other in expectation, not exactly once per pass.

Shard lists come from brace patterns (``braceexpand``: "{000000..099999}" is 100k names made
without touching the filesystem, so no directory of thousands of shards is listed); a glob lists
its directory.

Samples are then shuffled through a buffer of ``shuffle_buffer`` with a ``random.Random`` seeded by
``(seed, epoch, s)``; ``shuffle_buffer=0`` keeps the shard order. With ``repeat=True`` the stream
runs epoch after epoch, reshuffled each time, so a trainer can draw any number of batches.

Skipped and counted in ``.stats`` (``{"ok", "skipped", "reasons": {reason: n}}``), with one logged
warning per reason: a corrupt or unreadable shard (the rest of that shard), a sample without an
image or text, an empty sample or empty text, an undecodable or truncated image, an image larger
than ``max_pixels``, undecodable text or json. In DataLoader workers each worker counts its own.
"""
from __future__ import annotations

import glob
import io
import itertools
import json
import logging
import random
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch
import webdataset as wds
from braceexpand import braceexpand
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = ("txt", "text", "caption")


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """A brace pattern ("dir/train-{000000..000003}.tar"), a glob, or a list of either -> paths.

    Globs are sorted; a pattern that matches no file is kept as is (it may be a URL)."""
    patterns = [urls] if isinstance(urls, (str, Path)) else list(urls)
    out: list[str] = []
    for pattern in patterns:
        for p in braceexpand(str(pattern)):
            matches = sorted(glob.glob(p)) if any(c in p for c in "*?[") else []
            out.extend(matches or [p])
    return out


class ShardStream(torch.utils.data.IterableDataset):
    """An iterable of decoded samples from webdataset shards (see the module docstring)."""

    def __init__(self, urls: str | Sequence[str], decode: bool = True, shuffle_buffer: int = 1000, seed: int = 0,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, repeat: bool = False,
                 max_pixels: int = 4096 * 4096, resampled: bool = False) -> None:
        """urls: brace pattern / glob / list. decode: PIL RGB images (False: the raw image bytes).
        num_workers: the DataLoader's worker count (0 = iterate in this process). resampled:
        infinite, shards drawn with replacement per stream (module docstring; ``repeat`` is moot)."""
        self.urls = expand_urls(urls)
        if not self.urls:
            raise ValueError(f"no shards match {urls!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if shuffle_buffer < 0 or num_workers < 0 or max_pixels < 1:
            raise ValueError("shuffle_buffer and num_workers must be >= 0, max_pixels >= 1")
        self.decode, self.shuffle_buffer, self.seed = decode, shuffle_buffer, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.repeat, self.max_pixels, self.resampled = repeat, max_pixels, resampled
        self.stats: dict[str, Any] = {"ok": 0, "skipped": 0, "reasons": {}}
        self._warned: set[str] = set()

    # -- bookkeeping ------------------------------------------------------------------------------

    def _skip(self, reason: str, detail: str) -> None:
        self.stats["skipped"] += 1
        self.stats["reasons"][reason] = self.stats["reasons"].get(reason, 0) + 1
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning("ShardStream: skipping %s (%s); further ones are only counted in .stats", reason, detail)

    def _stream_id(self) -> tuple[int, int]:
        """(this stream's index s, number of streams S)."""
        workers = max(self.num_workers, 1)
        info = torch.utils.data.get_worker_info()
        worker_id = info.id if info is not None else 0
        if info is not None and info.num_workers != workers:
            raise ValueError(f"ShardStream(num_workers={self.num_workers}) used by a DataLoader with "
                             f"{info.num_workers} workers; pass the same number")
        return self.rank * workers + worker_id, self.world_size * workers

    # -- reading ----------------------------------------------------------------------------------

    def _raw_samples(self, shards: Iterable[str]) -> Iterator[dict]:
        """webdataset's grouped samples of each shard; a failing shard is skipped from the failure on."""
        for url in shards:
            failed: list[Exception] = []

            def handler(exn: Exception) -> bool:
                failed.append(exn)
                return False  # stop reading this shard

            for sample in wds.tarfile_samples([{"url": url}], handler=handler):
                yield sample
            if failed:
                self._skip("corrupt_shard", f"{url}: {failed[0]!r:.200}")

    def _decode(self, raw: dict) -> Optional[dict]:
        key = raw.get("__key__", "?")
        members = {k.lower(): v for k, v in raw.items() if not k.startswith("__")}
        if not members or all(not v for v in members.values()):
            return self._skip("empty_sample", key)
        img_ext = next((e for e in IMAGE_EXTS if e in members), None)
        if img_ext is None:
            return self._skip("missing_image", f"{key} has {sorted(members)}")
        txt_ext = next((e for e in TEXT_EXTS if e in members), None)
        if txt_ext is None:
            return self._skip("missing_text", f"{key} has {sorted(members)}")
        try:
            text = members[txt_ext].decode("utf-8").strip()
        except UnicodeDecodeError:
            return self._skip("bad_text", key)
        if not text:
            return self._skip("empty_text", key)
        meta: dict = {}
        if "json" in members:
            try:
                meta = json.loads(members["json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                return self._skip("bad_json", key)
            if not isinstance(meta, dict):
                return self._skip("bad_json", f"{key}: not an object")
        data = members[img_ext]
        if not data:
            return self._skip("empty_image", key)
        image: Any = data
        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > self.max_pixels:
                    return self._skip("too_large", f"{key}: {w}x{h} > max_pixels {self.max_pixels}")
                if self.decode:
                    im.load()
                    image = im.convert("RGB")
        except Image.DecompressionBombError:
            return self._skip("too_large", key)
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on bad bytes
            return self._skip("bad_image", f"{key}: {e!r:.200}")
        self.stats["ok"] += 1
        return {"key": key, "image": image, "text": text, "json": meta}

    def stream_shards(self, epoch: int, stream: int, streams: int) -> list[str]:
        """The shards stream ``stream`` of ``streams`` reads in ``epoch`` (without resampling):
        its ``perm[stream::streams]``, or every shard when there are fewer shards than streams."""
        shards = list(self.urls)
        random.Random(f"shards:{self.seed}:{epoch}").shuffle(shards)
        return shards[stream::streams] if len(shards) >= streams else shards

    def _resampled_shards(self, stream: int) -> Iterator[str]:
        rng = random.Random(f"resample:{self.seed}:{stream}")
        while True:
            yield rng.choice(self.urls)

    def _epoch(self, epoch: int) -> Iterator[dict]:
        s, total = self._stream_id()
        if self.resampled:
            raw: Iterator[dict] = self._raw_samples(self._resampled_shards(s))
        elif len(self.urls) >= total:
            raw = self._raw_samples(self.stream_shards(epoch, s, total))
        else:
            raw = itertools.islice(self._raw_samples(self.stream_shards(epoch, s, total)), s, None, total)
        samples = (d for d in map(self._decode, raw) if d is not None)
        if self.shuffle_buffer <= 1:
            yield from samples
            return
        rng, buf = random.Random(f"buffer:{self.seed}:{epoch}:{s}"), []
        for d in samples:
            buf.append(d)
            if len(buf) >= self.shuffle_buffer:
                k = rng.randrange(len(buf))
                buf[k], buf[-1] = buf[-1], buf[k]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def __iter__(self) -> Iterator[dict]:
        for epoch in itertools.count() if self.repeat and not self.resampled else (0,):
            yield from self._epoch(epoch)

    def skip(self, n: int) -> Iterator[dict]:
        """The stream without its first ``n`` samples (``itertools.islice``-style, lazy)."""
        if n < 0:
            raise ValueError(f"cannot skip a negative number of samples: {n}")
        return itertools.islice(iter(self), n, None)
