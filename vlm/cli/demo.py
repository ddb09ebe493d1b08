"""``vlm demo``: from nothing to a results table on the synthetic world.

Order: world -> tiny LLM -> the shared tower pretraining (``tower_config``) -> stage one (each objective
from that tower, and ``from_scratch`` ones again from random weights) -> MaskEmbed (one tower) -> stage two
(one tower, each bridge; and the oracle tower, ``vlm.model.oracle``) -> encoder evals, heatmaps,
VLM evals, the controls (the headline VLM with blank images; the oracle VLM) -> ``DIR/results.json``
(the headline numbers, ``vlm.cli.results``) and ``DIR/report.md``.
Every stage's config is resolved before the first one starts, so a bad value fails at once.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from eval.encoder import REPORT_COLUMNS as ENCODER_COLUMNS
from eval.encoder import run as run_encoder_eval
from eval.harness import run_vlm_eval
from eval.report import (cached_json, jsonable, markdown_table, metrics_table, plot_training_curves, write_json,
                         write_text)
from eval.tasks import VLM_REPORT_COLUMNS
from eval.text_probe import probe_llm
from training.runlock import RunLock
from vlm.cli.pipeline import (Stage, Timings, flatten_metrics, make_stage, run_stage, stage1_init, stage2_features,
                              start_run, timed, tower_stage)
from vlm.cli.results import chance_levels, headline_results, majority_rate, pointing_chance, results_markdown
from vlm.config import DemoConfig, load_config
from vlm.data.formats import read_vsr
from vlm.model.oracle import ORACLE
from vlm.world.export import ensure_world
from vlm.world.generator import world_split

ORACLE_STAGE = "stage2/oracle"


def plan(cfg: DemoConfig) -> dict[str, Stage]:
    """Every stage of the demo with its resolved config (raises ConfigError before any work)."""
    out = Path(cfg.out_dir)
    stages: dict[str, Stage] = {"lm": make_stage("lm", "lm", cfg.lm_config, out / "lm", cfg, [])}
    tower = tower_stage(cfg, out)
    if tower is not None:
        stages["tower"] = tower
    for obj in cfg.objectives:
        stages[f"stage1/{obj}"] = make_stage(f"stage1/{obj}", "stage1", cfg.stage1_config.format(objective=obj),
                                             out / "stage1" / obj, cfg, stage1_init(tower))
    for obj in cfg.from_scratch:
        stages[f"stage1/{obj}_scratch"] = make_stage(f"stage1/{obj}_scratch", "stage1",
                                                     cfg.stage1_config.format(objective=obj),
                                                     out / "stage1" / f"{obj}_scratch", cfg, [])
    teacher = stages[f"stage1/{cfg.maskembed_teacher}"]
    stages[f"maskembed/{cfg.maskembed_teacher}"] = make_stage(
        f"maskembed/{cfg.maskembed_teacher}", "maskembed", cfg.maskembed_config,
        out / "maskembed" / cfg.maskembed_teacher, cfg, [f"maskembed.teacher={teacher.final}"])
    headline = stages[f"stage1/{cfg.stage2_tower}"]
    for bridge in cfg.bridges:
        stages[f"stage2/{bridge}"] = make_stage(
            f"stage2/{bridge}", "stage2", cfg.stage2_config.format(bridge=bridge), out / "stage2" / bridge, cfg,
            [f"model.vision_tower={headline.final}", f"model.llm={stages['lm'].final}", *stage2_features(headline)])
    if cfg.oracle_bridge:
        stages[ORACLE_STAGE] = make_stage(
            ORACLE_STAGE, "stage2", cfg.stage2_config.format(bridge=cfg.oracle_bridge), out / "stage2" / "oracle",
            cfg, [f"model.vision_tower={ORACLE}", f"model.llm={stages['lm'].final}", *cfg.oracle_overrides])
    return stages


def run_demo(out: str | Path, config_path: str | None = None, overrides: list[str] | None = None) -> Path:
    """Run the whole pipeline into ``out`` and return the path of ``out/report.md``."""
    cfg = load_config(DemoConfig, config_path, [f"out_dir={out}", *(overrides or [])])
    stages = plan(cfg)
    with RunLock(cfg.out_dir):  # a second demo into the same dir stops here (stages lock their own dirs)
        return _run_demo(cfg, stages)


def _run_demo(cfg: DemoConfig, stages: dict[str, Stage]) -> Path:
    """``run_demo``'s work, under the out dir's lock: every stage (reused when final, resumed when
    checkpointed), the evals (reused when their summary reads), the figures and the report."""
    out, timings = start_run(cfg, "demo.yaml")
    t_start = time.perf_counter()

    world_dir = out / "world"
    timed("world", timings, ensure_world, world_dir, cfg.world)
    for stage in stages.values():
        run_stage(stage, timings)
    encoder_rows, heatmaps = encoder_evals(cfg, stages, world_dir, timings)
    vlm_rows = vlm_evals(cfg, stages, world_dir, timings)
    sources = {"encoder": encoder_rows.get(f"stage1/{cfg.stage2_tower}", {}),
               "vlm": vlm_rows.get(f"stage2/{cfg.headline_bridge}", {}),
               **control_evals(cfg, stages, world_dir, timings), "lm": lm_rows(cfg, stages, world_dir, timings)}
    curves = copy_figures(out, stages, world_dir)
    total = time.perf_counter() - t_start
    results = write_results(out, cfg, sources, encoder_rows, vlm_rows, total, timings)
    report = write_report(out, cfg, timings, total, encoder_rows, {**vlm_rows, **control_rows(cfg, sources)}, curves,
                          heatmaps, headline_section(cfg, stages, world_dir, results, sources))
    print(report.read_text())
    return report


def encoder_evals(cfg: DemoConfig, stages: dict[str, Stage], world_dir: Path,
                  timings: Timings) -> tuple[dict[str, dict[str, float]], dict[str, Path]]:
    """Every stage-one tower and the MaskEmbed student (scored with its teacher's text side) ->
    ({stage name: flat metrics}, {objective: heatmaps PNG copied under figures/})."""
    out = Path(cfg.out_dir)
    rows: dict[str, dict[str, float]] = {}
    heatmaps: dict[str, Path] = {}
    for name, stage in stages.items():
        if stage.recipe not in ("stage1", "maskembed"):
            continue
        text_from = str(stages[f"stage1/{cfg.maskembed_teacher}"].final) if stage.recipe == "maskembed" else None
        eval_dir = out / "eval" / name.replace("/", "_")
        summary = timed(f"eval encoder {name}", timings, cached_json, eval_dir / "summary.json", run_encoder_eval,
                        str(stage.final), str(eval_dir), world=cfg.world, world_dir=str(world_dir),
                        text_from=text_from, limit=cfg.eval_limit)
        rows[name] = flatten_metrics(summary)
        obj = name.split("/", 1)[1]
        drawn = eval_dir / "heatmaps.png"  # the encoder eval draws the alignment heatmaps of every tower
        if stage.recipe == "stage1" and obj in cfg.heatmap_objectives and drawn.is_file():
            heatmaps[obj] = out / "figures" / f"heatmaps_{obj}.png"
            heatmaps[obj].parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(drawn, heatmaps[obj])
    return rows, heatmaps


def vlm_evals(cfg: DemoConfig, stages: dict[str, Stage], world_dir: Path,
              timings: Timings) -> dict[str, dict[str, float]]:
    """Every stage-two model on ``cfg.vlm_tasks`` -> {stage name: flat metrics}."""
    rows: dict[str, dict[str, float]] = {}
    for name, stage in stages.items():
        if stage.recipe != "stage2" or name == ORACLE_STAGE:
            continue
        rows[name] = vlm_eval(cfg, stage, name, list(cfg.vlm_tasks), world_dir, timings)
    return rows


def vlm_eval(cfg: DemoConfig, stage: Stage, name: str, tasks: list[str], world_dir: Path, timings: Timings,
             blank: bool = False) -> dict[str, float]:
    """One stage-two model on ``tasks`` (``blank``: every image blanked) into ``eval/<name>/`` -> flat metrics."""
    eval_dir = Path(cfg.out_dir) / "eval" / name.replace("/", "_")
    summary = timed(f"eval vlm {name}", timings, cached_json, eval_dir / "all_summary.json", run_vlm_eval,
                    str(stage.final), tasks, str(eval_dir), world_dir=str(world_dir), limit=cfg.eval_limit,
                    blank_image=blank)
    return flatten_metrics(summary)


def control_evals(cfg: DemoConfig, stages: dict[str, Stage], world_dir: Path,
                  timings: Timings) -> dict[str, dict[str, float]]:
    """The headline VLM with blank images (``cfg.blank_tasks``) and the oracle VLM (``cfg.oracle_tasks``)
    -> {"vlm_blank": flat metrics, "oracle": flat metrics} (an empty row for a control not run)."""
    rows: dict[str, dict[str, float]] = {"vlm_blank": {}, "oracle": {}}
    headline = f"stage2/{cfg.headline_bridge}"
    if cfg.blank_tasks:
        rows["vlm_blank"] = vlm_eval(cfg, stages[headline], f"{headline}_blank", list(cfg.blank_tasks), world_dir,
                                     timings, blank=True)
    if ORACLE_STAGE in stages and cfg.oracle_tasks:
        rows["oracle"] = vlm_eval(cfg, stages[ORACLE_STAGE], ORACLE_STAGE, list(cfg.oracle_tasks), world_dir, timings)
    return rows


def control_rows(cfg: DemoConfig, sources: dict) -> dict[str, dict[str, float]]:
    """The controls that ran, as rows of the report's VLM table."""
    rows = {f"stage2/{cfg.headline_bridge} (blank images)": sources["vlm_blank"], ORACLE_STAGE: sources["oracle"]}
    return {name: row for name, row in rows.items() if row}


def lm_rows(cfg: DemoConfig, stages: dict[str, Stage], world_dir: Path, timings: Timings) -> dict[str, float]:
    """The frozen LLM's text-context probe (``eval.text_probe``: POPE / VSR answered from the caption,
    no image) -> flat metrics (``results.RESULT_KEYS`` source "lm")."""
    eval_dir = Path(cfg.out_dir) / "eval" / "lm"
    summary = timed("eval text probe", timings, cached_json, eval_dir / "text_probe" / "summary.json", probe_llm,
                    str(stages["lm"].final), str(world_dir), str(eval_dir), limit=cfg.eval_limit)
    return flatten_metrics(summary)


def write_results(out: Path, cfg: DemoConfig, sources: dict, encoder_rows: dict, vlm_rows: dict, total: float,
                  timings: Timings) -> dict:
    """Write ``out/results.json`` (``vlm.cli.results.headline_results``) and return it."""
    by_objective = {name.split("/", 1)[1]: row for name, row in encoder_rows.items() if name.startswith("stage1/")}
    by_bridge = {name.split("/", 1)[1]: row for name, row in vlm_rows.items()}
    results = headline_results(sources, by_objective, by_bridge, total, timings.seconds)
    write_json(out / "results.json", jsonable(results))
    return results


def headline_section(cfg: DemoConfig, stages: dict[str, Stage], world_dir: Path, results: dict,
                     sources: dict) -> list[str]:
    """The report's headline table: each number with its chance level (data-dependent ones measured here)."""
    patch = stages[f"stage1/{cfg.stage2_tower}"].cfg.model.vision.patch_size
    eval_ids = list(world_split(cfg.world)[1])[: cfg.eval_limit]
    vsr_path = world_dir / "vsr" / "test.jsonl"
    measured = {"pointing_acc": sources["encoder"].get("pointing_chance",
                                                       pointing_chance(cfg.world, eval_ids, patch))}
    if vsr_path.is_file():
        measured["vsr_acc"] = majority_rate([it.label for it in read_vsr(vsr_path)][: cfg.eval_limit])
    return [f"## Headline (`results.json`): the `{cfg.stage2_tower}` tower, the `{cfg.headline_bridge}` VLM", "",
            "Blank: the same VLM with every image replaced by a uniform one of the processor's mean colour. "
            "Oracle: stage two on the world's own annotation of each image (`model.vision_tower=oracle`).", "",
            results_markdown(results, chance_levels(measured))]


def copy_figures(out: Path, stages: dict[str, Stage], world_dir: Path) -> Path | None:
    """Draw ``figures/training_curves.png`` (returned; None without curves) and copy the world's contact sheet."""
    curves = plot_training_curves({n: s.out_dir for n, s in stages.items()}, out / "figures" / "training_curves.png")
    if (world_dir / "contact_sheet.png").is_file():
        (out / "figures").mkdir(exist_ok=True)
        shutil.copy(world_dir / "contact_sheet.png", out / "figures" / "contact_sheet.png")
    return curves


def write_report(out: Path, cfg: DemoConfig, timings: Timings, total: float, encoder_rows: dict,
                 vlm_rows: dict, curves: Path | None, heatmaps: dict[str, Path], headline: list[str]) -> Path:
    """Write ``out/report.md``: timings, the headline section, encoder and VLM tables, links to the figures."""
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
        *headline,
        "## Encoders (stage one, MaskEmbed)",
        "",
        metrics_table("tower", encoder_rows, ENCODER_COLUMNS),
        "", "Per-example predictions and full summaries: `eval/<tower>/`.", "",
        "## Vision-language models (stage two)", "",
        metrics_table("model", vlm_rows, VLM_REPORT_COLUMNS),
        "", "Per-task predictions (jsonl), summaries and tables: `eval/stage2_<bridge>/<task>/`.", "",
        "## Wall time by stage", "",
        markdown_table(["stage", "seconds"], [[k, v] for k, v in secs.items()], digits=3),
        "", "## Figures", "",
    ]
    lines += figure_lines(out, curves, heatmaps)
    return write_text(out / "report.md", "\n".join(lines) + "\n")


def figure_lines(out: Path, curves: Path | None, heatmaps: dict[str, Path]) -> list[str]:
    """The report's figure section: training curves, heatmaps per objective, the contact sheet."""
    lines = []
    if curves:
        lines += ["Training curves:", "", f"![training curves]({curves.relative_to(out)})", ""]
    for obj, png in heatmaps.items():
        lines += [f"SPARC alignment weights of the `{obj}` checkpoint (each caption token over the patch grid):", "",
                  f"![heatmaps {obj}]({png.relative_to(out)})", ""]
    if (out / "figures" / "contact_sheet.png").is_file():
        lines += ["The world (contact sheet with boxes and captions):", "", "![contact sheet](figures/contact_sheet.png)", ""]
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``vlm demo [--out DIR] [--config YAML] [overrides]``."""
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--config", default=None, help="a DemoConfig YAML (default: built-in)")
    parser.add_argument("overrides", nargs="*", help="DemoConfig overrides")
    parser.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    """``vlm demo``: every recipe and eval on the world, into ``--out``/report.md."""
    report = run_demo(args.out, config_path=args.config, overrides=args.overrides)
    print(f"report: {report}")
    return 0
