"""Running recipes back to back: the shared machinery of ``vlm demo`` and ``vlm ablate``.

A ``Stage`` is one recipe run (its config fully resolved before anything starts). ``run_stage``
reuses a stage whose ``final/`` exists, resumes one that has checkpoints, and times the rest, so a
second pipeline run is fast and an interrupted one picks up where it stopped. Recipes come from
the one table, ``training.recipes.RECIPES``; a stage that reads the embedded world makes it first
(``vlm.cli.train.make_world``), as ``vlm train`` does.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from training.recipes import RECIPES
from vlm.cli.train import make_world
from vlm.config import CONV_ARCHS, PipelineConfig, WorldConfig, load_config, save_config
from vlm.files import atomic_write_text


@dataclass
class Stage:
    """One recipe run: ``recipe`` in RECIPES, its resolved config and where it writes."""

    name: str  # e.g. "stage1/sparc/seed0"
    recipe: str
    cfg: Any
    out_dir: Path

    @property
    def final(self) -> Path:
        return self.out_dir / "final"


@dataclass
class Timings:
    """Wall seconds per stage name, written to ``path`` as JSON as they accrue.

    A second (or resumed) pipeline run starts from the seconds already in ``path``: a reused
    stage keeps the time measured when it ran (0 if none was recorded), so the file always holds
    what each stage cost; ``reused`` lists the stages this run did not redo.
    """

    path: Path
    seconds: dict[str, float] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)
    measured: set[str] = field(default_factory=set)  # names timed by this run

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if not self.seconds and self.path.is_file():
            try:
                self.seconds = {k: float(v) for k, v in json.loads(self.path.read_text())["seconds"].items()}
            except (ValueError, KeyError, TypeError, AttributeError):
                self.seconds = {}  # an unreadable file from a killed run: start afresh

    def add(self, name: str, seconds: float, reused: bool = False) -> None:
        """Record ``seconds`` for ``name``; a reused stage keeps an earlier measurement (one of
        this run's, when it ran here moments ago, is not a reuse)."""
        if reused and name in self.measured:
            return
        if reused:
            self.reused.append(name)
            self.seconds.setdefault(name, 0.0)
        else:
            self.seconds[name] = round(seconds, 2)
            self.measured.add(name)
        atomic_write_text(self.path, json.dumps({"seconds": self.seconds, "reused": self.reused}, indent=2))


def world_overrides(world: WorldConfig) -> list[str]:
    """Dotted overrides that set a recipe's ``world`` section to ``world``."""
    return [f"world.{f.name}={getattr(world, f.name)}" for f in fields(WorldConfig)]


def make_stage(name: str, recipe: str, yaml_path: str, out_dir: Path, pipe: PipelineConfig,
               overrides: list[str]) -> Stage:
    """Resolve a recipe's config (YAML <- world <- out_dir <- overrides); raises ConfigError now."""
    world_dir = Path(pipe.out_dir) / "world"
    base = [*world_overrides(pipe.world), f"data.world_dir={world_dir}", f"run.out_dir={out_dir}"]
    extra = {"tower": pipe.tower_overrides, "lm": pipe.lm_overrides, "stage1": pipe.stage1_overrides,
             "maskembed": pipe.maskembed_overrides, "stage2": pipe.stage2_overrides}[recipe]
    cfg = load_config(RECIPES[recipe].config_class, yaml_path, [*base, *extra, *overrides])
    return Stage(name=name, recipe=recipe, cfg=cfg, out_dir=Path(out_dir))


def tower_stage(pipe: PipelineConfig, out: Path) -> Stage | None:
    """The shared tower pretraining stage of ``pipe.tower_config`` (None without one)."""
    if pipe.tower_config is None:
        return None
    return make_stage("tower", "tower", pipe.tower_config, out / "tower", pipe, [])


def stage1_init(tower: Stage | None) -> list[str]:
    """Stage-one overrides that start the vision tower from ``tower``'s weights (none: random)."""
    return [] if tower is None else [f"model.vision.pretrained={tower.final}"]


def stage2_features(stage1: Stage) -> list[str]:
    """Stage-two overrides for a conv tower (no CLS, no penultimate grid): the last stage's full grid."""
    if stage1.cfg.model.vision.arch in CONV_ARCHS:
        return ["model.vision_feature_layer=-1", "model.vision_feature_select_strategy=full"]
    return []


def has_checkpoint(out_dir: Path) -> bool:
    """Whether a run dir holds at least one complete checkpoint (so it can be resumed)."""
    ckpts = Path(out_dir) / "checkpoints"
    return ckpts.is_dir() and any(p.name.startswith("step_") for p in ckpts.iterdir())


def train_stage(stage: Stage) -> Path:
    """Run one stage's recipe (resumed from its checkpoints if it has any) and return its final dir."""
    stage.cfg.run.resume = has_checkpoint(stage.out_dir)
    verb = "resuming" if stage.cfg.run.resume else "running"
    print(f"[pipeline] {stage.name}: {verb} -> {stage.out_dir}", flush=True)
    recipe = RECIPES[stage.recipe]
    make_world(recipe, stage.cfg)  # a no-op when the pipeline already made this world
    return Path(recipe.run(stage.cfg))


def run_stage(stage: Stage, timings: Timings) -> Path:
    """Run (or reuse, or resume) one stage and return its final artifact dir."""
    if stage.final.is_dir():
        print(f"[pipeline] {stage.name}: reusing {stage.final}")
        timings.add(stage.name, 0.0, reused=True)
        return stage.final
    t0 = time.perf_counter()
    final = train_stage(stage)
    timings.add(stage.name, time.perf_counter() - t0)
    return final


def stage_needs(stages: dict[str, Stage]) -> dict[str, list[str]]:
    """{stage name: the stages it reads}: those whose ``final`` dir its resolved config names
    (a stage-one run its tower's, stage two its tower's and LLM's, MaskEmbed its teacher's)."""
    text = {name: json.dumps(asdict(s.cfg), default=str) for name, s in stages.items()}
    return {name: [other for other, s in stages.items() if other != name and f'"{s.final}"' in text[name]]
            for name in stages}


def timed(name: str, timings: Timings, fn, *args, **kwargs):
    """Call ``fn`` and record its wall time under ``name``."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    timings.add(name, time.perf_counter() - t0)
    return out


def flatten_metrics(summary: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested summary dict as {"a/b/c": value} (bools and NaNs dropped)."""
    out: dict[str, float] = {}
    if isinstance(summary, dict):
        for k, v in summary.items():
            out.update(flatten_metrics(v, f"{prefix}{k}/" if not isinstance(v, (int, float)) else f"{prefix}{k}"))
    elif isinstance(summary, (int, float)) and not isinstance(summary, bool):
        if math.isfinite(summary):
            out[prefix.rstrip("/")] = float(summary)
    return out


# t_{0.975, df} for two-sided 95% confidence intervals (df = n - 1 seeds).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t975(df: int) -> float:
    """Student-t 0.975 quantile for ``df`` degrees of freedom (table; conservative between rows)."""
    if df <= 0:
        return math.nan
    keys = sorted(_T975)
    for k in keys:
        if df <= k:
            return _T975[k]
    return 1.96


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95% t-interval of the mean of ``values``; NaN bounds when n < 2."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def start_run(cfg: PipelineConfig, config_name: str) -> tuple[Path, Timings]:
    """Create ``cfg.out_dir``, save ``cfg`` there as ``config_name``, apply ``cfg.threads`` -> (out dir,
    the run's Timings)."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / config_name)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return out, Timings(out / "timings.json")
