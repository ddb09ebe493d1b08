"""``vlm demo``: from nothing to a results table on the synthetic world.

Order: world -> tiny LLM -> the shared tower pretraining (``tower_config``) -> stage one (each objective
from that tower, and ``from_scratch`` ones again from random weights) -> MaskEmbed (one tower) -> stage two
(one tower, each bridge; and the oracle tower, ``vlm.model.oracle``) -> encoder evals, heatmaps,
VLM evals (the headline one's grounding attention drawn too), the controls (the headline VLM with blank
images; the oracle VLM) -> ``DIR/results.json``
(the headline numbers, ``vlm.cli.results``) and ``DIR/report.md``.
Every stage's config is resolved before the first one starts, so a bad value fails at once.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Sequence

import torch

from eval.encoder import REPORT_COLUMNS as ENCODER_COLUMNS
from eval.encoder import run as run_encoder_eval
from eval.harness import run_vlm_eval
from eval.report import (cached_json, jsonable, markdown_table, metrics_table, plot_training_curves, write_json,
                         write_text)
from eval.tasks import VLM_REPORT_COLUMNS
from eval.text_probe import probe_llm
from training.runlock import RunLock
from vlm.cli.jobs import Job, run_jobs
from vlm.cli.pipeline import (Stage, Timings, flatten_metrics, make_stage, stage1_init, stage2_features, stage_needs,
                              start_run, timed, tower_stage, train_stage)
from vlm.cli.results import chance_levels, headline_results, majority_rate, pointing_chance, results_markdown
from vlm.config import DemoConfig, load_config
from vlm.data.formats import read_vsr
from vlm.files import read_json
from vlm.model.bridges import BRIDGES
from vlm.model.oracle import ORACLE
from vlm.world.export import ensure_world
from vlm.world.generator import world_split

ORACLE_STAGE = "stage2/oracle"
HEATMAP_IMAGES = 4  # images per heatmap figure


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
    checkpointed) and eval (reused when its summary reads), ``cfg.jobs`` at a time, then the
    figures and the report."""
    out, timings = start_run(cfg, "demo.yaml")
    t_start = time.perf_counter()

    world_dir = out / "world"
    timed("world", timings, ensure_world, world_dir, cfg.world, workers=cfg.threads or None)  # threads bound the renderers too
    evals = eval_jobs(cfg, stages, world_dir)
    run_jobs([*stage_jobs(cfg, stages), *evals], timings, cfg.jobs, job_threads(cfg.jobs, cfg.threads), out / "logs")
    summaries = {job.name: read_json(job.done, "eval summary") for job in evals}
    encoder_rows, heatmaps = encoder_results(cfg, stages, summaries)
    vlm_rows = {name: flatten_metrics(summaries[f"eval vlm {name}"]) for name in vlm_stages(stages)}
    sources = {"encoder": encoder_rows.get(f"stage1/{cfg.stage2_tower}", {}),
               "vlm": vlm_rows.get(f"stage2/{cfg.headline_bridge}", {}),
               **control_results(cfg, summaries), "lm": flatten_metrics(summaries["eval text probe"])}
    curves = copy_figures(out, stages, world_dir)
    attention = attention_figure(cfg, summaries)
    total = time.perf_counter() - t_start
    results = write_results(out, cfg, sources, encoder_rows, vlm_rows, total, timings)
    report = write_report(out, cfg, timings, total, encoder_rows, {**vlm_rows, **control_rows(cfg, sources)}, curves,
                          heatmaps, headline_section(cfg, stages, world_dir, results, sources), attention)
    print(report.read_text())
    return report


def job_threads(n_jobs: int, threads: int) -> int:
    """Torch threads per job: the run's threads (``threads``, else torch's default) shared by ``n_jobs``."""
    return max(1, (threads or torch.get_num_threads()) // max(1, n_jobs))


def stage_jobs(cfg: DemoConfig, stages: dict[str, Stage]) -> list[Job]:
    """Every stage as a job needing the stages it reads, the headline chain (LM, tower, the
    stage-two tower, stage two) listed first: with jobs side by side, the longest path starts first."""
    needs = stage_needs(stages)
    first = ["lm", "tower", f"stage1/{cfg.stage2_tower}", *(f"stage2/{b}" for b in cfg.bridges)]
    order = [n for n in first if n in stages] + [n for n in stages if n not in first]
    return [Job(n, train_stage, (stages[n],), needs=needs[n], done=stages[n].final) for n in order]


def vlm_stages(stages: dict[str, Stage]) -> list[str]:
    """The stage-two models evaluated on every VLM task (the oracle one is a control)."""
    return [name for name, s in stages.items() if s.recipe == "stage2" and name != ORACLE_STAGE]


def eval_jobs(cfg: DemoConfig, stages: dict[str, Stage], world_dir: Path) -> list[Job]:
    """Every eval of the report as a job (named as in the timings, ``done`` = its saved summary):
    each stage-two model on ``cfg.vlm_tasks``, the headline one with blank images, the oracle VLM,
    every stage-one and MaskEmbed tower, the LLM's text probe."""
    out = Path(cfg.out_dir)
    headline = f"stage2/{cfg.headline_bridge}"
    vlm = [(name, name, list(cfg.vlm_tasks) + (attention_tasks(cfg) if name == headline else []), False)
           for name in vlm_stages(stages)]
    if cfg.blank_tasks:
        vlm.append((headline, f"{headline}_blank", list(cfg.blank_tasks), True))
    if ORACLE_STAGE in stages and cfg.oracle_tasks:
        vlm.append((ORACLE_STAGE, ORACLE_STAGE, list(cfg.oracle_tasks), False))
    jobs = []
    for stage_name, name, tasks, blank in vlm:
        eval_dir = out / "eval" / name.replace("/", "_")
        jobs.append(Job(f"eval vlm {name}", cached_json, (eval_dir / "all_summary.json", run_vlm_eval,
                                                         str(stages[stage_name].final), tasks, str(eval_dir)),
                        dict(world_dir=str(world_dir), limit=cfg.eval_limit, blank_image=blank),
                        needs=[stage_name], done=eval_dir / "all_summary.json"))
    for name, stage in stages.items():
        if stage.recipe not in ("stage1", "maskembed"):
            continue
        teacher = f"stage1/{cfg.maskembed_teacher}"
        text_from = str(stages[teacher].final) if stage.recipe == "maskembed" else None
        eval_dir = out / "eval" / name.replace("/", "_")
        jobs.append(Job(f"eval encoder {name}", cached_json,
                        (eval_dir / "summary.json", run_encoder_eval, str(stage.final), str(eval_dir)),
                        dict(world=cfg.world, world_dir=str(world_dir), text_from=text_from, limit=cfg.eval_limit,
                             heatmap_images=HEATMAP_IMAGES if shows_heatmaps(cfg, name) else 0),
                        needs=[name], done=eval_dir / "summary.json"))
    probe_dir = out / "eval" / "lm"
    jobs.append(Job("eval text probe", cached_json, (probe_dir / "text_probe" / "summary.json", probe_llm,
                                                    str(stages["lm"].final), str(world_dir), str(probe_dir)),
                    dict(limit=cfg.eval_limit), needs=["lm"], done=probe_dir / "text_probe" / "summary.json"))
    return jobs


def attention_tasks(cfg: DemoConfig) -> list[str]:
    """["grounding_attention"] when the headline VLM's attention is drawn (``cfg.grounding_attention`` and a
    bridge whose image tokens sit in the LLM's sequence) and ``vlm_tasks`` does not already hold it, else []."""
    wanted = cfg.grounding_attention and BRIDGES[cfg.headline_bridge].tokens_in_sequence
    return ["grounding_attention"] if wanted and "grounding_attention" not in cfg.vlm_tasks else []


def attention_figure(cfg: DemoConfig, summaries: dict[str, dict]) -> list[str]:
    """Copy the headline VLM's grounding-attention maps to ``figures/grounding_attention.png`` -> the
    report's lines about them ([] when they were not drawn)."""
    out = Path(cfg.out_dir)
    summary = summaries.get(f"eval vlm stage2/{cfg.headline_bridge}", {}).get("grounding_attention")
    drawn = out / "eval" / f"stage2_{cfg.headline_bridge}" / "grounding_attention" / "attention.png"
    if not summary or not drawn.is_file():
        return []
    png = out / "figures" / "grounding_attention.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(drawn, png)
    m = {k: "n/a" if v is None else f"{v:.3f}" for k, v in summary.items() if not isinstance(v, (list, dict, str))}
    return [f"Where the `{cfg.headline_bridge}` VLM's LLM looks as it starts a box (attention from the answer's `[` "
            f"over the image tokens, cyan: the referred object; `eval/grounding_attention.py`): pointing "
            f"{m['pointing']} (chance {m['pointing_chance']}), attention per patch on the referred object "
            f"{m['target_enrichment']}x uniform, on any object {m['objects_enrichment']}x, selection {m['selection']} "
            "(1: no preference for the named object).", "", f"![grounding attention]({png.relative_to(out)})", ""]


def shows_heatmaps(cfg: DemoConfig, name: str) -> bool:
    """Whether the report shows the alignment heatmaps of stage ``name`` (only those are drawn)."""
    return name.startswith("stage1/") and name.split("/", 1)[1] in cfg.heatmap_objectives


def encoder_results(cfg: DemoConfig, stages: dict[str, Stage],
                    summaries: dict[str, dict]) -> tuple[dict[str, dict[str, float]], dict[str, Path]]:
    """Every stage-one tower's and the MaskEmbed student's eval -> ({stage name: flat metrics},
    {objective: heatmaps PNG copied under figures/})."""
    out = Path(cfg.out_dir)
    rows: dict[str, dict[str, float]] = {}
    heatmaps: dict[str, Path] = {}
    for name, stage in stages.items():
        if stage.recipe not in ("stage1", "maskembed"):
            continue
        rows[name] = flatten_metrics(summaries[f"eval encoder {name}"])
        obj = name.split("/", 1)[1]
        drawn = out / "eval" / name.replace("/", "_") / "heatmaps.png"  # drawn by the eval (eval_jobs)
        if shows_heatmaps(cfg, name) and drawn.is_file():
            heatmaps[obj] = out / "figures" / f"heatmaps_{obj}.png"
            heatmaps[obj].parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(drawn, heatmaps[obj])
    return rows, heatmaps


def control_results(cfg: DemoConfig, summaries: dict[str, dict]) -> dict[str, dict[str, float]]:
    """The headline VLM with blank images and the oracle VLM -> {"vlm_blank": flat metrics,
    "oracle": flat metrics} (an empty row for a control not run)."""
    blank = summaries.get(f"eval vlm stage2/{cfg.headline_bridge}_blank")
    oracle = summaries.get(f"eval vlm {ORACLE_STAGE}")
    return {"vlm_blank": flatten_metrics(blank) if blank else {}, "oracle": flatten_metrics(oracle) if oracle else {}}


def control_rows(cfg: DemoConfig, sources: dict) -> dict[str, dict[str, float]]:
    """The controls that ran, as rows of the report's VLM table."""
    rows = {f"stage2/{cfg.headline_bridge} (blank images)": sources["vlm_blank"], ORACLE_STAGE: sources["oracle"]}
    return {name: row for name, row in rows.items() if row}


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
                 vlm_rows: dict, curves: Path | None, heatmaps: dict[str, Path], headline: list[str],
                 attention: Sequence[str] = ()) -> Path:
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
    lines += figure_lines(out, curves, heatmaps) + list(attention)
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
