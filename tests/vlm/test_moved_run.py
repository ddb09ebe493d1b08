"""A tree of runs moved as a whole still loads: ``vlm.yaml`` records the LLM and tower given as
relative paths relative to itself (``vlm.config.portable_path``)."""
from __future__ import annotations

import shutil

import torch

from tiny_vlm import perturb_trainable, random_images, vlm_config
from vlm.config import VLMConfig, config_from_yaml_text
from vlm.model.vision_language_model import VisionLanguageModel

PROMPTS = ["Describe the image briefly.", "Is there a red circle in the image?"]


def _logits(model, images):
    batch = model.processor(images, PROMPTS)
    with torch.no_grad():
        return model.logits(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])


def test_moved_run_directory_still_loads(tiny_tower_dir, tiny_llm_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_llm_dir, "runs/lm/final")
    shutil.copytree(tiny_tower_dir, "runs/stage1/final")
    model = VisionLanguageModel.build(vlm_config("runs/stage1/final", "runs/lm/final"))
    perturb_trainable(model)
    images = random_images(2, seed=3)
    want = _logits(model, images)
    model.save_pretrained("runs/stage2/final")
    saved = config_from_yaml_text(VLMConfig, (tmp_path / "runs/stage2/final/vlm.yaml").read_text())
    assert (saved.llm, saved.vision_tower) == ("../../lm/final", "../../stage1/final")
    (tmp_path / "runs").rename(tmp_path / "shared_runs")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "shared_runs" / "stage2" / "final")
    assert torch.allclose(_logits(loaded, images), want, atol=1e-5)
