"""Vision towers: stock transformers loads what we save, patch tokens, the image transform."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel, CLIPVisionModel, SiglipVisionModel

from encoders.towers import (ImageTransform, build_vision_tower, load_vision_tower, num_patches, patch_tokens,
                             tower_width)
from vlm.config import VisionTowerConfig

TINY = dict(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2, mlp_ratio=2)


@pytest.mark.parametrize("arch,stock", [("clip", CLIPVisionModel), ("siglip", SiglipVisionModel)])
def test_saved_tower_loads_with_stock_transformers(tmp_path, arch, stock):
    torch.manual_seed(0)
    tower = build_vision_tower(VisionTowerConfig(arch=arch, **TINY)).eval()
    tower.save_pretrained(tmp_path / "vision")
    ImageTransform(32).save_pretrained(tmp_path / "vision")
    x = torch.randn(2, 3, 32, 32)
    reloaded = stock.from_pretrained(tmp_path / "vision").eval()
    with torch.no_grad():
        a, b = tower(pixel_values=x), reloaded(pixel_values=x)
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state)
    ours, transform = load_vision_tower(tmp_path)  # the checkpoint dir: uses dir/vision
    assert isinstance(ours, stock) and transform.image_size == 32
    with torch.no_grad():
        torch.testing.assert_close(patch_tokens(ours, x), patch_tokens(tower, x))


@pytest.mark.parametrize("arch", ["clip", "siglip"])
def test_patch_tokens_shape_and_layernorm(arch):
    torch.manual_seed(0)
    tower = build_vision_tower(VisionTowerConfig(arch=arch, **TINY)).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        p = patch_tokens(tower, x)
        hidden = tower(pixel_values=x, output_hidden_states=True).last_hidden_state
    assert p.shape == (3, num_patches(tower), tower_width(tower)) == (3, 16, 32)
    if arch == "clip":  # CLS dropped, post_layernorm applied to the patch rows
        expected = getattr(tower, "vision_model", tower).post_layernorm(hidden[:, 1:])
    else:  # SigLIP: no CLS, already normalised
        expected = hidden
    torch.testing.assert_close(p, expected)
    # A LayerNorm output with default affine init has ~zero mean and unit variance per token.
    torch.testing.assert_close(p.mean(-1), torch.zeros(3, 16), atol=1e-5, rtol=0)


def test_patch_tokens_rejects_bad_shape():
    tower = build_vision_tower(VisionTowerConfig(**TINY))
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        patch_tokens(tower, torch.randn(3, 32, 32))


def test_load_full_clip_dir_and_bad_dirs(tmp_path):
    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=16)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)
    full = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16)).eval()
    full.save_pretrained(tmp_path / "full")
    tower, transform = load_vision_tower(tmp_path / "full")
    assert isinstance(tower, CLIPVisionModel) and transform.image_size == 32
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tower(pixel_values=x).pooler_output,
                                   full.vision_model(pixel_values=x).pooler_output)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_vision_tower(tmp_path / "missing")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="not a supported vision tower"):
        load_vision_tower(tmp_path / "bert")


@pytest.mark.parametrize("square", [False, True], ids=["clip-crop", "siglip-square"])
@pytest.mark.parametrize("hw", [(32, 32), (40, 57), (61, 33)])
def test_transform_equals_saved_clip_image_processor(tmp_path, hw, square):
    from transformers import AutoImageProcessor

    rng = np.random.default_rng(0)
    array = (rng.random((*hw, 3)) * 255).astype(np.uint8)
    transform = ImageTransform(24, mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7), resample=2 if square else 3,
                               square_resize=square)
    transform.save_pretrained(tmp_path)
    stock = AutoImageProcessor.from_pretrained(tmp_path)
    expected = stock(Image.fromarray(array), return_tensors="pt")["pixel_values"][0]
    ours = transform(array)
    assert ours.shape == (3, 24, 24) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected.float(), atol=1e-5, rtol=0)
    again = ImageTransform.from_pretrained(tmp_path)
    assert (again.image_size, again.mean, again.std, again.resample, again.square_resize) == (
        24, transform.mean, transform.std, transform.resample, square)
    torch.testing.assert_close(again(array), ours)


def test_transform_bad_input():
    t = ImageTransform(16)
    with pytest.raises(ValueError, match="uint8"):
        t(np.zeros((16, 16, 3), dtype=np.float32))
    with pytest.raises(TypeError):
        t("not an image")
    with pytest.raises(ValueError):
        ImageTransform(0)
    grey = Image.fromarray(np.full((20, 20), 128, dtype=np.uint8))
    assert t(grey).shape == (3, 16, 16)
