"""``vlm eval vlm --hf-model``: our LLaVA export, evaluated through transformers alone, gives the
same predictions as ``--ckpt`` on the world: POPE, VSR, RefCOCO and CHAIR (whose generated
captions are the caption task's)."""
from __future__ import annotations

import json

import pytest
import torch

from tiny_vlm import perturb_trainable, vlm_config
from vlm.cli import main
from vlm.config import WorldConfig
from vlm.model.export import export_llava
from vlm.model.vision_language_model import VisionLanguageModel
from vlm.world.export import export_world

TASKS = ["chair", "grounding_attention", "pope", "refcoco", "vsr"]  # caption: the same generated captions as
# chair (its scorer is Java, slow)
OUTPUT_FIELDS = {"chair": ["output", "mentions"], "pope": ["answer"], "grounding_attention": ["sentence", "pointing"],
                 "refcoco": ["output", "parsed_box"], "vsr": ["answer"]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    export_world(out, WorldConfig(n_train=8, n_eval=4), progress=False)
    return out


def predictions(out, task):
    return [json.loads(line) for line in open(out / task / "predictions.jsonl")]


def test_hf_model_predictions_equal_ckpt_on_the_world(world, tmp_path, tiny_tower_dir, tiny_llm_dir):
    torch.manual_seed(0)
    model = VisionLanguageModel.build(vlm_config(tiny_tower_dir, tiny_llm_dir))
    perturb_trainable(model, seed=5)
    model.eval().save_pretrained(tmp_path / "ckpt")
    export_llava(model, tmp_path / "llava")
    common = ["--tasks", ",".join(TASKS), "--world-dir", str(world), "--limit", "3"]
    assert main(["eval", "vlm", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "a"), *common]) == 0
    assert main(["eval", "vlm", "--hf-model", str(tmp_path / "llava"), "--out", str(tmp_path / "b"), *common]) == 0
    for task in TASKS:
        ours, theirs = predictions(tmp_path / "a", task), predictions(tmp_path / "b", task)
        assert len(ours) == len(theirs) > 0
        for a, b in zip(ours, theirs):
            assert [a[k] for k in OUTPUT_FIELDS[task]] == [b[k] for k in OUTPUT_FIELDS[task]], task
    for a, b in zip(predictions(tmp_path / "a", "pope"), predictions(tmp_path / "b", "pope")):
        assert a["logp_yes"] == pytest.approx(b["logp_yes"], abs=1e-4)
        assert a["logp_no"] == pytest.approx(b["logp_no"], abs=1e-4)
    for a, b in zip(predictions(tmp_path / "a", "grounding_attention"), predictions(tmp_path / "b", "grounding_attention")):
        assert a["target_enrichment"] == pytest.approx(b["target_enrichment"], abs=1e-4)
        assert [x["objects_enrichment"] for x in a["layers"]] == pytest.approx([x["objects_enrichment"] for x in b["layers"]],
                                                                               abs=1e-4)
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["hf_model"] is True and summary["checkpoint"] == str(tmp_path / "llava")
