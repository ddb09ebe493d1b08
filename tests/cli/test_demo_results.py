"""`vlm demo`'s results.json: every headline key present (null when its producer is absent), the
types, the per-objective / per-bridge blocks, the report's chance table, and the oracle stage."""
import json
import math

import pytest

from vlm.cli.demo import ORACLE_STAGE, plan, write_results
from vlm.cli.pipeline import Timings
from vlm.cli.results import (RESULT_KEYS, chance_levels, headline_results, majority_rate, pointing_chance,
                             results_markdown)
from vlm.config import ConfigError, DemoConfig, WorldConfig, load_config

REQUIRED = ["zero_shot_top1", "zero_shot_single_top1", "zero_shot_single_color_top1", "pointing_acc", "patch_miou",
            "cider", "chair_i", "chair_s", "pope_acc", "pope_f1", "pope_yes_ratio", "refcoco_acc50", "vsr_acc",
            "wall_s", "by_objective", "by_bridge", "pope_acc_blank", "vsr_acc_blank", "refcoco_acc50_blank",
            "text_probe_pope_acc", "oracle_pope_acc"]

# Flat rows as vlm.cli.pipeline.flatten_metrics makes them from today's eval summaries (no pointing,
# no single-object zero-shot, no LM text probe yet).
ENCODER = {"zero_shot/top1": 0.4, "segmentation/zero_shot_miou": 0.2, "retrieval/i2t_r1": 0.1}
VLM = {"caption/CIDEr": 0.9, "chair/chair_i": 0.1, "chair/chair_s": 0.3, "pope/accuracy_avg": 0.6,
       "pope/f1_avg": 0.62, "pope/yes_ratio_avg": 0.55, "refcoco/acc": 0.05, "vsr/accuracy": 0.52}
BLANK = {"pope/accuracy_avg": 0.5, "vsr/accuracy": 0.5, "refcoco/acc": 0.0}
ORACLE = {"pope/accuracy_avg": 0.51, "vsr/accuracy": float("nan")}


def results(tmp_path):
    sources = {"encoder": ENCODER, "vlm": VLM, "vlm_blank": BLANK, "oracle": ORACLE, "lm": {}}
    timings = Timings(tmp_path / "timings.json")
    timings.add("stage1/sparc", 12.0)
    cfg = load_config(DemoConfig, None, [f"out_dir={tmp_path}"])
    return write_results(tmp_path, cfg, sources, {"stage1/sparc": ENCODER, "stage1/clip": {"zero_shot/top1": 0.3},
                                                  "maskembed/sparc": ENCODER}, {"stage2/projector": VLM}, 61.5,
                         timings)


def test_results_json_keys_and_types(tmp_path):
    results(tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(REQUIRED) <= set(saved)
    for key in RESULT_KEYS:
        assert saved[key] is None or isinstance(saved[key], float), key
    assert saved["pope_acc"] == 0.6 and saved["pope_acc_blank"] == 0.5 and saved["oracle_pope_acc"] == 0.51
    assert saved["refcoco_acc50"] == 0.05 and saved["vsr_acc_blank"] == 0.5 and saved["zero_shot_top1"] == 0.4
    for missing in ("pointing_acc", "zero_shot_single_top1", "text_probe_pope_acc", "oracle_vsr_acc"):
        assert saved[missing] is None  # no producer (or NaN) -> null
    assert saved["wall_s"] == 61.5 and saved["stage_s"] == {"stage1/sparc": 12.0}
    assert set(saved["by_objective"]) == {"sparc", "clip"}
    assert saved["by_objective"]["clip"]["zero_shot_top1"] == 0.3 and saved["by_objective"]["clip"]["patch_miou"] is None
    assert saved["by_bridge"] == {"projector": {k: saved[k] for k in saved["by_bridge"]["projector"]}}
    assert set(saved["by_bridge"]["projector"]) == {"cider", "chair_i", "chair_s", "pope_acc", "pope_f1",
                                                    "pope_yes_ratio", "refcoco_acc50", "vsr_acc"}


def test_report_lists_chance_and_not_measured(tmp_path):
    text = results_markdown(results(tmp_path), chance_levels({"pointing_acc": 0.07, "vsr_acc": 0.55}))
    assert "not measured" in text and "text_probe_pope_acc" in text.split("Not measured")[1]
    row = next(line for line in text.splitlines() if line.startswith("| pope_acc "))
    assert "0.6" in row and "0.5" in row
    assert "0.07" in next(line for line in text.splitlines() if line.startswith("| pointing_acc "))
    assert "0.55" in next(line for line in text.splitlines() if line.startswith("| vsr_acc_blank "))


def test_chance_levels_measured_on_the_world():
    world = WorldConfig(n_train=4, n_eval=20)
    chance = pointing_chance(world, range(4, 24), patch=8)
    assert 0.0 < chance < 0.2  # objects cover 16-40% of the side: a few % to ~16% of the grid
    assert majority_rate([1, 0, 0, 0]) == 0.75 and math.isnan(majority_rate([]))
    assert headline_results({}, {}, {}, 1.0, {})["pope_acc"] is None


def test_plan_has_the_oracle_stage(tmp_path):
    stages = plan(load_config(DemoConfig, None, [f"out_dir={tmp_path}"]))
    oracle = stages[ORACLE_STAGE]
    assert oracle.recipe == "stage2" and oracle.cfg.model.vision_tower == "oracle"
    assert oracle.cfg.model.bridge.name == "projector" and oracle.cfg.model.llm == str(tmp_path / "lm" / "final")
    headline = stages["stage2/projector"].cfg
    assert oracle.cfg.optim.max_steps == 500 < headline.optim.max_steps  # oracle_overrides' shorter run
    assert oracle.cfg.optim.lr == headline.optim.lr and oracle.cfg.model.lora == headline.model.lora  # same recipe
    assert ORACLE_STAGE not in plan(load_config(DemoConfig, None, [f"out_dir={tmp_path}", "oracle_bridge=null"]))
    with pytest.raises(ConfigError, match="oracle_tasks"):
        load_config(DemoConfig, None, ["oracle_tasks=[nope]"])


def test_headline_vlm_draws_its_grounding_attention(tmp_path):
    """The headline projector VLM's eval job asks for grounding_attention (not the flamingo one, whose
    images are read by cross-attention, nor the blank control); the report copies and describes the figure."""
    from vlm.cli.demo import attention_figure, eval_jobs
    cfg = load_config(DemoConfig, None, [f"out_dir={tmp_path}", "bridges=[projector,flamingo]"])
    jobs = {job.name: job for job in eval_jobs(cfg, plan(cfg), tmp_path / "world")}
    tasks = {name: job.args[3] for name, job in jobs.items() if name.startswith("eval vlm")}
    assert "grounding_attention" in tasks["eval vlm stage2/projector"]
    assert "grounding_attention" not in tasks["eval vlm stage2/flamingo"]
    assert "grounding_attention" not in tasks["eval vlm stage2/projector_blank"]
    off = load_config(DemoConfig, None, [f"out_dir={tmp_path}", "grounding_attention=false"])
    assert all("grounding_attention" not in job.args[3] for job in eval_jobs(off, plan(off), tmp_path / "w")
               if job.name.startswith("eval vlm"))
    assert attention_figure(cfg, {}) == []  # not drawn: nothing to show
    drawn = tmp_path / "eval" / "stage2_projector" / "grounding_attention" / "attention.png"
    drawn.parent.mkdir(parents=True)
    drawn.write_bytes(b"png")
    summary = {"pointing": 0.25, "pointing_chance": 0.1, "target_enrichment": 1.5, "objects_enrichment": 1.4,
               "selection": None, "layers": []}
    lines = attention_figure(cfg, {"eval vlm stage2/projector": {"grounding_attention": summary}})
    assert "pointing 0.250 (chance 0.100)" in lines[0] and "selection n/a" in lines[0]
    assert (tmp_path / "figures" / "grounding_attention.png").read_bytes() == b"png"
