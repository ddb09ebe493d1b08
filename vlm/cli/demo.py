"""``vlm demo``: from nothing to a results table on the synthetic world.

Order: world -> tiny LLM -> stage one (every objective) -> MaskEmbed (one tower) -> stage two
(one tower, each bridge) -> encoder evals, heatmaps, VLM evals -> ``DIR/report.md``.
Every stage's config is resolved before the first one starts, so a bad value fails at once.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from vlm.cli.pipeline import Stage, Timings, flatten_metrics, make_stage, run_stage, timed
from vlm.cli.report import ENCODER_COLUMNS, VLM_COLUMNS, markdown_table, pick_columns, plot_training_curves
from vlm.config import DemoConfig, load_config, save_config

def _cached_json(path: Path, fn, *args, **kwargs) -> dict:
    """``fn(...)``'s summary, or the one already saved at ``path`` by an earlier run."""
    if path.is_file():
        return json.loads(path.read_text())
    summary = fn(*args, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, default=str))
    return summary


def plan(cfg: DemoConfig) -> dict[str, Stage]:
    """Every stage of the demo with its resolved config (raises ConfigError before any work)."""
    out = Path(cfg.out_dir)
    stages: dict[str, Stage] = {"lm": make_stage("lm", "lm", cfg.lm_config, out / "lm", cfg, [])}
    for obj in cfg.objectives:
        stages[f"stage1/{obj}"] = make_stage(f"stage1/{obj}", "stage1", cfg.stage1_config.format(objective=obj),
                                             out / "stage1" / obj, cfg, [])
    teacher = stages[f"stage1/{cfg.maskembed_teacher}"]
    stages[f"maskembed/{cfg.maskembed_teacher}"] = make_stage(
        f"maskembed/{cfg.maskembed_teacher}", "maskembed", cfg.maskembed_config,
        out / "maskembed" / cfg.maskembed_teacher, cfg, [f"maskembed.teacher={teacher.final}"])
    tower = stages[f"stage1/{cfg.stage2_tower}"].final
    for bridge in cfg.bridges:
        stages[f"stage2/{bridge}"] = make_stage(
            f"stage2/{bridge}", "stage2", cfg.stage2_config.format(bridge=bridge), out / "stage2" / bridge, cfg,
            [f"model.vision_tower={tower}", f"model.llm={stages['lm'].final}"])
    return stages


def run_demo(out: str | Path, config_path: str | None = None, overrides: list[str] | None = None) -> Path:
    """Run the whole pipeline into ``out`` and return the path of ``out/report.md``."""
    cfg = load_config(DemoConfig, config_path, [f"out_dir={out}", *(overrides or [])])
    stages = plan(cfg)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "demo.yaml")
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    timings = Timings(out / "timings.json")
    t_start = time.perf_counter()

    from vlm.world.export import ensure_world

    world_dir = out / "world"
    timed("world", timings, ensure_world, world_dir, cfg.world)
    for stage in stages.values():
        run_stage(stage, timings)

    # Encoder evals: every stage-one tower, and the MaskEmbed student beside its teacher.
    from eval.encoder import run as run_encoder_eval

    encoder_rows: dict[str, dict[str, float]] = {}
    heatmaps = {}
    for name, stage in stages.items():
        if stage.recipe not in ("stage1", "maskembed"):
            continue
        text_from = str(stages[f"stage1/{cfg.maskembed_teacher}"].final) if stage.recipe == "maskembed" else None
        eval_dir = out / "eval" / name.replace("/", "_")
        summary = timed(f"eval encoder {name}", timings, _cached_json, eval_dir / "summary.json", run_encoder_eval,
                        str(stage.final), str(eval_dir), world=cfg.world, world_dir=str(world_dir),
                        text_from=text_from, limit=cfg.eval_limit)
        encoder_rows[name] = flatten_metrics(summary)
        obj = name.split("/", 1)[1]
        drawn = eval_dir / "heatmaps.png"  # the encoder eval draws the alignment heatmaps of every tower
        if stage.recipe == "stage1" and obj in cfg.heatmap_objectives and drawn.is_file():
            heatmaps[obj] = out / "figures" / f"heatmaps_{obj}.png"
            heatmaps[obj].parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(drawn, heatmaps[obj])

    # VLM evals.
    from eval.harness import run_vlm_eval

    vlm_rows: dict[str, dict[str, float]] = {}
    for name, stage in stages.items():
        if stage.recipe != "stage2":
            continue
        eval_dir = out / "eval" / name.replace("/", "_")
        summary = timed(f"eval vlm {name}", timings, _cached_json, eval_dir / "all_summary.json", run_vlm_eval,
                        str(stage.final), list(cfg.vlm_tasks), str(eval_dir), world_dir=str(world_dir),
                        limit=cfg.eval_limit)
        vlm_rows[name] = flatten_metrics(summary)

    curves = plot_training_curves({n: s.out_dir for n, s in stages.items()}, out / "figures" / "training_curves.png")
    if (world_dir / "contact_sheet.png").is_file():
        (out / "figures").mkdir(exist_ok=True)
        shutil.copy(world_dir / "contact_sheet.png", out / "figures" / "contact_sheet.png")
    total = time.perf_counter() - t_start
    report = write_report(out, cfg, timings, total, encoder_rows, vlm_rows, curves, heatmaps)
    print(report.read_text())
    return report


def write_report(out: Path, cfg: DemoConfig, timings: Timings, total: float, encoder_rows: dict,
                 vlm_rows: dict, curves: Path | None, heatmaps: dict[str, Path]) -> Path:
    """Write ``out/report.md``: timings, encoder and VLM tables, and links to the figures."""
    secs = timings.seconds
    top = sorted(secs.items(), key=lambda kv: -kv[1])[:3]
    lines = [
        "# sparc-vlm demo report",
        "",
        f"World: {cfg.world.n_train} train / {cfg.world.n_eval} eval images at {cfg.world.image_size}px "
        f"(seed {cfg.world.seed}). Config: `demo.yaml`. Wall time of this run: {total / 60:.1f} min"
        + (f" (reused: {', '.join(timings.reused)})" if timings.reused else "") + ".",
        "Dominant stages: " + ", ".join(f"{k} {v:.0f}s" for k, v in top) + ".",
        "",
        "## Encoders (stage one, MaskEmbed)",
        "",
    ]
    cols = pick_columns(encoder_rows, ENCODER_COLUMNS)
    lines.append(markdown_table(["tower", *cols], [[n, *[r.get(c) for c in cols]] for n, r in encoder_rows.items()]))
    lines += ["", "Per-example predictions and full summaries: `eval/<tower>/`.", "",
              "## Vision-language models (stage two)", ""]
    cols = pick_columns(vlm_rows, VLM_COLUMNS)
    lines.append(markdown_table(["model", *cols], [[n, *[r.get(c) for c in cols]] for n, r in vlm_rows.items()]))
    lines += ["", "Per-task predictions (jsonl), summaries and tables: `eval/stage2_<bridge>/<task>/`.", "",
              "## Wall time by stage", ""]
    lines.append(markdown_table(["stage", "seconds"], [[k, v] for k, v in secs.items()]))
    lines += ["", "## Figures", ""]
    if curves:
        lines += ["Training curves:", "", f"![training curves]({curves.relative_to(out)})", ""]
    for obj, png in heatmaps.items():
        lines += [f"SPARC alignment weights of the `{obj}` checkpoint (each caption token over the patch grid):", "",
                  f"![heatmaps {obj}]({png.relative_to(out)})", ""]
    if (out / "figures" / "contact_sheet.png").is_file():
        lines += ["The world (contact sheet with boxes and captions):", "", "![contact sheet](figures/contact_sheet.png)", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
