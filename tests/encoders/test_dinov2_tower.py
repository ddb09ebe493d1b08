"""DINOv2 as a tower (one registry entry): stage one's DualEncoder trains and saves a stock
``Dinov2Model``; its stage-two features follow HF LLaVA's hidden_states indexing; MaskEmbed refuses it."""
from __future__ import annotations

import pytest
import torch
from transformers import Dinov2Model

from encoders.dual_encoder import DualEncoder
from encoders.maskembed import final_tokens
from encoders.towers import (IMAGENET_MEAN, build_vision_tower, default_transform, load_vision_tower, num_feature_tokens,
                             patch_tokens, unused_feature_parameters, vision_features)
from vlm.config import EncoderConfig, TextTowerConfig, VisionTowerConfig
from vlm.data.tokenizer import train_bpe_tokenizer

VISION = VisionTowerConfig(arch="dinov2", image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2,
                           mlp_ratio=2)


def test_dinov2_features():
    torch.manual_seed(0)
    tower = build_vision_tower(VISION).eval()
    assert isinstance(tower, Dinov2Model) and default_transform(tower).mean == IMAGENET_MEAN
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hidden = tower(pixel_values=x, output_hidden_states=True).hidden_states
        assert len(hidden) == 3  # embeddings + 2 blocks, as HF LLaVA indexes them
        torch.testing.assert_close(vision_features(tower, x, -2, "default"), hidden[-2][:, 1:])
        assert vision_features(tower, x, -1, "full").shape == (2, 17, 32) and num_feature_tokens(tower, "full") == 17
        torch.testing.assert_close(vision_features(tower, x, None, "default"), patch_tokens(tower, x))
    unused = {id(p) for p in unused_feature_parameters(tower, -2)}
    assert {id(p) for p in tower.encoder.layer[1].parameters()} <= unused
    with pytest.raises(ValueError, match="DINOv2"):
        final_tokens(tower, x)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_dinov2_stage_one_trains_and_saves_stock(tmp_path, pool):
    torch.manual_seed(0)
    tokenizer = train_bpe_tokenizer(["a red circle.", "a blue square left of a star."] * 20, vocab_size=300,
                                    add_eos=True)
    cfg = EncoderConfig(vision=VISION, text=TextTowerConfig(hidden_size=24, num_layers=1, num_heads=2, max_len=16),
                        embed_dim=16, pool=pool, global_mlp=False, local_heads=False)
    enc = DualEncoder(cfg, tokenizer)
    img = enc.encode_image(torch.randn(2, 3, 32, 32))
    txt = enc.encode_texts(["a red circle.", "a blue square."])
    assert img.patch_emb.shape == (2, 16, 16) and img.global_emb.shape == (2, 16)
    (img.global_emb * txt.global_emb).sum().backward()
    assert enc.vision.embeddings.patch_embeddings.projection.weight.grad is not None
    enc.save_pretrained(tmp_path / "ckpt")
    stock = Dinov2Model.from_pretrained(tmp_path / "ckpt" / "vision")
    loaded, transform = load_vision_tower(tmp_path / "ckpt")
    assert isinstance(loaded, Dinov2Model) and transform.image_size == 32
    for a, b in zip(stock.state_dict().values(), enc.vision.state_dict().values()):
        assert torch.equal(a, b)
