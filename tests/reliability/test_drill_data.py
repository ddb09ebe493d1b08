"""Fault drill, inputs: bad images (by header, before decoding), damaged data files, missing paths,
pickled weights, a foreign or damaged world dir. Each is a clean error naming the file (and line),
or, for stage two's records, skipped and counted."""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import assert_clean_error
from eval.io import load_image
from training.stage2 import usable_records
from vlm.config import WorldConfig
from vlm.data.formats import (FormatError, LlavaRecord, read_coco_captions, read_llava, read_pope, read_refcoco,
                              read_vsr)
from vlm.files import ImageError, VlmError, check_image
from vlm.world.export import MARKER, ensure_world, export_world


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` (no pixel data: only the header is ever read)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
                     + struct.pack(">I", zlib.crc32(chunk)) + end)
    return path


def _good(path: Path) -> Path:
    Image.fromarray(np.full((16, 16, 3), 90, dtype=np.uint8)).save(path)
    return path


def _truncated_jpeg(path: Path) -> Path:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path.with_suffix(".tmp.jpg"))
    data = path.with_suffix(".tmp.jpg").read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path


IMAGE_FAULTS = {  # name -> (make the file, what the message says)
    "oversize-11000": (lambda p: _png_header(p, 11000, 11000), "121,000,000 pixels"),
    "decompression-bomb": (lambda p: _png_header(p, 30000, 30000), "image"),
    "truncated-jpeg": (_truncated_jpeg, "image"),
    "not-an-image": (lambda p: p.write_bytes(b"<html>404</html>") and p, "cannot read image"),
    "zero-bytes": (lambda p: p.write_bytes(b"") or p, "cannot read image"),
    "a-directory": (lambda p: p.mkdir() or p, "not found"),
    "missing": (lambda p: p, "not found"),
}


@pytest.mark.parametrize("fault", list(IMAGE_FAULTS))
def test_bad_image_in_eval_is_an_error_naming_the_file(tmp_path, fault):
    make, says = IMAGE_FAULTS[fault]
    path = tmp_path / "img.jpg"
    make(path)
    with pytest.raises(ImageError, match=says) as e:
        load_image(path)
    assert str(path) in str(e.value) and isinstance(e.value, VlmError)


@pytest.mark.parametrize("fault", list(IMAGE_FAULTS))
def test_bad_image_in_stage_two_is_skipped_and_counted(tmp_path, fault):
    make, says = IMAGE_FAULTS[fault]
    (tmp_path / "images").mkdir()
    records = [LlavaRecord(id=str(i), image=f"images/{i}.jpg", conversations=[("human", "<image>"), ("gpt", "x")])
               for i in range(4)]
    for i in (0, 1, 3):
        _good(tmp_path / "images" / f"{i}.jpg")
    make(tmp_path / "images" / "2.jpg")
    kept, skipped = usable_records(records, tmp_path, max_pixels=4096 * 4096)
    if fault == "truncated-jpeg":  # the header reads: caught when decoded, naming the file (LlavaExamples)
        assert len(kept) == 4
        return
    assert [r.id for r in kept] == ["0", "1", "3"] and len(skipped) == 1
    assert "record '2'" in skipped[0] and "2.jpg" in skipped[0]


def test_image_size_guard_is_configurable(tmp_path):
    path = _png_header(tmp_path / "big.png", 3000, 3000)
    assert check_image(path, max_pixels=9_000_000) == (3000, 3000)
    with pytest.raises(ImageError, match="max_image_pixels"):
        check_image(path, max_pixels=8_999_999)


def test_stage_two_with_no_usable_image_is_a_clean_error(run_cli, tmp_path):
    data = tmp_path / "train.json"
    data.write_text(json.dumps([{"id": "a", "image": "nope.jpg", "conversations": [
        {"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "ok"}]}]))
    rc, err = run_cli("train", "stage2", "--config", "configs/stage2/projector_tiny.yaml", f"data.json={data}",
                      f"run.out_dir={tmp_path / 'run'}", "model.vision_tower=oracle", "model.oracle_world=x")
    assert_clean_error(rc, err)


# ------------------------------------------------------------------------------------------------
# Damaged data files: FormatError naming file (and line)
# ------------------------------------------------------------------------------------------------

LLAVA = [{"id": "a", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nhi"},
                                                          {"from": "gpt", "value": "ok"}]}]
POPE_LINE = json.dumps({"question_id": 1, "image": "a.jpg", "text": "Is there a dog?", "label": "yes"})
VSR_LINE = json.dumps({"image": "a.jpg", "caption": "the dog is left of the cat", "label": 1, "relation": "left of"})

DATA_FAULTS = {  # name -> (file name, content, reader, what the message names)
    "llava-truncated": ("train.json", json.dumps(LLAVA)[:40], read_llava, "train.json"),
    "llava-not-a-list": ("train.json", json.dumps({"a": 1}), read_llava, "train.json"),
    "llava-empty": ("train.json", "", read_llava, "train.json"),
    "llava-binary": ("train.json", "\udcff\x00", read_llava, "train.json"),
    "pope-torn-line": ("random.jsonl", POPE_LINE + "\n" + POPE_LINE[:20] + "\n" + POPE_LINE + "\n", read_pope,
                       "random.jsonl:2"),
    "pope-not-object": ("random.jsonl", "[1, 2]\n", read_pope, "random.jsonl:1"),
    "vsr-torn-line": ("test.jsonl", VSR_LINE + "\n" + VSR_LINE[:10] + "\n", read_vsr, "test.jsonl:2"),
    "coco-truncated": ("captions.json", '{"images": [', read_coco_captions, "captions.json"),
    "coco-missing-key": ("captions.json", '{"images": []}', read_coco_captions, "annotations"),
}


@pytest.mark.parametrize("fault", list(DATA_FAULTS))
def test_damaged_data_file_names_file_and_line(tmp_path, fault):
    name, content, reader, names = DATA_FAULTS[fault]
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8", "surrogateescape"))
    with pytest.raises(FormatError, match=names.replace(".", r"\.")):
        reader(path)


def test_truncated_refcoco_names_the_file(tmp_path):
    (tmp_path / "refs.json").write_text('[{"ref_id": 1, "ann')
    (tmp_path / "instances.json").write_text('{"images": [], "annotations": [], "categories": []}')
    with pytest.raises(FormatError, match=r"refs\.json"):
        read_refcoco(tmp_path / "refs.json", tmp_path / "instances.json")


# ------------------------------------------------------------------------------------------------
# Missing paths on the command line
# ------------------------------------------------------------------------------------------------

MISSING = {  # name -> argv (MISSING_DIR stands for a path that does not exist)
    "eval-encoder-ckpt": ["eval", "encoder", "--ckpt", "MISSING_DIR", "--world-dir", "MISSING_DIR"],
    "eval-vlm-ckpt": ["eval", "vlm", "--ckpt", "MISSING_DIR", "--tasks", "pope"],
    "eval-drift-ckpt": ["eval", "drift", "--ckpt", "MISSING_DIR"],
    "eval-probe-llm": ["eval", "probe", "--llm", "MISSING_DIR", "--world-dir", "MISSING_DIR"],
    "merge-ckpt": ["merge", "--ckpt", "MISSING_DIR", "--out", "OUT"],
    "stage2-data-json": ["train", "stage2", "data.json=MISSING_DIR/train.json", "run.out_dir=OUT"],
    "stage1-shards": ["train", "stage1", "data.shards=MISSING_DIR/{0..1}.tar", "run.out_dir=OUT"],
    "maskembed-teacher": ["train", "maskembed", "--teacher", "MISSING_DIR", "data.shards=MISSING_DIR/{0..1}.tar",
                          "run.out_dir=OUT"],
    "lm-text-file": ["train", "lm", "data.text_files=[MISSING_DIR/t.txt]", "data.world_dir=OUT/world",
                     "world.n_train=4", "world.n_eval=2", "world.image_size=32", "run.out_dir=OUT"],
}


@pytest.mark.parametrize("case", list(MISSING))
def test_missing_path_is_one_line_naming_it(run_cli, tmp_path, case):
    argv = [a.replace("MISSING_DIR", str(tmp_path / "missing")).replace("OUT", str(tmp_path / "out"))
            for a in MISSING[case]]
    rc, err = run_cli(*argv)
    assert_clean_error(rc, err, tmp_path / "missing")


def test_pickled_only_weights_are_refused(run_cli, tmp_path):
    import torch
    from encoders.towers import load_vision_tower
    sys_tower = tmp_path / "tower"
    sys_tower.mkdir()
    (sys_tower / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    torch.save({}, sys_tower / "pytorch_model.bin")
    with pytest.raises(VlmError, match=str(sys_tower)):
        load_vision_tower(sys_tower)


def test_pickled_lora_adapter_is_refused(tmp_path):
    from vlm.model.llm import load_lora
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(VlmError, match="adapter_model.safetensors"):
        load_lora(None, tmp_path)


# ------------------------------------------------------------------------------------------------
# The world's output directory
# ------------------------------------------------------------------------------------------------

TINY = WorldConfig(n_train=4, n_eval=3, image_size=32, seed=1)


def test_world_refuses_a_foreign_non_empty_dir_and_deletes_nothing(run_cli, tmp_path):
    out = tmp_path / "mine"
    (out / "images").mkdir(parents=True)
    keep = {out / "notes.txt": "mine", out / "images" / "00000000.jpg": "a photo of mine"}
    for p, text in keep.items():
        p.write_text(text)
    rc, err = run_cli("world", "--out", out, "--n", "4", "--n-eval", "3", "--image-size", "32")
    assert_clean_error(rc, err, out, "not a world export")
    assert all(p.read_text() == text for p, text in keep.items())


def test_world_out_is_a_file(run_cli, tmp_path):
    (tmp_path / "f").write_text("x")
    rc, err = run_cli("world", "--out", tmp_path / "f", "--n", "4", "--n-eval", "3", "--image-size", "32")
    assert_clean_error(rc, err, tmp_path / "f")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "w"
    export_world(out, TINY, progress=False)
    return out


def test_world_of_another_config_is_replaced_but_foreign_files_stay(world, tmp_path):
    import shutil
    out = tmp_path / "w"
    shutil.copytree(world, out)
    (out / "images" / "my_photo.jpg").write_text("mine")
    (out / "images" / "12345678_mine.jpg").write_text("mine")
    (out / "README.txt").write_text("mine")
    other = WorldConfig(n_train=3, n_eval=3, image_size=32, seed=2)
    ensure_world(out, other)
    assert json.loads((out / "world.json").read_text())["config"]["seed"] == 2
    assert (out / "images" / "my_photo.jpg").read_text() == "mine" and (out / "README.txt").read_text() == "mine"
    assert not (out / "images" / "00000006.jpg").exists()  # the old export's own extra image is gone


@pytest.mark.parametrize("damage", ["truncated", "deleted-marker-kept"])
def test_damaged_or_interrupted_world_is_exported_again(world, tmp_path, damage):
    import shutil
    out = tmp_path / "w"
    shutil.copytree(world, out)
    if damage == "truncated":
        (out / "world.json").write_text('{"config": {')
    else:
        (out / "world.json").unlink()
        assert (out / MARKER).is_file()
    ensure_world(out, TINY)
    assert json.loads((out / "world.json").read_text())["config"]["seed"] == 1


def test_merge_writes_out_whole_and_refuses_a_non_empty_out(run_cli, tmp_path):
    from tiny_vlm import save_tiny_llm, save_tiny_tower, vlm_config
    from vlm.model.vision_language_model import VisionLanguageModel
    cfg = vlm_config(save_tiny_tower(tmp_path / "tower"), save_tiny_llm(tmp_path / "llm"), "projector")
    VisionLanguageModel.build(cfg, max_len=64).save_pretrained(tmp_path / "ckpt")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("mine")
    rc, err = run_cli("merge", "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "taken")
    assert_clean_error(rc, err, tmp_path / "taken")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["mine.txt"]
    rc, err = run_cli("merge", "--ckpt", tmp_path / "ckpt", "--out", tmp_path / "merged")
    assert rc == 0, err
    assert (tmp_path / "merged" / "llm" / "config.json").is_file() and (tmp_path / "merged" / "vlm.yaml").is_file()
    assert not list(tmp_path.glob(".merged.tmp-*"))
