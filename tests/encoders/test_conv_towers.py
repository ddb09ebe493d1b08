"""Convolutional towers (ResNet, ConvNeXt) and the pooling choices: stock round trips, the patch
grid, stage-two features, DualEncoder pools (cls / mean / max / map), MaskEmbed on a conv tower."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import ConvNextModel, ResNetModel

from encoders.config import Stage1Config
from encoders.dual_encoder import DualEncoder
from encoders.maskembed import MaskEmbedModel, drop_last_blocks, num_prefix_tokens
from encoders.towers import (ImageTransform, build_vision_tower, feature_layer_index, final_norm, grid_tokens,
                             load_vision_tower, num_feature_tokens, num_patches, patch_tokens, tower_forward,
                             tower_image_size, tower_patch_size, tower_width, unused_feature_parameters,
                             vision_features)
from vlm.config import (ConfigError, EncoderConfig, MaskEmbedConfig, TextTowerConfig, VisionTowerConfig,
                        load_config)
from vlm.data.tokenizer import train_bpe_tokenizer

STOCK = {"resnet": ResNetModel, "convnext": ConvNextModel}
CORPUS = ["a small red circle left of a large blue square.", "two green triangles.",
          "a yellow star above a purple circle."] * 20


def conv_config(arch: str, depths=(1, 2)) -> VisionTowerConfig:
    """A 64-px conv tower: stem stride 4 (16x16), a second stage at stride 8 (the 8x8 patch grid)."""
    return VisionTowerConfig(arch=arch, image_size=64, patch_size=8, stage_widths=[16, 32], stage_depths=list(depths))


def conv_tower(arch: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_vision_tower(conv_config(arch, **kw)).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(CORPUS, vocab_size=300, add_eos=True)


@pytest.mark.parametrize("arch", ["resnet", "convnext"])
def test_stock_round_trip(tmp_path, arch):
    tower = conv_tower(arch)
    tower.save_pretrained(str(tmp_path))
    ImageTransform(64).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == arch
    processor = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert processor["image_processor_type"].startswith("CLIPImageProcessor")
    stock = STOCK[arch].from_pretrained(str(tmp_path)).eval()
    loaded, transform = load_vision_tower(tmp_path)
    assert type(loaded) is STOCK[arch] and transform.image_size == 64
    assert (tower_image_size(loaded), tower_patch_size(loaded), tower_width(loaded)) == (64, 8, 32)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = tower(pixel_values=x).last_hidden_state
        torch.testing.assert_close(stock(pixel_values=x).last_hidden_state, ref)
        torch.testing.assert_close(patch_tokens(loaded.eval(), x), patch_tokens(tower, x))


@pytest.mark.parametrize("arch", ["resnet", "convnext"])
def test_patch_grid_is_the_last_stage_row_major_after_the_final_norm(arch):
    tower = conv_tower(arch)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        patches, pooled = tower_forward(tower, x)
        fmap = tower(pixel_values=x).last_hidden_state                       # [B,C,8,8]
        norm = final_norm(tower)
        assert patches.shape == (3, 64, 32) and num_patches(tower) == 64 and pooled.shape == (3, 32)
        for k in (0, 5, 63):  # token k is grid cell (k // 8, k % 8)
            torch.testing.assert_close(patches[:, k], norm(fmap[:, :, k // 8, k % 8]))
    with pytest.raises(ValueError, match="8x8 patch grid"):
        tower_forward(tower, torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="8x8 patch grid"):
        grid_tokens(tower, fmap[:, :, :4])


@pytest.mark.parametrize("arch", ["resnet", "convnext"])
def test_stage_two_features(arch):
    tower = conv_tower(arch)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        last = tower(pixel_values=x, output_hidden_states=True).hidden_states[-1]
        for strategy in ("default", "full"):  # no CLS: both keep every patch
            assert num_feature_tokens(tower, strategy) == 64
            torch.testing.assert_close(vision_features(tower, x, -1, strategy), last.flatten(2).transpose(1, 2))
            torch.testing.assert_close(vision_features(tower, x, None, strategy), patch_tokens(tower, x))
    assert feature_layer_index(tower, -1) == 2
    with pytest.raises(ValueError, match="16x16 feature map .* not its 8x8 patch grid"):
        vision_features(tower, x, -2)
    with pytest.raises(ValueError, match="out of range"):
        feature_layer_index(tower, -4)
    # -1 never uses the final norm (ConvNeXt's layernorm; ResNet has none); None uses everything.
    norm_params = {id(p) for p in final_norm(tower).parameters()}
    assert {id(p) for p in unused_feature_parameters(tower, -1)} == norm_params
    assert unused_feature_parameters(tower, None) == []


def test_single_stage_tower_accepts_the_stem_as_a_feature_layer():
    """With one stage the stem's output already has the patch grid, so -2 is a valid layer."""
    torch.manual_seed(0)
    tower = build_vision_tower(VisionTowerConfig(arch="resnet", image_size=32, patch_size=4, stage_widths=[16],
                                                 stage_depths=[1])).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert vision_features(tower, x, -2).shape == (1, 64, 16) and num_patches(tower) == 64
    stage = {id(p) for p in tower.encoder.stages[0].parameters()}
    assert {id(p) for p in unused_feature_parameters(tower, -2)} == stage


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="vision.patch_size: a resnet tower with 2 stage"):
        VisionTowerConfig(arch="resnet", image_size=64, patch_size=16, stage_widths=[16, 32], stage_depths=[1, 1])
    with pytest.raises(ConfigError, match="vision.stage_widths/stage_depths"):
        VisionTowerConfig(arch="convnext", stage_widths=[16, 32], stage_depths=[1])
    with pytest.raises(ConfigError, match="model.pool: 'cls' with vision.arch=resnet"):
        EncoderConfig(vision=conv_config("resnet"), pool="cls")
    # CLIP's paper default pool is cls: a conv tower has to choose another one explicitly.
    with pytest.raises(ConfigError, match="model.pool"):
        load_config(Stage1Config, None, ["objective.name=clip", "model.vision.arch=convnext"])
    cfg = load_config(Stage1Config, None, ["objective.name=clip", "model.vision.arch=convnext", "model.pool=map"])
    assert cfg.model.pool == "map"
    assert load_config(Stage1Config, None, ["model.vision.arch=resnet"]).model.pool == "mean"  # SPARC's default


def small_encoder(tokenizer, arch: str, pool: str, seed: int = 0) -> DualEncoder:
    vision = (conv_config(arch) if arch in STOCK else
              VisionTowerConfig(arch=arch, image_size=64, patch_size=8, hidden_size=32, num_layers=1, num_heads=2,
                                mlp_ratio=2))
    cfg = EncoderConfig(vision=vision, text=TextTowerConfig(hidden_size=24, num_layers=1, num_heads=2, max_len=16),
                        embed_dim=16, pool=pool, global_mlp=True, local_heads=False)
    torch.manual_seed(seed)
    return DualEncoder(cfg, tokenizer).eval()


@pytest.mark.parametrize("arch,pool", [("resnet", "mean"), ("resnet", "max"), ("resnet", "map"),
                                       ("convnext", "mean"), ("convnext", "max"), ("convnext", "map"),
                                       ("clip", "max"), ("clip", "map"), ("siglip", "map")])
def test_dual_encoder_pools_and_round_trip(tmp_path, tokenizer, arch, pool):
    enc = small_encoder(tokenizer, arch, pool)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        img = enc.encode_image(x)
        patches = img.patch_tokens
        pooled = {"mean": patches.mean(1), "max": patches.amax(1)}.get(pool)
        if pool == "map":
            pooled = enc.heads["image_pool"](patches)
        torch.testing.assert_close(img.global_emb, enc.heads["image_global"](pooled))
    width = tower_width(enc.vision)
    assert img.global_emb.shape == (3, 16) and img.patch_emb.shape == (3, 64, 16) and patches.shape == (3, 64, width)
    enc.save_pretrained(tmp_path / "enc")
    assert any(k.startswith("image_pool.") for k in load_file(str(tmp_path / "enc" / "heads.safetensors"))) == (
        pool == "map")
    again = DualEncoder.from_pretrained(tmp_path / "enc").eval()
    assert again.cfg == enc.cfg and type(again.vision) is type(enc.vision)
    with torch.no_grad():
        img2 = again.encode_image(x)
    for a, b in ((img.global_emb, img2.global_emb), (img.patch_emb, img2.patch_emb)):
        torch.testing.assert_close(a, b)


def test_dual_encoder_refuses_cls_on_a_conv_tower_and_bad_map_heads(tokenizer):
    tower = conv_tower("resnet")
    cfg = EncoderConfig(vision=VisionTowerConfig(), text=TextTowerConfig(hidden_size=24, num_layers=1, num_heads=2),
                        pool="cls", global_mlp=False, local_heads=False)
    with pytest.raises(ConfigError, match="model.pool: 'cls' with a ResNetModel"):
        DualEncoder(cfg, tokenizer, vision=tower)
    cfg.pool, cfg.map_heads = "map", 5
    with pytest.raises(ConfigError, match="model.map_heads"):
        DualEncoder(cfg, tokenizer, vision=tower)


def test_siglip_head_unused_under_other_pools_asks_ddp_to_skip_it(tokenizer):
    assert small_encoder(tokenizer, "siglip", "map").unused_tower_head
    assert not small_encoder(tokenizer, "siglip", "cls").unused_tower_head
    assert not small_encoder(tokenizer, "resnet", "max").unused_tower_head


@pytest.mark.parametrize("arch", ["resnet", "convnext"])
def test_maskembed_on_a_conv_tower(tmp_path, arch):
    teacher = conv_tower(arch)
    model = MaskEmbedModel(teacher, MaskEmbedConfig(decoder_layers=1, decoder_heads=2, calibration_batches=1),
                           ImageTransform(64))
    assert num_prefix_tokens(teacher) == 0 and model.num_patches == 64 and model.patch_size == 8
    assert len(model.teacher.encoder.stages[-1].layers) == 1 and len(model.student.encoder.stages[-1].layers) == 2
    x = torch.randn(2, 3, 64, 64)
    model.calibrate(x)
    out = model({"pixel_values": x})
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None for p in model.decoder.parameters())
    model.save_pretrained(tmp_path / "student")
    stock = STOCK[arch].from_pretrained(str(tmp_path / "student"))
    assert stock.config.depths == [1, 2]  # the student keeps every block
    loaded, _ = load_vision_tower(tmp_path / "student")
    assert num_patches(loaded) == 64
    with pytest.raises(ValueError, match="last stage of 1 blocks"):
        drop_last_blocks(conv_tower(arch, depths=(1, 1)), 1)


def test_vision_archs_equal_the_tower_builders():
    from encoders.towers import TOWER_BUILDERS
    from vlm.config import CONV_ARCHS, VISION_ARCHS

    assert set(VISION_ARCHS) == set(TOWER_BUILDERS) and set(CONV_ARCHS) == set(STOCK)
