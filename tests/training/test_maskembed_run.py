"""MaskEmbed recipe end to end on tiny shards: batches, training through the shared loop, export, resume."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPVisionModel

from encoders.maskembed import sample_patch_masks
from encoders.towers import build_vision_tower, default_transform, load_vision_tower, patch_tokens
from training import maskembed
from training.data import ShardBatches
from vlm.config import MaskEmbedRunConfig, VisionTowerConfig, load_config
from vlm.data.shards import ShardStream

ROOT = Path(__file__).resolve().parents[2]


def write_shards(directory: Path, n_shards: int = 2, per_shard: int = 16) -> str:
    """img2dataset layout (KEY.jpg, KEY.txt, KEY.json) of 16x16 images: a coloured square on grey."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for shard in range(n_shards):
        with tarfile.open(directory / f"{shard:05d}.tar", "w") as tar:
            for i in range(per_shard):
                index = shard * per_shard + i
                img = np.full((16, 16, 3), 128, dtype=np.uint8)
                y, x = rng.integers(0, 10, size=2)
                img[y:y + 6, x:x + 6] = rng.integers(0, 256, size=3)
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="JPEG", quality=95)
                for ext, data in (("jpg", buf.getvalue()), ("txt", b"a square."),
                                  ("json", json.dumps({"key": f"{index:09d}"}).encode())):
                    info = tarfile.TarInfo(f"{index:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(directory / f"{{00000..{n_shards - 1:05d}}}.tar")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp("maskembed")
    shards = write_shards(root / "shards")
    torch.manual_seed(0)
    teacher = build_vision_tower(VisionTowerConfig(image_size=16, patch_size=4, hidden_size=16, num_layers=2,
                                                   num_heads=2, mlp_ratio=2))
    teacher.save_pretrained(str(root / "teacher"))
    default_transform(teacher).save_pretrained(root / "teacher")
    return shards, root / "teacher"


def tiny_cfg(setup, out_dir: Path, steps: int = 6) -> MaskEmbedRunConfig:
    shards, teacher = setup
    return load_config(MaskEmbedRunConfig, None, [
        f"maskembed.teacher={teacher}", "maskembed.decoder_heads=2", f"data.shards={shards}",
        "data.shuffle_buffer=8", f"optim.max_steps={steps}", "optim.warmup_steps=1", "optim.batch_size=4",
        "optim.lr=3e-3", f"run.out_dir={out_dir}", "run.device=cpu", "run.log_every=1", "run.ckpt_every=3",
        "run.progress=false", "run.tensorboard=false"])


def test_tiny_config_loads():
    cfg = load_config(MaskEmbedRunConfig, ROOT / "configs" / "posttrain" / "maskembed_tiny.yaml")
    assert cfg.maskembed.teacher == "runs/stage1/sparc/final" and cfg.maskembed.decoder_layers == 2


def test_batches_are_deterministic_and_start_anywhere(setup, tmp_path):
    cfg = tiny_cfg(setup, tmp_path / "run")
    model, transform = maskembed.build_model(cfg)
    urls = maskembed.resolve_shards(cfg)
    make = maskembed.maskembed_batches(urls, cfg, transform, model.num_patches)
    it = iter(make(0))
    first = [next(it) for _ in range(10)]  # 32 samples / 4 = 8 per epoch: crosses into epoch two
    it = iter(make(6))
    for a, b in zip(first[6:], [next(it) for _ in range(4)]):
        assert set(a) == {"pixel_values", "patch_mask"}
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["patch_mask"], b["patch_mask"])
    assert first[0]["pixel_values"].shape == (4, 3, 16, 16)
    assert first[0]["patch_mask"].shape == (4, 16) and first[0]["patch_mask"].dtype == torch.bool
    assert not torch.equal(first[0]["patch_mask"], first[1]["patch_mask"])


def test_composed_batches_equal_a_direct_computation(setup, tmp_path):
    """ShardSamples + maskembed_collate give the batches of the stream read by hand: epoch 0 shuffled
    with seed * 1_000_003, consecutive images, masks seeded by (seed, rank, worker, first position)."""
    cfg = tiny_cfg(setup, tmp_path / "run")
    model, transform = maskembed.build_model(cfg)
    urls = maskembed.resolve_shards(cfg)
    got = [b for _, b in zip(range(2), maskembed.maskembed_batches(urls, cfg, transform, model.num_patches)(0))]
    stream = ShardStream(urls, shuffle_buffer=8, seed=cfg.run.seed * 1_000_003, rank=0, world_size=1)
    samples = [s for _, s in zip(range(8), stream)]
    for b, batch in enumerate(got):
        pixels = torch.stack([transform(s["image"]) for s in samples[b * 4:(b + 1) * 4]])
        key = ((cfg.run.seed * 1_000_003 + 0) * 1_000_003 + 0) * 1_000_003 + b * 4
        masks = sample_patch_masks(4, model.num_patches, torch.Generator().manual_seed(key % 2 ** 63))
        assert torch.equal(batch["pixel_values"], pixels) and torch.equal(batch["patch_mask"], masks)


def test_missing_world_is_a_clear_error(setup, tmp_path):
    cfg = tiny_cfg(setup, tmp_path / "run")
    cfg.data.shards, cfg.data.world_dir = "", str(tmp_path / "world")
    with pytest.raises(FileNotFoundError, match="vlm world --out"):
        maskembed.run(cfg)


def test_missing_teacher_is_a_clear_error(setup, tmp_path):
    cfg = tiny_cfg(setup, tmp_path / "run")
    cfg.maskembed.teacher = ""
    with pytest.raises(ValueError, match="maskembed.teacher"):
        maskembed.run(cfg)


def test_tiny_run_lowers_loss_and_exports_stock_tower(setup, tmp_path):
    cfg = tiny_cfg(setup, tmp_path / "run", steps=25)
    final = maskembed.run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert len(losses) == 25 and np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    # Checkpoints hold only trainable tensors: the student, its head and the decoder, no teacher.
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))
    keys = load_file(str(ckpts[-1] / "model.safetensors")).keys()
    assert any(k.startswith("student.") for k in keys) and any(k.startswith("decoder.") for k in keys)
    assert not any(k.startswith("teacher.") for k in keys)
    stock = CLIPVisionModel.from_pretrained(str(final)).eval()
    tower, transform = load_vision_tower(final)
    teacher, _ = load_vision_tower(setup[1])
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(patch_tokens(stock, x), patch_tokens(tower, x))
        assert not torch.allclose(patch_tokens(tower, x), patch_tokens(teacher, x))  # the student moved
    assert transform.image_size == 16


def test_interrupted_and_resumed_run_equals_uninterrupted(setup, tmp_path, monkeypatch):
    ref_final = maskembed.run(tiny_cfg(setup, tmp_path / "ref", steps=6))
    original = ShardBatches.__call__

    class Interrupt(Exception):
        pass

    def failing(self, start=0):
        for i, batch in enumerate(original(self, start)):
            if start + i == 4:  # in step 5, after the step-3 checkpoint
                raise Interrupt
            yield batch

    monkeypatch.setattr(ShardBatches, "__call__", failing)
    with pytest.raises(Interrupt):
        maskembed.run(tiny_cfg(setup, tmp_path / "cut", steps=6))
    monkeypatch.setattr(ShardBatches, "__call__", original)
    torch.manual_seed(99)  # the resumed run must not depend on the global RNG
    cfg = tiny_cfg(setup, tmp_path / "cut", steps=6)
    cfg.run.resume = True
    final = maskembed.run(cfg)
    ref, got = CLIPVisionModel.from_pretrained(str(ref_final)), CLIPVisionModel.from_pretrained(str(final))
    for (name, a), (_, b) in zip(ref.state_dict().items(), got.state_dict().items()):
        assert torch.equal(a, b), name


def test_calibration_reads_the_first_calibration_batches(setup, tmp_path, monkeypatch):
    """Reference scripts/train.py get_baseline_loss (a pass of data -> population std): ``run`` hands
    ``calibrate`` the single-process stream and it reads exactly maskembed.calibration_batches
    micro-batches, the first ones of the data order."""
    cfg = tiny_cfg(setup, tmp_path / "run")
    cfg.maskembed.calibration_batches = 3
    seen, original = [], maskembed.MaskEmbedModel.calibrate

    class Stop(Exception):
        pass

    def recording(self, batches):
        def tap():
            for batch in batches:
                seen.append(batch)
                yield batch
        original(self, tap())
        raise Stop

    monkeypatch.setattr(maskembed.MaskEmbedModel, "calibrate", recording)
    with pytest.raises(Stop):
        maskembed.run(cfg)
    model, transform = maskembed.build_model(cfg)
    expected = maskembed.maskembed_batches(maskembed.resolve_shards(cfg), cfg, transform, model.num_patches)(0)
    assert len(seen) == 3
    for got in seen:
        assert torch.equal(got, next(expected)["pixel_values"])
