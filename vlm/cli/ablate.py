"""``vlm ablate``: the backbone grid, objective x (with/without MaskEmbed) x bridge x seed.

Each cell is trained and fully evaluated; the report gives mean +/- 95% CI (t-interval over seeds)
per metric, and for each claim of the seed papers a plain statement computed from paired
differences across seeds. Nothing here is tuned to make a claim hold: the statement says what the
numbers say, including "does not hold" and "inconclusive" (the CI of the difference contains 0).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from eval.encoder import REPORT_COLUMNS as ENCODER_COLUMNS
from eval.encoder import run as run_encoder_eval
from eval.harness import run_vlm_eval
from eval.report import cached_json, metrics_table, write_json, write_text
from eval.tasks import VLM_REPORT_COLUMNS
from training.runlock import RunLock
from vlm.cli.pipeline import (Stage, Timings, flatten_metrics, make_stage, mean_ci, run_stage, stage1_init, stage2_features,
                              start_run, timed, tower_stage)
from vlm.config import AblateConfig, load_config
from vlm.world.export import ensure_world


@dataclass(frozen=True)
class Claim:
    """``metric`` of cell (a, level) vs cell (b, level_b or level), paired by seed. A tower is
    "sparc", "sparc+maskembed", ...; a level is "encoder" or a bridge name. Higher is better unless
    ``lower_is_better``."""

    text: str
    metric: str
    a: str
    b: str
    level: str = "encoder"
    lower_is_better: bool = False
    level_b: str | None = None


CLAIMS = [
    Claim("SPARC patch segmentation (zero-shot) mIoU > CLIP", "segmentation/zero_shot_miou", "sparc", "clip"),
    Claim("SPARC patch segmentation (linear probe) mIoU > CLIP", "segmentation/probe_miou", "sparc", "clip"),
    Claim("SPARC points its words at their objects (pointing accuracy) better than CLIP", "pointing_acc", "sparc",
          "clip"),
    Claim("FLAIR pointing accuracy > CLIP", "pointing_acc", "flair", "clip"),
    Claim("SPARC keeps CLIP's zero-shot classification (>=)", "zero_shot/top1", "sparc", "clip"),
    Claim("SPARC keeps CLIP's single-object zero-shot classification (>=)", "zero_shot_single_top1", "sparc", "clip"),
    Claim("SPARC retrieval R@1 (image->text) >= CLIP", "retrieval/i2t_r1", "sparc", "clip"),
    Claim("FLAIR retrieval R@1 (text->image) > CLIP", "retrieval/t2i_r1", "flair", "clip"),
    Claim("FLAIR patch segmentation (zero-shot) mIoU > CLIP", "segmentation/zero_shot_miou", "flair", "clip"),
    Claim("SigLIP zero-shot classification >= CLIP", "zero_shot/top1", "siglip", "clip"),
    Claim("MaskEmbed improves CLIP's patch probe mIoU", "segmentation/probe_miou", "clip+maskembed", "clip"),
    Claim("MaskEmbed improves SPARC's patch probe mIoU", "segmentation/probe_miou", "sparc+maskembed", "sparc"),
    Claim("MaskEmbed improves CLIP's multi-label patch F1", "multilabel/f1", "clip+maskembed", "clip"),
    Claim("SPARC tower -> better VLM grounding (RefCOCO Acc@0.5) than CLIP", "refcoco/acc", "sparc", "clip", "projector"),
    Claim("SPARC tower -> fewer hallucinations (CHAIR_i) than CLIP", "chair/chair_i", "sparc", "clip", "projector", True),
    Claim("SPARC tower -> better POPE F1 than CLIP", "pope/f1_avg", "sparc", "clip", "projector"),
    Claim("MaskEmbed tower -> better VLM grounding than its CLIP teacher", "refcoco/acc", "clip+maskembed", "clip", "projector"),
    Claim("Flamingo bridge beats the projector on VSR accuracy (SPARC tower)", "vsr/accuracy", "sparc", "sparc",
          "flamingo", level_b="projector"),
]


def tower_name(objective: str, maskembed: bool) -> str:
    """The grid's name of a tower: the objective, with "+maskembed" when post-trained."""
    return f"{objective}+maskembed" if maskembed else objective


def plan(cfg: AblateConfig) -> tuple[dict[str, Stage], list[tuple[str, str, int, str]]]:
    """All stages (configs resolved, ConfigError now) and the cells: (tower, level, seed, stage name)."""
    out = Path(cfg.out_dir)
    stages = {"lm": make_stage("lm", "lm", cfg.lm_config, out / "lm", cfg, [])}
    pretrained = tower_stage(cfg, out)  # one shared starting point for every objective and seed
    if pretrained is not None:
        stages["tower"] = pretrained
    cells = []
    for seed in cfg.seeds:
        for obj in cfg.objectives:
            s1 = make_stage(f"stage1/{obj}/seed{seed}", "stage1", cfg.stage1_config.format(objective=obj),
                            out / "stage1" / obj / f"seed{seed}", cfg, [f"run.seed={seed}", *stage1_init(pretrained)])
            stages[s1.name] = s1
            for me in cfg.maskembed:
                cell_stage = s1
                if me:
                    cell_stage = make_stage(f"maskembed/{obj}/seed{seed}", "maskembed", cfg.maskembed_config,
                                             out / "maskembed" / obj / f"seed{seed}", cfg,
                                             [f"run.seed={seed}", f"maskembed.teacher={s1.final}"])
                    stages[cell_stage.name] = cell_stage
                tower = tower_name(obj, me)
                cells.append((tower, "encoder", seed, cell_stage.name))
                if not cfg.stage2:
                    continue
                for bridge in cfg.bridges:
                    s2 = make_stage(f"stage2/{tower}/{bridge}/seed{seed}", "stage2",
                                    cfg.stage2_config.format(bridge=bridge),
                                    out / "stage2" / tower / bridge / f"seed{seed}", cfg,
                                    [f"run.seed={seed}", f"model.vision_tower={cell_stage.final}",
                                     f"model.llm={stages['lm'].final}", *stage2_features(s1)])
                    stages[s2.name] = s2
                    cells.append((tower, bridge, seed, s2.name))
    return stages, cells


def shared_stages(cfg: AblateConfig, stages: dict[str, Stage]) -> list[str]:
    """The stages every cell builds on, in run order: the pretrained tower (stage one starts from
    it) and the world LLM (only with stage two: the encoder-level grid has no use for it)."""
    return [name for name, needed in (("tower", "tower" in stages), ("lm", cfg.stage2)) if needed]


def run_ablation(config_path: str, overrides: list[str] | None = None) -> Path:
    """Train and evaluate every cell of the grid; write ``out_dir/report.md`` and ``results.json``."""
    cfg = load_config(AblateConfig, config_path, list(overrides or []))
    stages, cells = plan(cfg)
    with RunLock(cfg.out_dir):  # a second ablation into the same dir stops here
        return _run_ablation(cfg, stages, cells)


def _run_ablation(cfg: AblateConfig, stages: dict[str, Stage], cells: list) -> Path:
    """``run_ablation``'s work, under the out dir's lock."""
    out, timings = start_run(cfg, "ablate.yaml")
    world_dir = out / "world"
    timed("world", timings, ensure_world, world_dir, cfg.world, workers=cfg.threads or None)  # threads bound the renderers too
    for name in shared_stages(cfg, stages):
        run_stage(stages[name], timings)

    results = []
    for tower, level, seed, stage_name in cells:
        stage = stages[stage_name]
        run_stage(stage, timings)  # reuses the tower's stage-one/MaskEmbed run after the first cell
        summary = evaluate_cell(cfg, stage, level, world_dir, timings)
        results.append({"tower": tower, "level": level, "seed": seed, "metrics": flatten_metrics(summary)})
        write_json(out / "results.json", results, strict=False, newline=False)
    return write_report(out, cfg, results, timings)


# An encoder cell summary saved without these keys predates them: the cell is evaluated again.
ENCODER_CELL_KEYS = ("pointing_acc", "zero_shot_single_top1")


def evaluate_cell(cfg: AblateConfig, stage: Stage, level: str, world_dir: Path, timings: Timings) -> dict:
    """One cell's summary: the encoder eval ("encoder" level; a MaskEmbed tower scored with its
    teacher's text side) or the VLM evals, or the ``cell_summary.json`` an earlier run saved (for
    an encoder cell, only when it has every ``ENCODER_CELL_KEYS``)."""
    summary_path = Path(cfg.out_dir) / "eval" / stage.name.replace("/", "_") / "cell_summary.json"
    if summary_path.is_file():
        cached = cached_json(summary_path, dict)  # {} when a killed write left it unreadable
        if cached and level != "encoder" or all(k in cached for k in ENCODER_CELL_KEYS):
            return cached
        summary_path.unlink()
    eval_dir = str(summary_path.parent)
    if level == "encoder":
        text_from = str(Path(stage.cfg.maskembed.teacher)) if stage.recipe == "maskembed" else None
        return timed(f"eval {stage.name}", timings, cached_json, summary_path, run_encoder_eval, str(stage.final),
                     eval_dir, world=cfg.world, world_dir=str(world_dir), text_from=text_from, limit=cfg.eval_limit)
    return timed(f"eval {stage.name}", timings, cached_json, summary_path, run_vlm_eval, str(stage.final),
                 list(cfg.vlm_tasks), eval_dir, world_dir=str(world_dir), limit=cfg.eval_limit)


def aggregate(results: list[dict]) -> dict[tuple[str, str], dict[str, tuple[float, float, float, int]]]:
    """{(tower, level): {metric: (mean, ci_low, ci_high, n_seeds)}} over seeds."""
    groups: dict[tuple[str, str], dict[str, list[float]]] = {}
    for r in results:
        g = groups.setdefault((r["tower"], r["level"]), {})
        for k, v in r["metrics"].items():
            g.setdefault(k, []).append(v)
    return {key: {m: (*mean_ci(vs), len(vs)) for m, vs in g.items()} for key, g in groups.items()}


def judge(claim: Claim, results: list[dict]) -> str:
    """A plain statement of whether ``claim`` holds, from paired (same-seed) differences a - b."""
    level_b = claim.level_b or claim.level
    by = {(r["tower"], r["level"], r["seed"]): r["metrics"] for r in results}
    diffs = []
    for (tower, level, seed), m in by.items():
        if tower == claim.a and level == claim.level and claim.metric in m:
            other = by.get((claim.b, level_b, seed))
            if other is not None and claim.metric in other:
                diffs.append(m[claim.metric] - other[claim.metric])
    if not diffs:
        return f"- {claim.text}: not measured in this grid."
    mean, lo, hi = mean_ci(diffs)
    sign = -1 if claim.lower_is_better else 1
    # The claim holds when the CI of the improvement (sign * difference) lies above 0.
    worst, best = sorted((sign * lo, sign * hi)) if len(diffs) >= 2 else (sign * mean, sign * mean)
    if len(diffs) < 2:
        verdict = "holds" if sign * mean > 0 else "does not hold"
        verdict += " on a single seed (no CI)"
    elif worst > 0:
        verdict = "holds"
    elif best < 0:
        verdict = "does not hold (the opposite is significant)"
    else:
        verdict = "inconclusive (the CI of the difference contains 0)"
    return (f"- {claim.text}: {verdict} at this scale; difference {mean:+.4f}, 95% CI [{lo:+.4f}, {hi:+.4f}] "
            f"over {len(diffs)} seeds (`{claim.metric}`, {claim.a} vs {claim.b}"
            + (f", {claim.level}" if claim.level != "encoder" else "")
            + (f" vs {level_b}" if level_b != claim.level else "") + ").")


def _mean_pm(stats: tuple[float, float, float, int]) -> str:
    """A table cell "mean ± CI half-width" (the mean alone for a single seed)."""
    mean, lo, hi, n = stats
    return f"{mean:.3f}" + (f" ± {(hi - lo) / 2:.3f}" if n > 1 else "")


def write_report(out: Path, cfg: AblateConfig, results: list[dict], timings: Timings) -> Path:
    """``out/report.md``: one mean +/- CI table per level, then the claim statements."""
    agg = aggregate(results)
    lines = ["# Backbone ablation", "",
             f"Seeds {list(cfg.seeds)}; objectives {list(cfg.objectives)}; MaskEmbed {list(cfg.maskembed)}; "
             f"bridges {list(cfg.bridges) if cfg.stage2 else 'none'}. Cells: mean +/- half-width of the 95% t-interval "
             "over seeds; the headline metrics (every metric of every cell: `results.json`). Config: `ablate.yaml`; per-cell summaries: `eval/`.", ""]
    for level in sorted({lvl for _, lvl in agg}):
        rows = {t: m for (t, lvl), m in agg.items() if lvl == level}
        lines += [f"## {level}", "",
                  metrics_table("tower", rows, ENCODER_COLUMNS if level == "encoder" else VLM_REPORT_COLUMNS,
                                cell=lambda m, k: _mean_pm(m[k]) if k in m else None), ""]
    lines += ["## Claims of the seed papers, as measured here", ""]
    lines += [judge(c, results) for c in CLAIMS]
    lines += ["", "## Wall time", "", f"Total {sum(timings.seconds.values()) / 60:.1f} min over {len(timings.seconds)} stages "
              "(`timings.json`)."]
    return write_text(out / "report.md", "\n".join(lines) + "\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``vlm ablate [--config YAML] [overrides]``."""
    parser.add_argument("--config", default="configs/ablate/backbones_world.yaml")
    parser.add_argument("overrides", nargs="*", help="AblateConfig overrides")
    parser.set_defaults(func=cmd_ablate)


def cmd_ablate(args: argparse.Namespace) -> int:
    """``vlm ablate``: the backbone grid with seeds and 95% CIs."""
    report = run_ablation(args.config, overrides=args.overrides)
    print(f"report: {report}")
    return 0
