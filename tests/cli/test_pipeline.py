"""Pipeline helpers of `vlm demo` / `vlm ablate`: CIs, claim verdicts, metric flattening, planning."""
import math

import pytest

from vlm.cli.ablate import CLAIMS, Claim, aggregate, judge, plan as ablate_plan
from vlm.cli.demo import plan as demo_plan
from vlm.cli.pipeline import Timings, flatten_metrics, mean_ci, t975, world_overrides
from vlm.config import AblateConfig, ConfigError, DemoConfig, WorldConfig, load_config


def test_mean_ci_matches_hand_computation():
    vals = [0.2, 0.4, 0.9]
    mean = sum(vals) / 3
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / 2)
    m, lo, hi = mean_ci(vals)
    assert m == pytest.approx(mean)
    assert hi - m == pytest.approx(4.303 * sd / math.sqrt(3))
    assert m - lo == pytest.approx(hi - m)


def test_mean_ci_degenerate():
    assert math.isnan(mean_ci([])[0])
    m, lo, hi = mean_ci([0.5])
    assert m == 0.5 and math.isnan(lo) and math.isnan(hi)
    assert mean_ci([1.0, 1.0, 1.0]) == (1.0, 1.0, 1.0)
    assert t975(2) == 4.303 and t975(1000) == 1.96


def test_flatten_metrics_keeps_numeric_leaves():
    flat = flatten_metrics({"pope": {"random": {"f1": 0.5, "n": 10}, "f1_avg": 0.4}, "note": "x",
                            "ok": True, "bad": float("nan")})
    assert flat == {"pope/random/f1": 0.5, "pope/random/n": 10.0, "pope/f1_avg": 0.4}


def _results(a_vals, b_vals, metric="m"):
    out = []
    for seed, (a, b) in enumerate(zip(a_vals, b_vals)):
        out.append({"tower": "sparc", "level": "encoder", "seed": seed, "metrics": {metric: a}})
        out.append({"tower": "clip", "level": "encoder", "seed": seed, "metrics": {metric: b}})
    return out


def test_judge_verdicts_follow_paired_differences():
    claim = Claim("SPARC > CLIP", "m", "sparc", "clip")
    assert "holds at this scale" in judge(claim, _results([0.6, 0.7, 0.65], [0.5, 0.6, 0.56]))
    assert "does not hold" in judge(claim, _results([0.4, 0.5, 0.45], [0.5, 0.6, 0.56]))
    assert "inconclusive" in judge(claim, _results([0.6, 0.4, 0.5], [0.5, 0.5, 0.5]))
    assert "not measured" in judge(Claim("x", "other", "sparc", "clip"), _results([1], [0]))
    lower = Claim("fewer", "m", "sparc", "clip", lower_is_better=True)
    assert "holds at this scale" in judge(lower, _results([0.1, 0.2, 0.15], [0.5, 0.6, 0.56]))
    # Lower is better: a CI of the difference that straddles 0 is inconclusive, one above 0 is the opposite.
    assert "inconclusive" in judge(lower, _results([0.4, 0.6, 0.5], [0.5, 0.5, 0.5]))
    assert "does not hold" in judge(lower, _results([0.6, 0.7, 0.65], [0.5, 0.6, 0.56]))


def test_ablation_reaches_a_verdict_on_pointing_accuracy():
    """The encoder grid (clip vs sparc, 3 seeds) carries ``pointing_acc`` in each cell's flattened
    summary, and a claim judges it like the others."""
    claim = next(c for c in CLAIMS if c.metric == "pointing_acc" and c.a == "sparc")
    assert (claim.b, claim.level, claim.lower_is_better) == ("clip", "encoder", False)

    def cell(tower, seed, acc):
        summary = {"segmentation": {"zero_shot_miou": 0.1}, "pointing_acc": acc, "pointing_words": 600,
                   "pointing_chance": 0.08, "zero_shot_multi_ceiling_note": "text"}
        return {"tower": tower, "level": "encoder", "seed": seed, "metrics": flatten_metrics(summary)}

    results = [cell("sparc", s, a) for s, a in enumerate([0.5, 0.55, 0.6])]
    results += [cell("clip", s, a) for s, a in enumerate([0.1, 0.12, 0.09])]
    assert results[0]["metrics"]["pointing_acc"] == 0.5
    verdict = judge(claim, results)
    assert "holds at this scale" in verdict and "over 3 seeds" in verdict and "`pointing_acc`" in verdict
    assert "inconclusive" in judge(claim, [cell("sparc", s, a) for s, a in enumerate([0.1, 0.2, 0.1])]
                                   + [cell("clip", s, a) for s, a in enumerate([0.15, 0.1, 0.15])])


def test_stale_encoder_cell_summaries_are_evaluated_again(tmp_path, monkeypatch):
    import json
    from types import SimpleNamespace

    from vlm.cli import ablate

    calls = []
    monkeypatch.setattr(ablate, "run_encoder_eval", lambda *a, **k: calls.append(a) or {"pointing_acc": 0.3,
                                                                                          "zero_shot_single_top1": 0.2})
    cfg = SimpleNamespace(out_dir=str(tmp_path), world=WorldConfig(), eval_limit=10)
    stage = SimpleNamespace(name="stage1/clip/seed0", final=tmp_path / "final", recipe="stage1", cfg=None)
    path = tmp_path / "eval" / "stage1_clip_seed0" / "cell_summary.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"zero_shot": {"top1": 0.5}}))  # saved before pointing accuracy existed
    timings = Timings(tmp_path / "timings.json")
    assert ablate.evaluate_cell(cfg, stage, "encoder", tmp_path / "world", timings)["pointing_acc"] == 0.3
    assert len(calls) == 1 and json.loads(path.read_text())["pointing_acc"] == 0.3
    assert ablate.evaluate_cell(cfg, stage, "encoder", tmp_path / "world", timings)["pointing_acc"] == 0.3
    assert len(calls) == 1  # a current summary is reused


def test_aggregate_groups_by_tower_and_level():
    agg = aggregate(_results([0.6, 0.7, 0.8], [0.5, 0.5, 0.5]))
    mean, lo, hi, n = agg[("sparc", "encoder")]["m"]
    assert n == 3 and mean == pytest.approx(0.7) and lo < 0.7 < hi


def test_plans_resolve_every_stage_config_up_front(tmp_path):
    cfg = load_config(DemoConfig, None, [f"out_dir={tmp_path}", "from_scratch=[sparc]"])
    stages = demo_plan(cfg)
    assert {"lm", "stage1/sparc", "stage1/clip", "maskembed/sparc", "stage2/projector"} <= set(stages)
    assert stages["stage2/projector"].cfg.model.llm == str(tmp_path / "lm" / "final")
    assert stages["stage1/clip"].cfg.world.n_train == cfg.world.n_train
    # every objective starts from the shared pretrained tower; the from-scratch run from random weights
    tower_final = str(tmp_path / "tower" / "final")
    assert stages["stage1/clip"].cfg.model.vision.pretrained == tower_final
    assert stages["stage1/sparc"].cfg.model.vision.pretrained == tower_final
    assert stages["stage1/sparc_scratch"].cfg.model.vision.pretrained == ""
    assert stages["stage1/sparc_scratch"].cfg.model.vision.arch == stages["tower"].cfg.model.arch == "resnet"
    assert stages["stage2/projector"].cfg.model.vision_feature_layer == -1  # a conv tower's last grid
    every = demo_plan(load_config(DemoConfig, None, [f"out_dir={tmp_path}", "objectives=[clip,siglip,sparc,flair]"]))
    assert every["stage1/flair"].cfg.objective.name == "flair"
    with pytest.raises(ConfigError, match="from_scratch"):
        load_config(DemoConfig, None, ["tower_config=null", "from_scratch=[sparc]"])
    assert "stage1/sparc_scratch" not in demo_plan(load_config(DemoConfig, None, [f"out_dir={tmp_path}"]))
    acfg = load_config(AblateConfig, "configs/ablate/backbones_world.yaml", [f"out_dir={tmp_path}"])
    stages, cells = ablate_plan(acfg)
    assert len({c[2] for c in cells}) >= 3
    towers = {c[0] for c in cells}
    assert {"sparc", "sparc+maskembed", "clip"} <= towers


def test_ablation_trains_the_shared_tower_first_and_the_llm_only_for_stage_two(tmp_path, monkeypatch):
    """Every stage-one cell starts from tower/final, so the tower runs before any cell; the
    encoder-level grid (stage2: false) never trains the LLM."""
    from vlm.cli import ablate
    ran = []
    monkeypatch.setattr(ablate, "ensure_world", lambda *a, **k: None)
    monkeypatch.setattr(ablate, "run_stage", lambda stage, timings: ran.append(stage.name))
    monkeypatch.setattr(ablate, "evaluate_cell", lambda *a, **k: {"pointing_acc": 0.5})
    monkeypatch.setattr(ablate, "write_report", lambda out, *a: out / "report.md")
    for stage2, first in ((False, ["tower"]), (True, ["tower", "lm"])):
        ran.clear()
        cfg = load_config(AblateConfig, "configs/ablate/encoders_world.yaml",
                          [f"out_dir={tmp_path / str(stage2)}", f"stage2={str(stage2).lower()}", "bridges=[projector]"])
        stages, cells = ablate_plan(cfg)
        ablate._run_ablation(cfg, stages, cells)
        assert ran[:len(first)] == first and "lm" not in ran[len(first):]
        assert stages[ran[len(first)]].cfg.model.vision.pretrained == str(stages["tower"].final)


def test_bad_pipeline_values_fail_before_work(tmp_path):
    with pytest.raises(ConfigError, match="objectives"):
        load_config(DemoConfig, None, ["objectives=[clip,nope]"])
    with pytest.raises(ConfigError):
        demo_plan(load_config(DemoConfig, None, [f"out_dir={tmp_path}", "stage1_overrides=[optim.lr=-1]"]))
    assert not any(tmp_path.iterdir())


def test_world_overrides_cover_every_field():
    keys = {o.split("=")[0] for o in world_overrides(WorldConfig())}
    assert keys == {f"world.{k}" for k in WorldConfig.__dataclass_fields__}


def test_timings_survive_a_second_run(tmp_path):
    path = tmp_path / "timings.json"
    first = Timings(path)
    first.add("stage1/clip", 12.345)
    first.add("eval", 3.0)
    second = Timings(path)  # a second pipeline run: stage1 reused, eval redone
    second.add("stage1/clip", 0.0, reused=True)
    second.add("eval", 2.5)
    second.add("new", 0.0, reused=True)
    saved = Timings(path)
    assert saved.seconds == {"stage1/clip": 12.35, "eval": 2.5, "new": 0.0}
    assert second.reused == ["stage1/clip", "new"] and saved.reused == []
    path.write_text("{not json")
    assert Timings(path).seconds == {}
