"""Per-module training control (``model.train.{tower,bridge,llm}``): modes, per-module lr / weight
decay in the optimiser, the run log's per-module table, and save / load of what was trained."""
from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionModel

from tiny_vlm import perturb_trainable, probe_logits, random_images, vlm_config
from training.optim import build_optimizer
from training.stage2 import trainable_table
from vlm.config import ConfigError, ModuleTraining, OptimConfig, Stage2Config, TrainingControl, load_config
from vlm.model.vision_language_model import VisionLanguageModel

PROMPTS = ["Is there a red circle?", "How many objects are in the image?"]


def control(tower="frozen", bridge="full", llm="lora", lrs=None) -> TrainingControl:
    """Modes per module; ``lrs`` module -> lr (the LLM's also gets weight decay 0)."""
    lrs = lrs or {}
    return TrainingControl(tower=ModuleTraining(tower, lrs.get("tower")), bridge=ModuleTraining(bridge, lrs.get("bridge")),
                           llm=ModuleTraining(llm, lrs.get("llm"), 0.0 if "llm" in lrs else None))


def test_config_modes_checked_and_kept_consistent():
    cfg = load_config(Stage2Config, None, ["model.train.tower.mode=full", "model.train.llm.mode=full"])
    assert (cfg.model.freeze_vision, cfg.model.lora.enabled) == (False, False)
    legacy = load_config(Stage2Config, None, ["model.freeze_vision=false", "model.lora.enabled=false"])
    assert tuple(legacy.model.module_mode(m) for m in ("tower", "llm", "bridge")) == \
        ("full", "frozen", "full")
    for bad, key in (("model.train.bridge.mode=lora", "model.train.bridge.mode"),
                     ("model.train.tower.mode=half", "model.train.tower.mode"),
                     ("model.train.llm.lr=-1", "model.train.llm.lr")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(Stage2Config, None, [bad])


@pytest.mark.parametrize("tower,bridge,llm", [("lora", "frozen", "full"), ("full", "full", "frozen"),
                                              ("frozen", "full", "lora")])
def test_modes_decide_what_trains(tiny_tower_dir, tiny_llm_dir, tower, bridge, llm):
    torch.manual_seed(0)
    model = VisionLanguageModel.build(vlm_config(tiny_tower_dir, tiny_llm_dir, train=control(tower, bridge, llm)))
    perturb_trainable(model)
    model(model.processor(random_images(2), PROMPTS, ["Yes", "2"]))["loss"].backward()
    rows = model.trainable_parameters()
    for name, p in model.named_parameters():
        module = name.split(".")[0]
        mode = {"tower": tower, "bridge": bridge, "llm": llm}[module]
        if mode == "frozen":
            assert not p.requires_grad, name
        elif mode == "lora":
            assert p.requires_grad == ("lora_" in name), name
        if p.requires_grad:
            assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
    assert rows["bridge"]["trainable"] == (rows["bridge"]["total"] if bridge == "full" else 0)
    assert (rows["llm"]["trainable"] == rows["llm"]["total"]) == (llm == "full")
    assert (0 < rows["tower"]["trainable"] < rows["tower"]["total"]) == (tower in ("lora", "full"))


def test_per_module_lr_and_weight_decay(tiny_tower_dir, tiny_llm_dir):
    """Every trainable parameter is in a group with its module's lr and decay (or the optimiser's);
    the schedule scales every group alike."""
    torch.manual_seed(0)
    model = VisionLanguageModel.build(vlm_config(tiny_tower_dir, tiny_llm_dir,
                                                 train=control("full", "full", "lora", {"tower": 1e-5, "llm": 3e-4})))
    opt, sched = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.05, warmup_steps=2),
                                 model.optimizer_overrides())
    for group in opt.param_groups:
        prefixes = {n.split(".")[0] for n in group["names"]}
        assert len(prefixes) == 1
        module = prefixes.pop()
        want_lr = {"tower": 1e-5, "llm": 3e-4, "bridge": 1e-3}[module]
        assert group["initial_lr"] == pytest.approx(want_lr)
        assert group["weight_decay"] in ((0.0,) if module == "llm" else (0.0, 0.05))
    assert any(g["weight_decay"] == 0.05 for g in opt.param_groups)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == n_trainable
    table = trainable_table(model.trainable_parameters(), load_config(
        Stage2Config, None, ["model.train.tower.lr=1e-5", "model.train.llm.lr=3e-4", "optim.lr=1e-3"]))
    assert "tower  full" in table and "lr 1e-05" in table and "bridge full" in table and "llm    lora" in table


def test_trained_tower_lora_and_full_llm_round_trip(tiny_tower_dir, tiny_llm_dir, tmp_path):
    """A LoRA-trained tower saves merged (stock CLIPVisionModel keys), a fully trained LLM saves as
    llm/; the reloaded model gives the same logits."""
    torch.manual_seed(0)
    model = VisionLanguageModel.build(vlm_config(tiny_tower_dir, tiny_llm_dir, train=control("lora", "full", "full")))
    perturb_trainable(model, seed=4)
    model.eval()
    before = probe_logits(model)
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "llm" / "config.json").is_file() and not (tmp_path / "ckpt" / "adapter").exists()
    CLIPVisionModel.from_pretrained(tmp_path / "ckpt" / "vision")  # stock keys: no lora_ / base_layer
    reloaded = VisionLanguageModel.from_pretrained(tmp_path / "ckpt")
    assert reloaded.cfg.module_mode("llm") == "full" and not reloaded.tower.has_lora
    after = probe_logits(reloaded)
    assert (after - before).abs().max().item() < 1e-4
