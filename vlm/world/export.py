"""Write the synthetic world to disk in the real datasets' formats (what ``vlm world`` runs).

Layout of ``DIR`` (file names inside the jsons are relative to ``DIR/images``):
```
world.json                        {"config": WorldConfig fields, "counts": {...}}; written last
.vlm-world                        written first: marks DIR as a world export (``vlm world`` writes
                                  into no other non-empty DIR, and deletes only its own file names)
shards/train-{000000..}.tar       img2dataset style (train split): KEY.jpg, KEY.txt (the short caption
                                  for even indices, the detailed one for odd), KEY.json (img2dataset
                                  fields plus objects, boxes, captions, long_caption)
images/{index:08d}.jpg            every image (train and eval), JPEG quality 95
masks/{index:08d}.png             class mask (eval split), 8-bit PNG, 0 = background, c + 1 = SHAPES[c]
coco/captions_{train,val}.json    COCO captions; references = the short, detailed and counting captions
coco/instances_val.json           COCO instances (eval split): categories = shapes (id c + 1), bbox xywh,
                                  area = visible pixels, iscrowd 0
llava/train.json                  LLaVA conversations (train split), ``llava_conversations`` per image, turns drawn
                                  with ``llava_mix`` (``vlm.world.mix.mixed_conversations``; POPE-style
                                  existence negatives sampled over the train split only)
pope/{random,popular,adversarial}.jsonl   POPE questions on the eval split (``vlm.data.pope``)
refcoco/refs.json + instances.json        one ref per eval object; eval images split val/testA/testB
vsr/{train,test}.jsonl            the true/false statements of the train / eval split
contact_sheet.png                 16 train images, upscaled, with boxes and short captions
arrays/                           the train images pre-decoded from those JPEGs, with their texts and,
                                  with ``world.twins``, their twins (``vlm.world.arrays``)
```
Everything is a deterministic function of the WorldConfig.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import textwrap
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw
from tqdm import tqdm

from vlm.config import WorldConfig
from vlm.data.formats import (LlavaRecord, RefExpr, VsrItem, write_coco_captions, write_coco_instances,
                              write_llava, write_pope, write_refcoco, write_vsr)
from vlm.data.pope import build_pope
from vlm.files import VlmError, atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text
from vlm.world.arrays import TrainArrayWriter
from vlm.world.generator import generate_sample, generate_twin, world_split
from vlm.world.mix import existence_questions, image_objects, mixed_conversations
from vlm.world.types import WorldSample
from vlm.world.vocab import SHAPES

REFCOCO_SPLITS = ("val", "testA", "testB")
CAPTION_STYLES = ("short", "detailed", "counting")
MARKER = ".vlm-world"  # written first: an interrupted export is still recognised as one
FORMAT_VERSION = 3  # 2: LLaVA conversations drawn with the llava_mix; 3: arrays/


def jpeg_bytes(image: np.ndarray, quality: int = 95) -> bytes:
    """uint8 [H, W, 3] -> JPEG bytes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def shard_caption(sample: WorldSample) -> str:
    """The caption stored in a train shard: short for even indices, detailed for odd ones."""
    return sample.captions["short" if sample.index % 2 == 0 else "detailed"]


def _objects_json(sample: WorldSample) -> list[dict]:
    return [{"shape": o.shape, "color": o.color, "size": o.size, "box": list(o.box), "center": list(o.center)}
            for o in sample.objects]


def _shard_json(sample: WorldSample, cfg: WorldConfig, jpg: bytes) -> dict:
    """img2dataset's per-sample json fields plus the world's annotations."""
    s = cfg.image_size
    return {"url": f"world://{cfg.seed}/{sample.index}", "key": sample.key, "caption": shard_caption(sample),
            "status": "success", "error_message": None, "width": s, "height": s, "original_width": s,
            "original_height": s, "exif": "{}", "sha256": hashlib.sha256(jpg).hexdigest(),
            "objects": _objects_json(sample), "boxes": [list(o.box) for o in sample.objects],
            "captions": sample.captions, "long_caption": sample.long_caption}


def claim_out_dir(out: Path) -> None:
    """Make ``out`` a world export dir: refuse (``VlmError``) a non-empty ``out`` that holds no world
    export, finished (``world.json``) or interrupted (``MARKER``), so nothing else is ever deleted;
    then write the marker before any other file."""
    if out.is_dir() and any(out.iterdir()) and not ((out / "world.json").is_file() or (out / MARKER).is_file()):
        raise VlmError(f"{out} is not empty and is not a world export (no world.json or {MARKER}); refusing to "
                       "write into it: choose an empty or new --out")
    atomic_write_text(out / MARKER, "a world export (vlm world); its files are rewritten by the next export\n")


def _clear_previous(out: Path) -> None:
    """Remove the files an earlier export wrote, by their exact name patterns (stale shards would
    otherwise be read); anything else in ``out`` is left alone."""
    for pattern in ("world.json", "shards/train-[0-9]*.tar", "images/[0-9]*.jpg", "masks/[0-9]*.png",
                    "arrays/train*.npy", "arrays/train.json"):
        for p in out.glob(pattern):
            if p.name == "world.json" or p.parent.name == "arrays" or p.stem.removeprefix("train-").isdigit():
                p.unlink()


def contact_sheet(samples: list[WorldSample], path: Path, scale: int = 4, cols: int = 4) -> None:
    """A grid of samples upscaled ``scale`` x, boxes drawn, short caption under each -> PNG."""
    size = samples[0].image.shape[0] * scale
    text_h = 44
    rows = (len(samples) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * (size + 8) + 8, rows * (size + text_h + 8) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    for k, sample in enumerate(samples):
        x, y = 8 + (k % cols) * (size + 8), 8 + (k // cols) * (size + text_h + 8)
        sheet.paste(Image.fromarray(sample.image).resize((size, size), Image.NEAREST), (x, y))
        for o in sample.objects:
            x1, y1, x2, y2 = (v * scale for v in o.box)
            draw.rectangle((x + x1, y + y1, x + x2 - 1, y + y2 - 1), outline=(0, 0, 0), width=1)
        lines = textwrap.wrap(sample.captions["short"], width=max(10, size // 6))[:3]
        draw.multiline_text((x, y + size + 2), "\n".join(lines), fill=(0, 0, 0), spacing=1)
    with atomic_path(path) as tmp:
        sheet.save(tmp)


@dataclasses.dataclass
class _Collected:
    """What one pass over the world gathers for the json-based formats (written at the end)."""

    captions: dict[str, dict[int, list[str]]] = dataclasses.field(default_factory=lambda: {"train": {}, "val": {}})
    files: dict[str, dict[int, str]] = dataclasses.field(default_factory=lambda: {"train": {}, "val": {}})
    llava_samples: list[WorldSample] = dataclasses.field(default_factory=list)  # train samples, pixels dropped
    vsr: dict[str, list[VsrItem]] = dataclasses.field(default_factory=lambda: {"train": [], "test": []})
    inst_images: dict[int, dict] = dataclasses.field(default_factory=dict)
    inst_anns: dict[int, dict] = dataclasses.field(default_factory=dict)
    refs: list[RefExpr] = dataclasses.field(default_factory=list)
    pope_objects: dict[str, set[str]] = dataclasses.field(default_factory=dict)
    sheet_samples: list[WorldSample] = dataclasses.field(default_factory=list)
    n_objects: dict[str, int] = dataclasses.field(default_factory=lambda: {"train": 0, "eval": 0})
    arrays: Any = None  # the TrainArrayWriter of the train split


def _vsr_items(sample: WorldSample, file_name: str) -> list[VsrItem]:
    return [VsrItem(image=file_name, caption=st.text, label=int(st.label), relation=st.relation,
                    subj=sample.objects[st.subject].name, obj=sample.objects[st.object].name)
            for st in sample.statements]


def _add_train(sample: WorldSample, jpg: bytes, file_name: str, cfg: WorldConfig, writer: Any, c: _Collected) -> None:
    """A train sample: its shard entry, LLaVA conversations, VSR statements, maybe the contact sheet."""
    writer.write({"__key__": sample.key, "jpg": jpg, "txt": shard_caption(sample).encode("utf-8"),
                  "json": json.dumps(_shard_json(sample, cfg, jpg)).encode("utf-8")})
    empty = np.zeros((0, 0), dtype=np.int64)
    c.llava_samples.append(dataclasses.replace(sample, image=np.zeros((0, 0, 3), np.uint8), class_mask=empty,
                                               instance_mask=empty))
    c.vsr["train"] += _vsr_items(sample, file_name)
    _add_train_arrays(sample, jpg, cfg, c.arrays)
    if len(c.sheet_samples) < 16:
        c.sheet_samples.append(sample)


def _add_train_arrays(sample: WorldSample, jpg: bytes, cfg: WorldConfig, arrays: TrainArrayWriter) -> None:
    """Row ``sample.index`` of the pre-decoded train arrays (and its twin with ``cfg.twins``)."""
    twin = None
    if cfg.twins:
        twin_sample, _k, attr = generate_twin(sample.index, cfg.seed, cfg)
        twin = (jpeg_bytes(twin_sample.image), shard_caption(twin_sample), twin_sample.long_caption, attr,
                _object_attributes(twin_sample))
    arrays.add(sample.index, sample.key, jpg, shard_caption(sample), sample.long_caption,
               _object_attributes(sample), twin)


def _object_attributes(sample: WorldSample) -> list[list[str]]:
    """[shape, colour, size] of each object."""
    return [[o.shape, o.color, o.size] for o in sample.objects]


def _add_eval(sample: WorldSample, file_name: str, cfg: WorldConfig, out: Path, c: _Collected) -> None:
    """An eval sample: its class mask, VSR statements, POPE objects, COCO instances and RefCOCO refs."""
    s, index = cfg.image_size, sample.index
    with atomic_path(out / "masks" / f"{sample.key}.png", durable=False) as tmp:  # world.json commits them
        Image.fromarray(sample.class_mask.astype(np.uint8), mode="L").save(tmp)
    c.vsr["test"] += _vsr_items(sample, file_name)
    c.pope_objects[file_name] = {o.shape for o in sample.objects}
    c.inst_images[index] = {"file_name": file_name, "width": s, "height": s}
    ref_split = REFCOCO_SPLITS[(index - cfg.n_train) % len(REFCOCO_SPLITS)]
    for k, o in enumerate(sample.objects):
        ann_id = index * 16 + k + 1  # unique: at most 8 objects per image
        x1, y1, x2, y2 = o.box
        area = int((sample.instance_mask == k + 1).sum())
        c.inst_anns[ann_id] = {"image_id": index, "category_id": SHAPES.index(o.shape) + 1,
                               "bbox": [x1, y1, x2 - x1, y2 - y1], "area": area, "iscrowd": 0}
        c.refs.append(RefExpr(ref_id=ann_id, ann_id=ann_id, image_id=index, file_name=file_name,
                              sentences=[sample.referring[k]], bbox_xywh=(x1, y1, x2 - x1, y2 - y1),
                              split=ref_split, width=s, height=s, category_id=SHAPES.index(o.shape) + 1))


def _add_sample(sample: WorldSample, jpg: bytes, cfg: WorldConfig, out: Path, writer: Any, c: _Collected) -> None:
    """Write one sample's image (its JPEG bytes ``jpg``) and route it to the train or eval formats."""
    is_train = sample.index < cfg.n_train
    split = "train" if is_train else "val"
    file_name = f"{sample.key}.jpg"
    atomic_write_bytes(out / "images" / file_name, jpg, durable=False)  # world.json, written last, commits them
    c.files[split][sample.index] = file_name
    c.captions[split][sample.index] = [sample.captions[k] for k in CAPTION_STYLES]
    c.n_objects["train" if is_train else "eval"] += len(sample.objects)
    if is_train:
        _add_train(sample, jpg, file_name, cfg, writer, c)
    else:
        _add_eval(sample, file_name, cfg, out, c)


def render(index: int, cfg: WorldConfig) -> tuple[WorldSample, bytes]:
    """Sample ``index`` of the world ``cfg`` and its image's JPEG bytes (what the export writes)."""
    sample = generate_sample(index, cfg.seed, cfg)
    return sample, jpeg_bytes(sample.image)


PARALLEL_MIN_SAMPLES = 512  # smaller exports render in this process (a pool costs more than it saves)


def rendered(indices: Sequence[int], cfg: WorldConfig, workers: int = 1) -> Iterator[tuple[WorldSample, bytes]]:
    """``render`` of each index, in order; ``workers`` > 1 renders in that many processes (forked where
    the platform can) while the caller writes. Every sample is a function of (seed, index) alone, so the
    output is the same for any ``workers``."""
    if workers <= 1 or len(indices) < PARALLEL_MIN_SAMPLES:
        yield from (render(i, cfg) for i in indices)
        return
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ctx.Pool(workers) as pool:
        yield from pool.imap(partial(render, cfg=cfg), indices, chunksize=64)


def default_workers() -> int:
    """Processes that render the world: the CPUs this process may use, at most 4."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cpus))


def llava_records(train_samples: list[WorldSample], cfg: WorldConfig) -> list[LlavaRecord]:
    """The LLaVA records of the train samples: ``cfg.llava_conversations`` each, drawn with
    ``cfg.llava_mix``; existence negatives are sampled over these samples only (no eval image)."""
    exist = existence_questions(image_objects(train_samples), cfg.seed)
    return [LlavaRecord(id=f"{s.key}-{k}", image=f"{s.key}.jpg", conversations=conv)
            for s in train_samples for k, conv in enumerate(mixed_conversations(s, exist[s.key], cfg))]


def _write_formats(out: Path, cfg: WorldConfig, c: _Collected, total: int) -> dict:
    """Write the json-based formats and the contact sheet; returns the POPE splits."""
    s = cfg.image_size
    categories = {k + 1: name for k, name in enumerate(SHAPES)}
    sizes = {i: (s, s) for i in range(total)}
    write_coco_captions(out / "coco" / "captions_train.json", c.files["train"], c.captions["train"], sizes)
    write_coco_captions(out / "coco" / "captions_val.json", c.files["val"], c.captions["val"], sizes)
    write_coco_instances(out / "coco" / "instances_val.json", c.inst_images, categories, c.inst_anns)
    write_llava(out / "llava" / "train.json", llava_records(c.llava_samples, cfg))
    pope = build_pope(c.pope_objects, n_per_image=3, seed=cfg.seed, vocabulary=SHAPES)
    for split, questions in pope.items():
        write_pope(out / "pope" / f"{split}.jsonl", questions)
    write_refcoco(out / "refcoco" / "refs.json", out / "refcoco" / "instances.json", c.refs, categories)
    write_vsr(out / "vsr" / "train.jsonl", c.vsr["train"])
    write_vsr(out / "vsr" / "test.jsonl", c.vsr["test"])
    if c.sheet_samples:
        contact_sheet(c.sheet_samples, out / "contact_sheet.png")
    return pope


def _counts(out: Path, cfg: WorldConfig, n_train: int, n_eval: int, c: _Collected, pope: dict) -> dict[str, Any]:
    return {"train": n_train, "eval": n_eval, "shards": len(list((out / "shards").glob("train-*.tar"))),
            "objects_train": c.n_objects["train"], "objects_eval": c.n_objects["eval"],
            "caption_refs_train": sum(map(len, c.captions["train"].values())),
            "caption_refs_val": sum(map(len, c.captions["val"].values())),
            "llava_conversations": len(c.llava_samples) * cfg.llava_conversations, "pope": {k: len(v) for k, v in pope.items()},
            "refs": len(c.refs), "vsr_train": len(c.vsr["train"]), "vsr_test": len(c.vsr["test"])}


def export_world(out_dir: str | Path, cfg: WorldConfig, progress: bool = True,
                 samples_per_shard: int = 1000, workers: Optional[int] = None) -> dict[str, Any]:
    """Generate the world ``cfg`` and write it under ``out_dir`` (layout in the module docstring).

    Returns the counts (also stored in ``world.json``). ``workers`` processes render the images
    (None: ``default_workers()``; the files are the same for any number) while this one writes;
    ``world.json`` is written last, so an interrupted export is never taken as complete by ``ensure_world``.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out = Path(out_dir)
    claim_out_dir(out)
    for sub in ("shards", "images", "masks", "coco", "llava", "pope", "refcoco", "vsr"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    _clear_previous(out)
    train_idx, eval_idx = world_split(cfg)
    total = len(train_idx) + len(eval_idx)
    collected = _Collected(arrays=TrainArrayWriter(out, len(train_idx), cfg.image_size, cfg.twins))
    bar = tqdm(total=total, desc="world export", unit="img", disable=not progress)
    writer = wds.ShardWriter(str(out / "shards" / "train-%06d.tar"), maxcount=samples_per_shard, verbose=0)
    try:
        for sample, jpg in rendered([*train_idx, *eval_idx], cfg, default_workers() if workers is None else workers):
            _add_sample(sample, jpg, cfg, out, writer, collected)
            bar.update(1)
    finally:
        writer.close()
        bar.close()
    collected.arrays.close()
    pope = _write_formats(out, cfg, collected, total)
    counts = _counts(out, cfg, len(train_idx), len(eval_idx), collected, pope)
    meta = {"format_version": FORMAT_VERSION, "config": dataclasses.asdict(cfg), "counts": counts}
    atomic_write_json(out / "world.json", meta, indent=2)
    return counts


def world_meta(out_dir: str | Path) -> dict:
    """The export's ``world.json`` as a dict; {} when missing or unreadable (no complete world)."""
    meta_path = Path(out_dir) / "world.json"
    if not meta_path.is_file():
        return {}
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return {}


def recorded_config(cfg: WorldConfig) -> dict:
    """``cfg`` as ``world.json`` records it (through JSON: tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def is_world(meta: dict, cfg: WorldConfig) -> bool:
    """Whether ``world_meta``'s record is the world ``cfg`` in this format version."""
    return meta.get("config") == recorded_config(cfg) and meta.get("format_version") == FORMAT_VERSION


def ensure_world(out_dir: str | Path, cfg: WorldConfig, replace: bool = True, workers: Optional[int] = None) -> Path:
    """``out_dir`` holding the world ``cfg``: reused when its ``world.json`` records the same config
    (and format version), exported otherwise (``workers``: as ``export_world``). Returns ``Path(out_dir)``.

    ``replace=False`` (``vlm train``, whose ``data.world_dir`` may be anyone's export) refuses to
    overwrite a complete world made with other settings: a ``VlmError`` naming the keys that differ.
    """
    out = Path(out_dir)
    meta = world_meta(out)
    if is_world(meta, cfg):
        return out
    if not replace and isinstance(meta.get("config"), dict) and meta.get("format_version") == FORMAT_VERSION:
        raise VlmError(f"{out} holds a world made with other settings ({config_difference(meta['config'], cfg)}); "
                       f"not overwriting it: give the recipe that world's settings, or another data.world_dir")
    export_world(out, cfg, progress=True, workers=workers)
    return out


def config_difference(have: dict, cfg: WorldConfig) -> str:
    """'world.n_eval: 300 there, 500 here; ...': the keys whose values in a recorded config ``have``
    differ from ``cfg``'s (at most 4 named)."""
    want = recorded_config(cfg)
    keys = [k for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]
    parts = [f"world.{k}: {have.get(k)} there, {want.get(k)} here" for k in keys[:4]]
    return "; ".join(parts) + (f"; and {len(keys) - 4} more" if len(keys) > 4 else "")
