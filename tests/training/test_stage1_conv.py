"""Stage one with a convolutional tower: a short SPARC run on a ResNet exports a stock ResNetModel."""
from __future__ import annotations

import json

import numpy as np
import torch
from transformers import ResNetModel

from test_stage1 import tiny_cfg, write_shards
from encoders.stage1_model import Stage1Model
from encoders.towers import patch_tokens
from training import stage1
from encoders.config import Stage1Config
from vlm.config import load_config, save_config


def test_two_step_sparc_run_on_a_resnet_tower(tmp_path):
    """arch=resnet (32 px, stride 8: a 4x4 grid), pool max: two optimizer steps, finite losses,
    the final checkpoint's tower loads with stock ``ResNetModel`` and gives the same patch grid."""
    shards = write_shards(tmp_path / "shards", n_shards=1, per_shard=16)
    save_config(tiny_cfg(shards, tmp_path / "run", "sparc", steps=2), tmp_path / "tiny.yaml")
    cfg = load_config(Stage1Config, tmp_path / "tiny.yaml", ["model.vision.arch=resnet", "model.pool=max",
                                                             "model.vision.stage_widths=[16,32]",
                                                             "model.vision.stage_depths=[1,1]"])
    final = stage1.run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and np.isfinite([r["loss"] for r in rows]).all()
    model = Stage1Model.from_pretrained(final).eval()
    assert model.encoder.cfg.pool == "max" and model.encoder.cfg.vision.arch == "resnet"
    stock = ResNetModel.from_pretrained(str(final / "vision")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(patch_tokens(stock, x), patch_tokens(model.encoder.vision, x))
        assert model.encoder.encode_image(x).patch_emb.shape == (2, 16, 32)
