"""Stage one end to end on tiny img2dataset-style shards: configs, batches, training, export, resume."""
from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPVisionModel

from encoders.dual_encoder import tokenize_texts
from encoders.registry import captions_for
from encoders.stage1_model import Stage1Model
from training import stage1
from training.data import ShardBatches
from vlm.cli import main
from encoders.config import Stage1Config
from vlm.config import load_config, save_config
from vlm.data.shards import ShardStream

ROOT = Path(__file__).resolve().parents[2]
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (230, 220, 30)}
SHAPES = ("square", "bar", "dot", "frame")


def _image(color: str, shape: str, size: int = 32) -> Image.Image:
    img = np.full((size, size, 3), 128, dtype=np.uint8)
    c = COLORS[color]
    if shape == "square":
        img[8:24, 8:24] = c
    elif shape == "bar":
        img[12:20, 2:30] = c
    elif shape == "dot":
        img[13:19, 13:19] = c
    else:
        img[4:28, 4:28] = c
        img[8:24, 8:24] = 128
    return Image.fromarray(img)


def write_shards(directory: Path, n_shards: int = 2, per_shard: int = 32) -> str:
    """img2dataset layout (KEY.jpg, KEY.txt, KEY.json); returns a brace pattern of the shards."""
    directory.mkdir(parents=True, exist_ok=True)
    combos = [(c, s) for c in COLORS for s in SHAPES]
    for shard in range(n_shards):
        with tarfile.open(directory / f"{shard:05d}.tar", "w") as tar:
            for i in range(per_shard):
                index = shard * per_shard + i
                color, shape = combos[index % len(combos)]
                buf = io.BytesIO()
                _image(color, shape).save(buf, format="JPEG", quality=95)
                caption = f"a {color} {shape}."
                meta = {"key": f"{index:09d}",
                        "long_caption": f"There is a {color} {shape}. The {shape} is {color}. "
                                        f"The background is grey. It is picture {index % 5}."}
                for ext, data in (("jpg", buf.getvalue()), ("txt", caption.encode()),
                                  ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{index:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(directory / f"{{00000..{n_shards - 1:05d}}}.tar")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("shards"))


def tiny_cfg(shards: str, out_dir: Path, objective: str = "clip", steps: int = 6, **optim) -> Stage1Config:
    sparc = objective == "sparc"
    overrides = [
        *([f"data.shards={shards}"] if shards else []), "data.shuffle_buffer=16", "data.max_text_len=24",
        "model.vision.image_size=32", "model.vision.patch_size=8", "model.vision.hidden_size=32",
        "model.vision.num_layers=2", "model.vision.num_heads=2", "model.vision.mlp_ratio=2",
        "model.text.vocab_size=300", "model.text.hidden_size=32", "model.text.num_layers=2",
        "model.text.num_heads=2", "model.text.max_len=32", "model.embed_dim=32",
        f"model.pool={'mean' if sparc else 'cls'}", f"model.global_mlp={sparc}", f"model.local_heads={sparc}",
        f"objective.name={objective}",
        *(["objective.num_subcaptions=2", "objective.num_heads=2"] if objective == "flair" else []),
        f"optim.max_steps={steps}", "optim.warmup_steps=2", "optim.batch_size=8", "optim.lr=2e-3",
        f"run.out_dir={out_dir}", "run.device=cpu", "run.log_every=1", "run.ckpt_every=3",
        "run.progress=false", "run.tensorboard=false",
    ] + [f"optim.{k}={v}" for k, v in optim.items()]
    return load_config(Stage1Config, None, overrides)


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "stage1").glob("*.yaml")), ids=lambda p: p.name)
def test_every_stage1_config_loads(path):
    cfg = load_config(Stage1Config, path)
    name = path.name.split("_")[0]
    assert cfg.objective.name == name
    # SPARC pools without CLS and has the non-linear global layer; local embeddings share the global
    # linear heads (the paper); the others pool with CLS.
    # The *_resnet_tiny recipes (the demo's) max-pool their conv tower's patch grid (model.pool: max).
    conv = path.stem.endswith("_resnet_tiny")
    expected = (("max" if conv else "mean", True, False) if name == "sparc" else
                ("max" if conv else "cls", False, False))
    assert (cfg.model.pool, cfg.model.global_mlp, cfg.model.local_heads) == expected


def test_all_tiny_recipes_exist():
    for name in ("clip", "siglip", "sparc", "flair"):
        assert (ROOT / "configs" / "stage1" / f"{name}_tiny.yaml").is_file()


def test_resolve_shards_errors(tmp_path):
    cfg = load_config(Stage1Config, None, [f"data.shards={tmp_path}/{{0..1}}.tar"])
    with pytest.raises(FileNotFoundError, match="2 of 2 shards missing"):
        stage1.resolve_shards(cfg)


@pytest.mark.parametrize("objective,workers", [("clip", 0), ("flair", 0), ("clip", 2)])
def test_batches_are_deterministic_and_start_anywhere(shards, tmp_path, objective, workers):
    cfg = tiny_cfg(shards, tmp_path / "run", objective)
    cfg.data.num_workers = workers
    urls = stage1.resolve_shards(cfg)
    tokenizer = stage1.build_tokenizer(cfg, urls, resuming=False)
    model = stage1.build_model(cfg, tokenizer)
    make = stage1.stage1_batches(urls, cfg, tokenizer, model.encoder.transform, 24)
    it = iter(make(0))
    first = [next(it) for _ in range(11)]  # 64 samples / 8 = 8 per epoch: crosses into epoch two
    it = iter(make(5))
    later = [next(it) for _ in range(6)]
    for a, b in zip(first[5:], later):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    b0 = first[0]
    # FLAIR: input_ids are the K = 2 sub-captions of each image (the caption is not encoded)
    assert b0["pixel_values"].shape == (8, 3, 32, 32) and b0["input_ids"].shape[0] == (16 if objective == "flair" else 8)
    assert b0["attention_mask"].shape == b0["input_ids"].shape
    # Epoch two is shuffled differently from epoch one.
    assert not torch.equal(first[0]["pixel_values"], first[8]["pixel_values"])
    assert "sub_input_ids" not in b0
    # The tokenizer appends </s>: CLIP-style pooling reads the last real token, which is EOS.
    last = b0["attention_mask"].sum(1) - 1
    assert bool((b0["input_ids"][torch.arange(len(last)), last] == tokenizer.eos_token_id).all())


def test_tiny_run_lowers_loss_and_exports_stock_tower(shards, tmp_path):
    cfg = tiny_cfg(shards, tmp_path / "run", "sparc", steps=30)
    final = stage1.run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert len(losses) == 30 and np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").is_file()
    stock = CLIPVisionModel.from_pretrained(final / "vision").eval()
    model = Stage1Model.from_pretrained(final).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(stock(pixel_values=x).last_hidden_state,
                                   model.encoder.vision(pixel_values=x).last_hidden_state)
    assert model.objective.cfg.name == "sparc"


def test_interrupted_and_resumed_run_equals_uninterrupted(shards, tmp_path, monkeypatch):
    ref_final = stage1.run(tiny_cfg(shards, tmp_path / "ref", "flair", steps=6))
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
        stage1.run(tiny_cfg(shards, tmp_path / "cut", "flair", steps=6))
    monkeypatch.setattr(ShardBatches, "__call__", original)
    torch.manual_seed(99)  # the resumed run must not depend on the global RNG
    cfg = tiny_cfg(shards, tmp_path / "cut", "flair", steps=6)
    cfg.run.resume = True
    final = stage1.run(cfg)
    ref, got = Stage1Model.from_pretrained(ref_final), Stage1Model.from_pretrained(final)
    for (name, a), (_, b) in zip(ref.state_dict().items(), got.state_dict().items()):
        assert torch.equal(a, b), name


def test_composed_batches_equal_a_direct_computation(shards, tmp_path):
    """ShardSamples + stage1_collate give the batches of the stream read by hand: epoch 0 shuffled
    with seed * 1_000_003, consecutive samples, FLAIR captions drawn per position. Updated: FLAIR's
    input_ids are now only the sub-captions [B*K, L] (it used to also encode the caption, which no
    loss reads, and send the sub-captions as sub_input_ids)."""
    cfg = tiny_cfg(shards, tmp_path / "run", "flair")
    urls = stage1.resolve_shards(cfg)
    tokenizer = stage1.build_tokenizer(cfg, urls, resuming=False)
    transform = stage1.build_model(cfg, tokenizer).encoder.transform
    got = [b for _, b in zip(range(2), stage1.stage1_batches(urls, cfg, tokenizer, transform, 24)(0))]
    stream = ShardStream(urls, shuffle_buffer=16, seed=cfg.run.seed * 1_000_003, rank=0, world_size=1)
    samples = [s for _, s in zip(range(16), stream)]
    for b, batch in enumerate(got):
        texts = [captions_for(cfg.objective, s["text"], s["json"].get("long_caption"),
                              random.Random(f"{cfg.run.seed}:0:0:{b * 8 + i}"))
                 for i, s in enumerate(samples[b * 8:(b + 1) * 8])]
        pixels = torch.stack([transform(s["image"]) for s in samples[b * 8:(b + 1) * 8]])
        assert all(len(t) == 3 for t in texts)  # [caption, sub_1, sub_2]
        ids, mask = tokenize_texts(tokenizer, [c for t in texts for c in t[1:]], 24)
        assert torch.equal(batch["pixel_values"], pixels) and torch.equal(batch["input_ids"], ids)
        assert torch.equal(batch["attention_mask"], mask) and ids.shape[0] == 16
        assert set(batch) == {"pixel_values", "input_ids", "attention_mask"}


def test_missing_world_is_a_clear_error(tmp_path):
    """The library reads the world but never makes it: a one-line error says how to."""
    cfg = tiny_cfg("", tmp_path / "run", "clip")
    cfg.data.world_dir = str(tmp_path / "world")
    with pytest.raises(FileNotFoundError, match=r"no train shards in .*world.*vlm world --out .*data\.shards"):
        stage1.resolve_shards(cfg)
    with pytest.raises(FileNotFoundError, match="vlm world"):
        stage1.run(cfg)
    assert not (tmp_path / "world").exists()


def test_vlm_train_makes_the_world_and_trains_on_it(tmp_path):
    """No data.shards: `vlm train stage1` exports the world first; its texts train the tokenizer."""
    cfg = tiny_cfg("", tmp_path / "run", "flair", steps=2)
    cfg.data.world_dir = str(tmp_path / "world")
    cfg.world.n_train, cfg.world.n_eval, cfg.world.image_size = 40, 4, 32
    save_config(cfg, tmp_path / "stage1.yaml")
    assert main(["train", "stage1", "--config", str(tmp_path / "stage1.yaml")]) == 0
    assert (tmp_path / "world" / "world.json").is_file()
    model = Stage1Model.from_pretrained(tmp_path / "run" / "final")
    assert model.objective.cfg.name == "flair"
    ids, _ = model.encoder.tokenize(["a red circle."])
    assert bool((ids != model.encoder.tokenizer.unk_token_id).all())
