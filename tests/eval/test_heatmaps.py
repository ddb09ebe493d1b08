"""Alignment heatmaps: a valid PNG whose drawn weights are sparc_alignment_weights'."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from encoders.dual_encoder import DualEncoder
from encoders.objectives.sparc import sparc_alignment_weights
from eval.heatmaps import alignment_heatmaps
from vlm.config import EncoderConfig, TextTowerConfig, VisionTowerConfig
from vlm.data.tokenizer import train_bpe_tokenizer

CORPUS = ["a small red circle left of a large blue square.", "two green triangles.",
          "a yellow star above a purple circle."] * 20


@functools.lru_cache(maxsize=None)
def make_encoder(local_heads: bool) -> DualEncoder:
    tok = train_bpe_tokenizer(CORPUS, vocab_size=300, add_eos=True)
    torch.manual_seed(0)
    cfg = EncoderConfig(vision=VisionTowerConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=1,
                                                 num_heads=2, mlp_ratio=2),
                        text=TextTowerConfig(hidden_size=32, num_layers=1, num_heads=2, max_len=24),
                        embed_dim=16, pool="cls", global_mlp=False, local_heads=local_heads)
    return DualEncoder(cfg, tok).eval()


@pytest.fixture
def encoder():
    return make_encoder(True)


@pytest.mark.parametrize("local_heads", [True, False], ids=["local_heads", "shared_heads"])
def test_writes_png_with_the_functions_weights(local_heads, tmp_path):
    encoder = make_encoder(local_heads)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8) for _ in range(2)]
    captions = ["a red circle.", "two green triangles above a star."]
    out = tmp_path / "sub" / "heat.png"
    rows = alignment_heatmaps(encoder, images, captions, out, threshold=0.3, max_tokens=64)
    with Image.open(out) as im:
        im.verify()
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    # Reference: the encoder's features straight into sparc_alignment_weights.
    ids, mask = encoder.tokenize(captions)
    with torch.no_grad():
        img = encoder.encode_image(encoder.transform.batch(images))
        txt = encoder.encode_text(ids, mask)
    ref = sparc_alignment_weights(img.patch_emb, txt.token_emb, txt.token_mask, threshold=0.3)
    for i, row in enumerate(rows):
        words = txt.token_mask[i].nonzero().squeeze(1)
        assert len(row.tokens) == len(words) == row.weights.shape[0]
        np.testing.assert_allclose(row.weights, ref[i, words].view(-1, 4, 4).double().numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(row.weights.sum(axis=(1, 2)), 1.0, rtol=1e-5)
        assert "".join(row.tokens).replace("\u2423", "") == captions[i].replace(" ", "")


def test_default_threshold_and_token_cap(encoder, tmp_path):
    images = [Image.new("RGB", (40, 48), (200, 10, 10))]  # resized and cropped by the transform
    rows = alignment_heatmaps(encoder, images, ["a small red circle left of a large blue square."],
                              tmp_path / "h.png", max_tokens=3)
    assert len(rows[0].tokens) == 3 and rows[0].weights.shape == (3, 4, 4)
    assert (tmp_path / "h.png").stat().st_size > 0


def test_bad_input(encoder, tmp_path):
    with pytest.raises(ValueError, match="captions"):
        alignment_heatmaps(encoder, [np.zeros((32, 32, 3), np.uint8)], ["a", "b"], tmp_path / "x.png")

