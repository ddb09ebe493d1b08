"""Stage two recipe: configs load, batches are deterministic and resumable, a short run lowers the loss."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vlm"))
from tiny_vlm import save_tiny_llm, save_tiny_tower, vlm_config  # noqa: E402

from training.data import ResumableBatches  # noqa: E402
from training.stage2 import LlavaExamples, resolve_data, run  # noqa: E402
from vlm.config import (LlavaDataConfig, OptimConfig, RunConfig, Stage2Config, WorldConfig,  # noqa: E402
                        load_config)
from vlm.data.formats import LlavaRecord, read_llava, write_llava  # noqa: E402
from vlm.model.vision_language_model import VisionLanguageModel  # noqa: E402
from vlm.world.export import ensure_world  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "stage2"
COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


@pytest.mark.parametrize("name", ["projector_tiny", "flamingo_tiny", "projector_qwen05b", "flamingo_qwen05b"])
def test_configs_load(name):
    cfg = load_config(Stage2Config, CONFIGS / f"{name}.yaml")
    assert cfg.model.bridge.name == name.split("_")[0]
    if name.endswith("qwen05b"):
        assert cfg.model.llm_dtype == "bf16" and cfg.data.json and cfg.run.device == "cuda"


def write_dataset(root: Path, n: int = 8) -> Path:
    """n solid-colour images and LLaVA conversations about them (one two-turn record)."""
    (root / "images").mkdir(parents=True)
    records = []
    names = list(COLORS)
    for i in range(n):
        color = names[i % len(names)]
        Image.fromarray(np.full((40, 40, 3), COLORS[color], dtype=np.uint8)).save(root / "images" / f"{i:03d}.png")
        conv = [("human", "<image>\nDescribe the image briefly."), ("gpt", f"a {color} square.")]
        if i == 0:
            conv += [("human", "Is there a red circle?"), ("gpt", "No")]
        records.append(LlavaRecord(id=str(i), image=f"images/{i:03d}.png", conversations=conv))
    records.append(LlavaRecord(id="text-only", image=None, conversations=[("human", "Hi"), ("gpt", "Hello")]))
    write_llava(root / "train.json", records)
    return root / "train.json"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2")
    return {"llm": save_tiny_llm(root / "llm", initializer_range=0.3), "tower": save_tiny_tower(root / "tower"),
            "json": write_dataset(root / "data")}


def tiny_cfg(assets, out_dir: Path, bridge: str, max_steps: int = 30) -> Stage2Config:
    return Stage2Config(
        model=vlm_config(assets["tower"], assets["llm"], bridge),
        data=LlavaDataConfig(json=str(assets["json"]), max_len=64),
        optim=OptimConfig(lr=1e-2, weight_decay=0.0, warmup_steps=3, max_steps=max_steps, batch_size=4),
        run=RunConfig(out_dir=str(out_dir), log_every=5, ckpt_every=max_steps, progress=False, tensorboard=False,
                      device="cpu"),
    )


def test_batches_are_deterministic_and_resumable(assets):
    model = VisionLanguageModel.build(vlm_config(assets["tower"], assets["llm"], "projector"), max_len=64)
    records = [r for r in read_llava(assets["json"]) if r.image is not None]
    examples = LlavaExamples(records, assets["json"].parent, model.processor)
    serial = ResumableBatches(len(records), 3, examples.make_batch, seed=1)
    first = [b for _, b in zip(range(5), serial(0))]
    resumed = [b for _, b in zip(range(2), serial(3))]
    parallel = ResumableBatches(len(records), 3, examples.make_batch, seed=1, num_workers=2)
    workers = [b for _, b in zip(range(5), parallel(0))]
    for a, b in zip(first[3:], resumed):
        assert all(torch.equal(a[k], b[k]) for k in a)
    for a, b in zip(first, workers):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert first[0]["pixel_values"].shape == (3, 3, 32, 32)
    with pytest.raises(FileNotFoundError, match="image_root"):
        LlavaExamples(records, assets["json"].parent / "elsewhere", model.processor)


def test_world_llava_data_resolves_and_batches(assets, tmp_path):
    cfg = Stage2Config(model=vlm_config(assets["tower"], assets["llm"], "projector"),
                       data=LlavaDataConfig(world_dir=str(tmp_path / "world"), max_len=128),
                       world=WorldConfig(image_size=32, n_train=4, n_eval=2))
    with pytest.raises(FileNotFoundError, match=r"no LLaVA conversations in .*vlm world --out .*data\.json"):
        resolve_data(cfg)  # the library reads the world, never makes it
    ensure_world(tmp_path / "world", cfg.world)  # what `vlm train stage2` does first
    json_path, image_root = resolve_data(cfg)
    assert json_path == tmp_path / "world" / "llava" / "train.json"
    records = read_llava(json_path)
    model = VisionLanguageModel.build(cfg.model, max_len=cfg.data.max_len)
    batch = LlavaExamples(records, image_root, model.processor).make_batch([0, 1])
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert ((batch["input_ids"] == model.image_token_id).sum(1) == model.tower.num_patches).all()
    assert ((batch["labels"] != -100).sum(1) > 0).all()
    with pytest.raises(FileNotFoundError, match="data.json"):
        resolve_data(Stage2Config(data=LlavaDataConfig(json=str(tmp_path / "missing.json"))))
    other = Stage2Config(data=cfg.data, world=WorldConfig(image_size=32, n_train=5, n_eval=2))
    with pytest.raises(FileNotFoundError, match="another config"):
        resolve_data(other)


@pytest.mark.parametrize("bridge", ["projector", "flamingo", "flamingo-patches"])
def test_short_run_lowers_loss_and_exports(assets, tmp_path, bridge):
    """flamingo-patches: no resampler (``bridge.resampler_layers: 0``, the world's Flamingo recipe)."""
    torch.set_num_threads(1)
    cfg = tiny_cfg(assets, tmp_path / "run", bridge.split("-")[0])
    if bridge == "flamingo-patches":
        cfg.model.bridge.resampler_layers = 0
    final = run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 30 and rows[-1]["loss"] < rows[0]["loss"] - 1.0
    assert rows[-1]["tokens_per_s"] > 0
    model = VisionLanguageModel.from_pretrained(final)
    if bridge == "flamingo-patches":
        assert model.bridge.resampler.latents is None and model.bridge.num_latents == model.tower.num_tokens
    image = Image.open(assets["json"].parent / "images" / "002.png")
    answer = model.generate([image], ["Describe the image briefly."], max_new_tokens=8)[0]
    assert isinstance(answer, str)
