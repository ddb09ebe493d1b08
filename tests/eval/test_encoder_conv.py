"""The encoder eval on a ConvNeXt DualEncoder: its patch grid (stride 8, while ConvNeXt's own
``config.patch_size`` is the stem's 4) drives segmentation, pointing and the heatmaps."""
from __future__ import annotations

import json

import pytest
import torch

from eval import encoder as enc_eval


@pytest.fixture(scope="module")
def world():
    from vlm.config import WorldConfig

    return WorldConfig(image_size=32, n_train=16, n_eval=8, seed=3)


@pytest.fixture(scope="module")
def conv_dual_dir(tmp_path_factory, world):
    from encoders.dual_encoder import DualEncoder
    from vlm.config import EncoderConfig, TextTowerConfig, VisionTowerConfig
    from vlm.data.tokenizer import train_bpe_tokenizer
    from vlm.world.generator import generate_sample
    from vlm.world.vocab import CLASS_NAMES

    corpus = [t for i in range(16) for t in generate_sample(i, world.seed, world).captions.values()]
    corpus += [f"a photo of a {n}." for n in CLASS_NAMES]
    tok = train_bpe_tokenizer(corpus * 3, vocab_size=300, add_eos=True)
    torch.manual_seed(0)
    cfg = EncoderConfig(vision=VisionTowerConfig(arch="convnext", image_size=32, patch_size=8, stage_widths=[16, 32],
                                                 stage_depths=[1, 1]),
                        text=TextTowerConfig(hidden_size=32, num_layers=1, num_heads=2, max_len=48),
                        embed_dim=16, pool="map", global_mlp=True, local_heads=False)
    out = tmp_path_factory.mktemp("enc") / "dual"
    DualEncoder(cfg, tok).save_pretrained(out)
    return out


def test_conv_dual_encoder_eval_end_to_end_and_text_from(conv_dual_dir, world, tmp_path):
    from encoders.towers import load_vision_tower

    a = enc_eval.run(conv_dual_dir, tmp_path / "de", world, probe_steps=5, limit=6, probe_images=8, progress=False)
    assert a["mode"] == "dual_encoder" and a["heatmaps"] == "heatmaps.png"
    for group, name in (("segmentation", "zero_shot_miou"), ("segmentation", "probe_miou"), ("multilabel", "f1"),
                        ("zero_shot", "top1")):
        assert 0.0 <= a[group][name] <= 1.0, name
    assert len((tmp_path / "de" / "predictions.jsonl").read_text().splitlines()) == 6
    assert json.loads((tmp_path / "de" / "summary.json").read_text()) == a
    tower, transform = load_vision_tower(conv_dual_dir)
    tower.save_pretrained(str(tmp_path / "tower"))
    transform.save_pretrained(tmp_path / "tower")
    b = enc_eval.run(tmp_path / "tower", tmp_path / "tf", world, probe_steps=5, limit=6, probe_images=8,
                     text_from=conv_dual_dir, progress=False)
    assert b["mode"] == "text_from"
    for group, name in (("segmentation", "zero_shot_miou"), ("segmentation", "probe_miou"), ("zero_shot", "top1")):
        assert b[group][name] == pytest.approx(a[group][name]), name
