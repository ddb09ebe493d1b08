"""Which vision features the bridges get: HF LLaVA's ``vision_feature_layer`` / ``vision_feature_select_strategy``.

Reference: transformers ``models/llava/modeling_llava.py`` ``LlavaModel.get_image_features``
(``hidden_states[vision_feature_layer]``, then ``[:, 1:]`` for "default"), and
``LlavaForConditionalGeneration`` for the whole projector VLM.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import yaml
from transformers import LlavaConfig, LlavaForConditionalGeneration

from encoders.towers import build_vision_tower, num_feature_tokens, patch_tokens, vision_features
from tiny_vlm import perturb_trainable, random_images, save_tiny_tower, vlm_config
from vlm.config import ConfigError, LoraConfig, VisionTowerConfig, VLMConfig, config_from_yaml_text
from vlm.model.tower import VLMVisionTower
from vlm.model.vision_language_model import VisionLanguageModel

STRATEGIES = ["default", "full"]
PROMPT = "Is there a red circle?"


@pytest.fixture(scope="module")
def tiny_siglip_dir(tmp_path_factory):
    return save_tiny_tower(tmp_path_factory.mktemp("siglip"), arch="siglip")


def _tiny_tower(arch: str, num_layers: int = 3):
    torch.manual_seed(0)
    cfg = VisionTowerConfig(arch=arch, image_size=16, patch_size=8, hidden_size=16, num_layers=num_layers,
                            num_heads=2, mlp_ratio=2)
    return build_vision_tower(cfg).double().eval()


def _block_loop_reference(tower, pixels: torch.Tensor, blocks: int) -> torch.Tensor:
    """float64, one image at a time: CLIP embeddings -> pre_layrnorm -> the first ``blocks`` encoder
    layers, no final norm (what ``hidden_states[blocks]`` holds) -> [B,1+P,w]."""
    rows = []
    for b in range(pixels.shape[0]):
        h = tower.pre_layrnorm(tower.embeddings(pixels[b:b + 1]))
        for layer in tower.encoder.layers[:blocks]:
            h = layer(h, None)
            h = h[0] if isinstance(h, tuple) else h
        rows.append(h)
    return torch.cat(rows)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_clip_features_are_penultimate_hidden_states(strategy):
    """Follows transformers ``modeling_llava.LlavaModel.get_image_features``: ``hidden_states[-2]`` of
    the tower, before its final norm, ``[:, 1:]`` for "default" and ``[:, :]`` for "full"."""
    tower = _tiny_tower("clip", num_layers=3)
    pixels = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        got = VLMVisionTower(tower, transform=None, select_strategy=strategy)(pixels)
        hidden = tower(pixels, output_hidden_states=True).hidden_states[-2]
        loop = _block_loop_reference(tower, pixels, blocks=2)  # 3 blocks: -2 is block 2's output
    want = hidden[:, 1:] if strategy == "default" else hidden[:, :]
    assert got.shape == (3, 4 if strategy == "default" else 5, 16) == want.shape
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got, loop[:, 1:] if strategy == "default" else loop, rtol=1e-12, atol=1e-12)
    # Before the final norm: not what stage one's patch_tokens (post-norm, last layer) returns.
    assert not torch.allclose(got[:, -4:], patch_tokens(tower, pixels))


def test_siglip_default_drops_first_patch_as_hf():
    """Follows transformers ``modeling_llava.LlavaModel.get_image_features``: "default" is ``[:, 1:]``
    whatever the tower, so a SigLIP tower (no CLS) loses its first patch; "full" keeps all P."""
    tower = _tiny_tower("siglip")
    pixels = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        hidden = tower(pixels, output_hidden_states=True).hidden_states[-2]
        full = vision_features(tower, pixels, -2, "full")
        default = vision_features(tower, pixels, -2, "default")
    assert torch.equal(full, hidden) and full.shape[1] == 4 == num_feature_tokens(tower, "full")
    assert torch.equal(default, hidden[:, 1:]) and num_feature_tokens(tower, "default") == 3
    with pytest.warns(UserWarning, match="SigLIP"):
        VLMVisionTower(tower, transform=None, select_strategy="default")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        VLMVisionTower(tower, transform=None, select_strategy="full")


def test_layer_none_is_stage_one_patch_tokens():
    """Checkpoints saved before the option existed used ``encoders.towers.patch_tokens`` (last layer
    after the final norm, no CLS); ``vision_feature_layer=None`` reproduces it (CLIP "default",
    SigLIP "full")."""
    pixels = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    for arch, strategy in (("clip", "default"), ("siglip", "full")):
        tower = _tiny_tower(arch)
        with torch.no_grad():
            torch.testing.assert_close(vision_features(tower, pixels, None, strategy), patch_tokens(tower, pixels),
                                       rtol=1e-12, atol=1e-12)


def test_config_and_range_errors():
    """Config keys are validated as HF ``LlavaConfig`` does for ``vision_feature_select_strategy``
    (``configuration_llava.LlavaConfig``: "default" or "full")."""
    with pytest.raises(ConfigError, match="model.vision_feature_select_strategy"):
        VLMConfig(vision_feature_select_strategy="cls")
    with pytest.raises(ConfigError, match="vision_feature_select_strategy"):
        config_from_yaml_text(VLMConfig, "vision_feature_select_strategy: patch\n")
    assert VLMConfig().vision_feature_layer == -2 and VLMConfig().vision_feature_select_strategy == "default"
    tower = _tiny_tower("clip", num_layers=3)  # hidden_states: 4 entries, -4..3
    VLMVisionTower(tower, transform=None, feature_layer=-4)
    with pytest.raises(ValueError, match="vision_feature_layer=4"):
        VLMVisionTower(tower, transform=None, feature_layer=4)
    with pytest.raises(ValueError, match="vision_feature_layer=-5"):
        VLMVisionTower(tower, transform=None, feature_layer=-5)


def test_trainable_tower_freezes_what_the_features_skip():
    """Features from ``hidden_states[-2]`` never reach the last block, the final norm or SigLIP's
    head (transformers ``modeling_llava`` uses them the same way): those stay frozen so every
    trainable tower parameter gets a gradient."""
    for arch in ("clip", "siglip"):
        tower = _tiny_tower(arch, num_layers=3)
        wrapped = VLMVisionTower(tower, transform=None, freeze=False, select_strategy="full")
        wrapped(torch.randn(2, 3, 16, 16, dtype=torch.float64)).sum().backward()
        for name, p in tower.named_parameters():
            skipped = name.startswith(("encoder.layers.2.", "post_layernorm.", "head."))
            assert p.requires_grad == (not skipped), name
            assert (p.grad is not None) == (not skipped), name


def _llava_copy(model: VisionLanguageModel, strategy: str) -> LlavaForConditionalGeneration:
    """An HF LLaVA with the VLM's tower, projector and LLM weights (float64)."""
    llm = model.llm
    config = LlavaConfig(vision_config=model.tower.tower.config.to_dict(), text_config=llm.config.to_dict(),
                         image_token_id=model.image_token_id, projector_hidden_act="gelu",
                         vision_feature_layer=-2, vision_feature_select_strategy=strategy)
    llava = LlavaForConditionalGeneration(config).double().eval()
    llava.model.vision_tower.load_state_dict(model.tower.tower.state_dict())
    mlp = model.bridge.mlp
    llava.model.multi_modal_projector.linear_1.load_state_dict(mlp[0].state_dict())
    llava.model.multi_modal_projector.linear_2.load_state_dict(mlp[2].state_dict())
    llava.model.language_model.load_state_dict(llm.model.state_dict())
    llava.lm_head.load_state_dict(llm.lm_head.state_dict())
    return llava


@pytest.mark.parametrize("arch", ["clip", "siglip"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_projector_vlm_equals_hf_llava(tiny_tower_dir, tiny_siglip_dir, tiny_llm_dir, arch, strategy):
    """Follows transformers ``modeling_llava.LlavaForConditionalGeneration``: the same weights give
    the same ``get_image_features`` and the same logits (float64)."""
    tower_dir = tiny_tower_dir if arch == "clip" else tiny_siglip_dir
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SigLIP + "default" warns (tested above)
        model = VisionLanguageModel.build(vlm_config(tower_dir, tiny_llm_dir, "projector", lora=LoraConfig(enabled=False),
                                                     vision_feature_select_strategy=strategy))
    model = model.double().eval()
    llava = _llava_copy(model, strategy)
    batch = model.processor(random_images(2, seed=1), [PROMPT, PROMPT])
    pixels, ids, mask = batch["pixel_values"].double(), batch["input_ids"], batch["attention_mask"]
    assert int((ids == model.image_token_id).sum(1)[0]) == model.tower.num_tokens
    with torch.no_grad():
        ours = model.image_features(pixels)
        theirs = llava.get_image_features(pixel_values=pixels, vision_feature_layer=-2,
                                          vision_feature_select_strategy=strategy).pooler_output
        torch.testing.assert_close(ours, torch.stack(list(theirs)), rtol=1e-10, atol=1e-10)
        want = llava(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        torch.testing.assert_close(model.logits(pixels, ids, mask), want, rtol=1e-9, atol=1e-9)


def _strip_feature_keys(path) -> None:
    saved = yaml.safe_load(path.read_text())
    saved.pop("vision_feature_layer")
    saved.pop("vision_feature_select_strategy")
    path.write_text(yaml.safe_dump(saved))


@pytest.mark.parametrize("arch", ["clip", "siglip"])
def test_checkpoint_saved_without_the_fields_keeps_its_features(tiny_tower_dir, tiny_siglip_dir, tiny_llm_dir,
                                                                tmp_path, arch):
    """A ``vlm.yaml`` written before the fields existed was trained on ``patch_tokens`` (last layer,
    post-norm): it loads as ``vision_feature_layer: null`` (CLIP "default", SigLIP "full") with
    identical logits; saving it again writes those values."""
    tower_dir = tiny_tower_dir if arch == "clip" else tiny_siglip_dir
    strategy = "default" if arch == "clip" else "full"
    torch.manual_seed(0)
    old = VisionLanguageModel.build(vlm_config(tower_dir, tiny_llm_dir, "projector", vision_feature_layer=None,
                                               vision_feature_select_strategy=strategy))
    perturb_trainable(old)
    old.eval()
    batch = old.processor(random_images(2, seed=2), [PROMPT, "How many objects?"])
    with torch.no_grad():
        assert torch.equal(old.tower(batch["pixel_values"]), patch_tokens(old.tower.tower, batch["pixel_values"]))
        want = old.logits(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    old.save_pretrained(tmp_path / "ckpt")
    _strip_feature_keys(tmp_path / "ckpt" / "vlm.yaml")
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "ckpt")
    assert (loaded.cfg.vision_feature_layer, loaded.cfg.vision_feature_select_strategy) == (None, strategy)
    with torch.no_grad():
        got = loaded.logits(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    loaded.save_pretrained(tmp_path / "again")
    again = yaml.safe_load((tmp_path / "again" / "vlm.yaml").read_text())
    assert (again["vision_feature_layer"], again["vision_feature_select_strategy"]) == (None, strategy)


def test_old_flamingo_checkpoint_with_sparse_blocks_is_refused(tiny_tower_dir, tiny_llm_dir, tmp_path):
    """OpenFlamingo (``flamingo_lm.FlamingoLMMixin.init_flamingo``) puts blocks before layers with
    (i+1) % k == 0; an old checkpoint with k > 1 had them at i % k == 0 and cannot be placed; with
    k = 1 it loads but warns (trained without OpenFlamingo's media mask, ``helpers.MaskedCrossAttention``)."""
    cfg = vlm_config(tiny_tower_dir, tiny_llm_dir, "flamingo")
    cfg.bridge.xattn_every = 2
    VisionLanguageModel.build(cfg).save_pretrained(tmp_path / "ckpt")
    VisionLanguageModel.from_pretrained(tmp_path / "ckpt")  # with the fields: loads
    _strip_feature_keys(tmp_path / "ckpt" / "vlm.yaml")
    with pytest.raises(ConfigError, match="xattn_every"):
        VisionLanguageModel.from_pretrained(tmp_path / "ckpt")
    cfg.bridge.xattn_every = 1  # k = 1: the same layers as before, loads with a warning
    VisionLanguageModel.build(cfg).save_pretrained(tmp_path / "k1")
    _strip_feature_keys(tmp_path / "k1" / "vlm.yaml")
    with pytest.warns(UserWarning, match="media mask"):
        VisionLanguageModel.from_pretrained(tmp_path / "k1")
