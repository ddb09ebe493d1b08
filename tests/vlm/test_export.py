"""``vlm export --format llava``: stock LlavaForConditionalGeneration + AutoProcessor give our logits."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_vlm import (our_logits, perturb_trainable, random_images, save_conv_tower, save_tiny_llm, save_tiny_tower,
                      stock_logits, vlm_config)
from vlm.model.export import ExportError, export_llava
from vlm.model.vision_language_model import VisionLanguageModel

PROMPTS = ["Is there a red circle in the image?", "Describe the image briefly."]


def trained_vlm(tower, llm, bridge="projector", **kw):
    """A tiny VLM with random bridge and LoRA weights (as after training), in eval mode."""
    torch.manual_seed(0)
    model = VisionLanguageModel.build(vlm_config(tower, llm, bridge, **kw))
    perturb_trainable(model, seed=3)
    return model.eval()


@pytest.mark.parametrize("arch,strategy", [("clip", "default"), ("clip", "full"), ("siglip", "full"),
                                           ("siglip", "default"), ("dinov2", "default")])
def test_llava_export_logits_equal(tmp_path, tiny_llm_dir, arch, strategy):
    tower = save_tiny_tower(tmp_path / "tower", arch=arch)
    with pytest.warns(UserWarning) if (arch, strategy) == ("siglip", "default") else _no_warning():
        model = trained_vlm(tower, tiny_llm_dir, vision_feature_select_strategy=strategy)
    out = export_llava(model, tmp_path / "llava")
    image = Image.fromarray(random_images(1, seed=5, size=48)[0])  # non-square-sized input: resize + crop
    for prompt in PROMPTS:
        theirs, their_ids = stock_logits(out, image, prompt)
        ours, our_ids = our_logits(model, image, prompt)
        assert their_ids.tolist() == our_ids.tolist()
        diff = (theirs - ours).abs().max().item()
        assert diff < 1e-4, diff


def test_llava_export_with_chat_template(tmp_path):
    """An LLM with a chat template (writing its BOS, as Llama 3's): the exported processor renders
    through it; ids and logits equal."""
    template = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '</s>' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    llm = save_tiny_llm(tmp_path / "llm", chat_template=template)
    model = trained_vlm(save_tiny_tower(tmp_path / "tower"), llm)
    out = export_llava(model, tmp_path / "llava")
    image = Image.fromarray(random_images(1, seed=6, size=32)[0])
    theirs, their_ids = stock_logits(out, image, PROMPTS[0])
    ours, our_ids = our_logits(model, image, PROMPTS[0])
    assert their_ids.tolist() == our_ids.tolist()
    assert (theirs - ours).abs().max().item() < 1e-4


def test_llava_export_refuses_what_llava_cannot_hold(tmp_path, tiny_tower_dir, tiny_llm_dir):
    flamingo = trained_vlm(tiny_tower_dir, tiny_llm_dir, bridge="flamingo")
    with pytest.raises(ExportError, match="Flamingo"):
        export_llava(flamingo, tmp_path / "a")
    conv = save_conv_tower(tmp_path / "conv", "resnet")
    with pytest.raises(ExportError, match="no class"):
        export_llava(trained_vlm(conv, tiny_llm_dir, vision_feature_layer=-1), tmp_path / "b")
    legacy = trained_vlm(tiny_tower_dir, tiny_llm_dir, vision_feature_layer=None)
    with pytest.raises(ExportError, match="post-norm"):
        export_llava(legacy, tmp_path / "c")
    assert not any((tmp_path / d).exists() for d in ("a", "b", "c"))


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_export_cli_from_a_saved_checkpoint(tmp_path, tiny_tower_dir, tiny_llm_dir, capsys):
    """``vlm export`` on an adapter checkpoint (LoRA merged on the way) and on a merged one: equal logits;
    a flamingo checkpoint exits 2 with the reason, writing nothing."""
    from vlm.cli import main

    model = trained_vlm(tiny_tower_dir, tiny_llm_dir)
    model.save_pretrained(tmp_path / "ckpt")
    model.merge_and_save(tmp_path / "merged")
    image = Image.fromarray(random_images(1, seed=7, size=32)[0])
    ours, _ = our_logits(model, image, PROMPTS[1])
    for ckpt in ("ckpt", "merged"):
        assert main(["export", "--ckpt", str(tmp_path / ckpt), "--format", "llava", "--out", str(tmp_path / f"x{ckpt}")]) == 0
        theirs, _ = stock_logits(tmp_path / f"x{ckpt}", image, PROMPTS[1])
        assert (theirs - ours).abs().max().item() < 1e-4
    trained_vlm(tiny_tower_dir, tiny_llm_dir, bridge="flamingo").save_pretrained(tmp_path / "fl")
    assert main(["export", "--ckpt", str(tmp_path / "fl"), "--out", str(tmp_path / "xfl")]) == 2
    assert "Flamingo" in capsys.readouterr().err and not (tmp_path / "xfl").exists()


def stage1_clip(tmp_path, objective="clip", **choices):
    """A tiny stage-one CLIP encoder (the world's BPE: EOS is id 2) with its objective, saved."""
    from encoders.dual_encoder import DualEncoder
    from encoders.registry import objective_config_class
    from encoders.stage1_model import Stage1Model
    from tiny_vlm import corpus
    from vlm.config import EncoderConfig, TextTowerConfig, VisionTowerConfig
    from vlm.data.tokenizer import train_bpe_tokenizer

    torch.manual_seed(0)
    cfg = EncoderConfig(vision=VisionTowerConfig(arch=choices.pop("arch", "clip"), image_size=32, patch_size=8,
                                                 hidden_size=32, num_layers=1, num_heads=2, mlp_ratio=2),
                        text=TextTowerConfig(hidden_size=24, num_layers=1, num_heads=2, max_len=24), embed_dim=16,
                        **{"pool": "cls", "global_mlp": False, "local_heads": False, **choices})
    tokenizer = train_bpe_tokenizer(corpus(), vocab_size=300, add_eos=True)
    model = Stage1Model.build(DualEncoder(cfg, tokenizer), objective_config_class(objective)()).eval()
    with torch.no_grad():
        model.objective.logit_scale.log_scale.fill_(2.5)
    return model, model.save_pretrained(tmp_path / "stage1")


def test_clip_export_runs_the_zero_shot_pipeline(tmp_path):
    """transformers' zero-shot-image-classification pipeline on the export gives our encoder's
    softmax over logit_scale * cosine similarities (our BPE's EOS is id 2, which CLIPModel would
    read as a legacy config: the export's appended EOS keeps the pooling right)."""
    from transformers import pipeline

    from vlm.cli import main

    model, ckpt = stage1_clip(tmp_path)
    assert model.encoder.tokenizer.eos_token_id == 2
    assert main(["export", "--ckpt", str(ckpt), "--format", "clip", "--out", str(tmp_path / "clip")]) == 0
    image = Image.fromarray(random_images(1, seed=3, size=40)[0])
    labels = ["red circle", "blue square", "green star"]
    got = {r["label"]: r["score"] for r in pipeline("zero-shot-image-classification", model=str(tmp_path / "clip"))(
        image, candidate_labels=labels, hypothesis_template="{}.")}
    enc = model.encoder
    with torch.no_grad():
        img = torch.nn.functional.normalize(enc.encode_image(enc.transform(image).unsqueeze(0)).global_emb, dim=-1)
        txt = torch.nn.functional.normalize(enc.encode_texts([f"{x}." for x in labels]).global_emb, dim=-1)
        want = (model.objective.logit_scale() * img @ txt.T).softmax(-1)[0].tolist()
    assert [got[x] for x in labels] == pytest.approx(want, abs=1e-5)


def test_clip_export_refuses_what_clip_cannot_hold(tmp_path):
    from vlm.model.export import export_clip

    sparc, _ = stage1_clip(tmp_path / "a", "sparc", pool="mean", global_mlp=True)
    with pytest.raises(ExportError, match="pool=cls"):
        export_clip(sparc, tmp_path / "x")
    siglip, _ = stage1_clip(tmp_path / "b", arch="siglip")
    with pytest.raises(ExportError, match="CLIP vision tower"):
        export_clip(siglip, tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
