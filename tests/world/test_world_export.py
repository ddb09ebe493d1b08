"""Export a tiny world and read every file back with the real-format readers."""
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from vlm.data import prompts
from vlm.config import WorldConfig
from vlm.data.formats import (read_coco_captions, read_coco_instances, read_llava, read_pope, read_refcoco,
                              read_vsr)
from vlm.data.pope import build_pope
from vlm.data.shards import ShardStream
from vlm.files import VlmError
from vlm.world.export import ensure_world, export_world, llava_records, shard_caption
from vlm.world.generator import generate_sample
from vlm.world.vocab import SHAPES

CFG = WorldConfig(n_train=40, n_eval=12, seed=3)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    counts = export_world(out, CFG, progress=False, samples_per_shard=16)
    samples = {i: generate_sample(i, CFG.seed, CFG) for i in range(CFG.n_train + CFG.n_eval)}
    return out, counts, samples


def test_layout_and_counts(world):
    out, counts, samples = world
    meta = json.loads((out / "world.json").read_text())
    assert meta["config"]["n_train"] == 40 and meta["counts"] == counts
    assert counts["train"] == 40 and counts["eval"] == 12 and counts["shards"] == 3
    assert len(list((out / "images").glob("*.jpg"))) == 52 and len(list((out / "masks").glob("*.png"))) == 12
    assert (out / "contact_sheet.png").is_file()
    img = np.asarray(Image.open(out / "images" / "00000005.jpg"))
    assert img.shape == (64, 64, 3) and np.abs(img.astype(int) - samples[5].image).mean() < 6  # JPEG q95


def test_masks(world):
    out, _, samples = world
    for i in range(40, 52):
        np.testing.assert_array_equal(np.asarray(Image.open(out / "masks" / f"{i:08d}.png")), samples[i].class_mask)


def test_coco_captions_and_instances(world):
    out, counts, samples = world
    for split, idx in (("train", range(40)), ("val", range(40, 52))):
        caps = read_coco_captions(out / "coco" / f"captions_{split}.json")
        assert set(caps.images) == set(idx)
        for i in idx:
            assert caps.images[i] == f"{i:08d}.jpg"
            assert caps.captions[i] == [samples[i].captions[k] for k in ("short", "detailed", "counting")]
    inst = read_coco_instances(out / "coco" / "instances_val.json")
    assert inst.categories == {c + 1: s for c, s in enumerate(SHAPES)}
    got = sorted((a["image_id"], tuple(a["bbox"]), inst.categories[a["category_id"]]) for a in inst.annotations.values())
    want = sorted((i, (o.box[0], o.box[1], o.box[2] - o.box[0], o.box[3] - o.box[1]), o.shape)
                  for i in range(40, 52) for o in samples[i].objects)
    assert got == want and len(got) == counts["objects_eval"]


def test_llava(world):
    out, counts, samples = world
    recs = read_llava(out / "llava" / "train.json")
    assert len(recs) == counts["llava_conversations"] == 80
    for r in recs:
        index, c = map(int, r.id.split("-"))
        assert r.image == f"{index:08d}.jpg" and index < 40
    assert recs == llava_records([samples[i] for i in range(40)], CFG)  # pixels play no part
    kinds = " ".join(t for r in recs for _, t in r.conversations)
    for p in (prompts.POPE_SUFFIX, "true or false", "bounding box", prompts.COUNT_PROMPT):
        assert p in kinds


def test_pope(world):
    out, _, samples = world
    expected = build_pope({f"{i:08d}.jpg": {o.shape for o in samples[i].objects} for i in range(40, 52)},
                          seed=CFG.seed, vocabulary=SHAPES)
    for split in ("random", "popular", "adversarial"):
        qs = read_pope(out / "pope" / f"{split}.jsonl")
        assert qs == expected[split] and qs
        for q in qs:
            index = int(q.image[:8])
            shape = q.text.split()[-4]
            assert (shape in {o.shape for o in samples[index].objects}) == (q.label == "yes")


def test_refcoco(world):
    out, counts, samples = world
    refs = read_refcoco(out / "refcoco" / "refs.json", out / "refcoco" / "instances.json")
    assert len(refs) == counts["refs"] == counts["objects_eval"]
    assert {r.split for r in refs} == {"val", "testA", "testB"}
    for r in refs:
        s = samples[r.image_id]
        k = s.referring.index(r.sentences[0])
        x1, y1, x2, y2 = s.objects[k].box
        assert r.bbox_xywh == (x1, y1, x2 - x1, y2 - y1) and r.file_name == f"{r.image_id:08d}.jpg"
        assert (r.width, r.height) == (64, 64) and r.image_id >= 40


def test_vsr(world):
    out, counts, samples = world
    for split, idx in (("train", range(40)), ("test", range(40, 52))):
        items = read_vsr(out / "vsr" / f"{split}.jsonl")
        want = [(f"{i:08d}.jpg", st.text, int(st.label), st.relation) for i in idx for st in samples[i].statements]
        assert [(v.image, v.caption, v.label, v.relation) for v in items] == want
        assert len(items) == counts[f"vsr_{split}"] and {v.label for v in items} == {0, 1}


def test_shards_round_trip(world):
    out, _, samples = world
    stream = ShardStream(str(out / "shards" / "train-*.tar"), shuffle_buffer=0)
    got = list(stream)
    assert stream.stats["skipped"] == 0 and sorted(g["key"] for g in got) == [f"{i:08d}" for i in range(40)]
    for g in got:
        s = samples[int(g["key"])]
        assert g["text"] == shard_caption(s) == g["json"]["caption"]
        assert g["json"]["status"] == "success" and g["json"]["width"] == 64 and g["json"]["key"] == g["key"]
        assert g["json"]["long_caption"] == s.long_caption
        assert [tuple(b) for b in g["json"]["boxes"]] == [o.box for o in s.objects]
        jpg = (out / "images" / f"{g['key']}.jpg").read_bytes()
        np.testing.assert_array_equal(np.asarray(g["image"]), np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB")))


def test_ensure_world_reuses_and_reexports(tmp_path):
    cfg = WorldConfig(n_train=6, n_eval=3)
    ensure_world(tmp_path, cfg)
    stamp = (tmp_path / "world.json").stat().st_mtime_ns
    assert ensure_world(tmp_path, cfg) == tmp_path and (tmp_path / "world.json").stat().st_mtime_ns == stamp
    cfg2 = WorldConfig(n_train=4, n_eval=3, seed=1)
    ensure_world(tmp_path, cfg2)
    assert json.loads((tmp_path / "world.json").read_text())["config"]["seed"] == 1
    assert len(list((tmp_path / "images").glob("*.jpg"))) == 7  # stale images of the old world removed


def test_ensure_world_without_replace_never_overwrites_another_world(tmp_path):
    """`vlm train` points at anyone's export: a world of other settings is an error naming the
    differing keys, and its files stay as they were."""
    cfg = WorldConfig(n_train=6, n_eval=3)
    ensure_world(tmp_path, cfg, replace=False)  # nothing there yet: exported
    stamp = (tmp_path / "world.json").stat().st_mtime_ns
    with pytest.raises(VlmError, match=r"world.n_eval: 3 there, 4 here.*world.seed: 0 there, 1 here"):
        ensure_world(tmp_path, WorldConfig(n_train=6, n_eval=4, seed=1), replace=False)
    assert (tmp_path / "world.json").stat().st_mtime_ns == stamp
    assert len(list((tmp_path / "images").glob("*.jpg"))) == 9
    assert ensure_world(tmp_path, cfg, replace=False) == tmp_path


def test_parallel_rendering_writes_the_same_files(world, tmp_path, monkeypatch):
    out, _, _ = world
    monkeypatch.setattr("vlm.world.export.PARALLEL_MIN_SAMPLES", 0)
    export_world(tmp_path, CFG, progress=False, samples_per_shard=16, workers=2)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for rel in files:
        assert _content(out / rel) == _content(tmp_path / rel), rel


def _content(path):
    """A file's bytes; a tar's (name, bytes) members (its headers hold the write time)."""
    if path.suffix != ".tar":
        return path.read_bytes()
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def test_ensure_world_passes_its_render_workers_on(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr("vlm.world.export.export_world", lambda out, cfg, progress, workers: seen.append(workers))
    ensure_world(tmp_path / "w", CFG, workers=1)
    assert seen == [1]
