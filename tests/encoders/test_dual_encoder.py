"""DualEncoder: features, pooling, masks, checkpoints that stock transformers loads, Stage1Model."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import CLIPVisionModel, SiglipVisionModel

from encoders.dual_encoder import DualEncoder
from encoders.registry import objective_config_class
from encoders.stage1_model import Stage1Model
from vlm.config import ConfigError, EncoderConfig, TextTowerConfig, VisionTowerConfig
from vlm.data.tokenizer import train_bpe_tokenizer

CORPUS = ["a small red circle left of a large blue square.", "two green triangles.",
          "a yellow star above a purple circle.", "the large square is below the small star."] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(CORPUS, vocab_size=300, add_eos=True)


def small_config(arch="clip", **kw) -> EncoderConfig:
    return EncoderConfig(vision=VisionTowerConfig(arch=arch, image_size=32, patch_size=8, hidden_size=32,
                                                  num_layers=1, num_heads=2, mlp_ratio=2),
                         text=TextTowerConfig(hidden_size=24, num_layers=1, num_heads=2, max_len=16),
                         embed_dim=16, **kw)


def make_encoder(tokenizer, arch="clip", **kw) -> DualEncoder:
    torch.manual_seed(0)
    choices = {"pool": "cls", "global_mlp": False, "local_heads": False, **kw}
    return DualEncoder(small_config(arch, **choices), tokenizer).eval()


def test_encoder_needs_the_objective_dependent_choices(tokenizer):
    with pytest.raises(ConfigError, match="model.pool, model.global_mlp"):
        DualEncoder(small_config(local_heads=False), tokenizer)


def test_saved_encoder_yaml_holds_the_resolved_choices(tmp_path, tokenizer):
    enc = make_encoder(tokenizer, pool="mean", global_mlp=True, local_heads=False)
    enc.save_pretrained(tmp_path / "enc")
    again = DualEncoder.from_pretrained(tmp_path / "enc")
    assert (again.cfg.pool, again.cfg.global_mlp, again.cfg.local_heads) == ("mean", True, False)
    assert again.cfg == enc.cfg


@pytest.mark.parametrize("arch,pool,mlp,local", [("clip", "cls", False, False), ("clip", "mean", True, True),
                                                 ("clip", "mean", True, False), ("siglip", "cls", False, False)])
def test_feature_shapes_and_pooling(tokenizer, arch, pool, mlp, local):
    enc = make_encoder(tokenizer, arch, pool=pool, global_mlp=mlp, local_heads=local)
    x = torch.randn(3, 3, 32, 32)
    ids, mask = enc.tokenize(["a red circle.", "two green triangles above a star.", "star"])
    with torch.no_grad():
        img, txt = enc.encode_image(x), enc.encode_text(ids, mask)
        hidden = enc.text(input_ids=ids, attention_mask=mask).last_hidden_state
    assert img.global_emb.shape == (3, 16) and img.patch_emb.shape == (3, 16, 16)
    assert img.patch_tokens.shape == (3, 16, 32)
    assert txt.global_emb.shape == (3, 16) and txt.token_emb.shape == (3, ids.shape[1], 16)
    assert txt.token_mask.dtype == torch.bool
    # Global text pooling, checked row by row against the definition.
    for b in range(3):
        n = int(mask[b].sum())
        pooled = hidden[b, :n].mean(0) if pool == "mean" else hidden[b, n - 1]
        torch.testing.assert_close(txt.global_emb[b], enc.heads["text_global"](pooled))
    if pool == "mean":
        torch.testing.assert_close(img.global_emb, enc.heads["image_global"](img.patch_tokens.mean(1)))
    if local:
        torch.testing.assert_close(img.patch_emb, enc.heads["image_local"](img.patch_tokens))
        torch.testing.assert_close(txt.token_emb, enc.heads["text_local"](hidden))
    else:
        # Shared heads (SPARC's paper): v_ik = g_v(f_v(x_ik)) with g_v the global path's final Linear,
        # never the global_mlp layer h_v; t_ij = g_t(f_t(x_ij)). (Before this fix the patches went
        # through the whole image_global head, h_v included.)
        g_v = enc.heads["image_global"][-1]
        assert isinstance(g_v, torch.nn.Linear) and enc.image_local_head is g_v
        torch.testing.assert_close(img.patch_emb, g_v(img.patch_tokens))
        torch.testing.assert_close(txt.token_emb, enc.heads["text_global"](hidden))
        if mlp:
            with torch.no_grad():
                through_mlp = enc.heads["image_global"](img.patch_tokens)
            assert not torch.allclose(img.patch_emb, through_mlp)
            # the global embedding still is g_v(h_v(mean pool))
            torch.testing.assert_close(img.global_emb, g_v(enc.heads["image_global"][:-1](img.patch_tokens.mean(1))))


def test_token_mask_excludes_padding_and_specials(tokenizer):
    enc = make_encoder(tokenizer)
    ids, mask = enc.tokenize(["a red circle.", "star"])
    assert ids[0, 0] == tokenizer.bos_token_id and (ids == tokenizer.eos_token_id).sum() == 2
    assert mask[1].sum() < mask[0].sum() and ids[1, -1] == tokenizer.pad_token_id  # right padding
    with torch.no_grad():
        txt = enc.encode_text(ids, mask)
    specials = set(tokenizer.all_special_ids)
    for b in range(2):
        for j in range(ids.shape[1]):
            expected = bool(mask[b, j]) and int(ids[b, j]) not in specials
            assert bool(txt.token_mask[b, j]) == expected
    assert txt.token_mask.sum(1).min() >= 1


def test_bad_inputs(tokenizer):
    enc = make_encoder(tokenizer)
    with pytest.raises(TypeError):
        enc.tokenize("not a list")
    with pytest.raises(ValueError, match="no tokens"):
        enc.encode_text(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B,L\]"):
        enc.encode_text(torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.long))
    ids, _ = enc.tokenize(["a " * 50])
    assert ids.shape[1] == 16  # truncated at text.max_len


@pytest.mark.parametrize("arch,stock", [("clip", CLIPVisionModel), ("siglip", SiglipVisionModel)])
def test_save_load_round_trip_and_stock_vision(tmp_path, tokenizer, arch, stock):
    enc = make_encoder(tokenizer, arch, pool="mean", global_mlp=True, local_heads=True)
    enc.save_pretrained(tmp_path / "ckpt")
    for name in ("vision/config.json", "vision/preprocessor_config.json", "text/config.json",
                 "tokenizer/tokenizer.json", "heads.safetensors", "encoder.yaml"):
        assert (tmp_path / "ckpt" / name).is_file(), name
    again = DualEncoder.from_pretrained(tmp_path / "ckpt").eval()
    assert again.cfg == enc.cfg and again.transform.image_size == 32
    x = torch.randn(2, 3, 32, 32)
    ids, mask = enc.tokenize(["a red circle.", "two stars"])
    ids2, mask2 = again.tokenize(["a red circle.", "two stars"])
    assert torch.equal(ids, ids2) and torch.equal(mask, mask2)
    with torch.no_grad():
        a, b = enc.encode_image(x), again.encode_image(x)
        ta, tb = enc.encode_text(ids, mask), again.encode_text(ids, mask)
        stock_out = stock.from_pretrained(tmp_path / "ckpt" / "vision").eval()(pixel_values=x)
        ours_out = enc.vision(pixel_values=x)
    for f in ("global_emb", "patch_emb", "patch_tokens"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f))
    for f in ("global_emb", "token_emb"):
        torch.testing.assert_close(getattr(ta, f), getattr(tb, f))
    assert torch.equal(ta.token_mask, tb.token_mask)
    torch.testing.assert_close(stock_out.last_hidden_state, ours_out.last_hidden_state)


@pytest.mark.parametrize("name,local", [("clip", False), ("siglip", False), ("sparc", False), ("sparc", True),
                                        ("flair", False)])
def test_stage1_model_forward_backward_and_save(tmp_path, tokenizer, name, local):
    enc = make_encoder(tokenizer, pool="mean" if name == "sparc" else "cls", global_mlp=name == "sparc",
                       local_heads=local)
    ocfg = objective_config_class(name)(**({"num_subcaptions": 2, "num_heads": 2} if name == "flair" else {}))
    model = Stage1Model.build(enc, ocfg).train()
    ids, mask = enc.tokenize(["a red circle.", "two green stars.", "a blue square"])
    batch = {"pixel_values": torch.randn(3, 3, 32, 32), "input_ids": ids, "attention_mask": mask}
    if name == "flair":
        sub_ids, sub_mask = enc.tokenize(["a red circle.", "red", "two", "green stars.", "blue", "square"])
        batch["sub_input_ids"], batch["sub_attention_mask"] = sub_ids.view(3, 2, -1), sub_mask.view(3, 2, -1)
    out = model(batch)
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == [], unused  # every head is used: DDP needs no unused-parameter search
    assert not model.ddp_find_unused_parameters
    model.save_pretrained(tmp_path / name)
    again = Stage1Model.from_pretrained(tmp_path / name)
    assert again.encoder.cfg.local_heads == local
    for (k, v), (k2, v2) in zip(model.objective.state_dict().items(), again.objective.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    with pytest.raises(KeyError, match="pixel_values"):
        model({"input_ids": ids, "attention_mask": mask})


@pytest.mark.parametrize("name", ["clip", "siglip", "sparc", "flair"])
def test_stage1_model_after_optimizer_step_clamps_the_logit_scale(tokenizer, name):
    """Every objective's learned scale is clamped in place to [0, ln max_logit_scale] by the
    post-step hook (the training loop calls it after optimizer.step()), never inside forward."""
    enc = make_encoder(tokenizer, pool="mean" if name == "sparc" else "cls", global_mlp=name == "sparc")
    ocfg = objective_config_class(name)(**({"num_subcaptions": 2, "num_heads": 2} if name == "flair" else {}))
    model = Stage1Model.build(enc, ocfg)
    log_scale = model.objective.logit_scale.log_scale
    with torch.no_grad():
        log_scale.fill_(math.log(10 * ocfg.max_logit_scale))
    assert model.objective.logit_scale().item() == pytest.approx(10 * ocfg.max_logit_scale, rel=1e-5)
    model.after_optimizer_step()
    assert log_scale.item() == pytest.approx(math.log(ocfg.max_logit_scale))
    with torch.no_grad():
        log_scale.fill_(-1.0)
    model.after_optimizer_step()
    assert log_scale.item() == 0.0
