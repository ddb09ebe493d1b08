"""``vlm train RECIPE``: validate the recipe's config, make the world it reads, run it.

The training library only reads data that exists; making the embedded synthetic world is the
command line's job (``make_world``, used here and by the pipelines of ``vlm demo`` / ``vlm ablate``).
Importing this module imports the training stacks (torch, transformers); ``vlm.cli`` imports it
only for ``vlm train`` (and the pipelines of ``vlm demo`` / ``vlm ablate``).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

from training import distributed
from training.recipes import RECIPES, Recipe
from vlm.config import load_config
from vlm.extras import check_extra
from vlm.world.export import ensure_world


def load_recipe_config(name: str, config_path: Optional[str], overrides: list[str]) -> Any:
    """Recipe ``name``'s config: its dataclass defaults <- ``config_path`` (default: the recipe's
    default YAML) <- dotted ``overrides``. Raises ``ConfigError`` before any work."""
    recipe = RECIPES[name]
    return load_config(recipe.config_class, config_path or recipe.default_config, overrides)


def make_world(recipe: Recipe, cfg: Any) -> Optional[Path]:
    """Export the synthetic world ``cfg.world`` into ``recipe.world_dir(cfg)`` unless it is already
    there (``ensure_world``); a world of other settings there is an error, never overwritten.
    Returns that dir, or None when the recipe reads other data.

    Under torchrun every rank runs the CLI: the process group is set up here (the recipe's ``run``
    reuses it), rank 0 alone exports and every rank waits at a barrier until it is done.
    """
    world_dir = recipe.world_dir(cfg)
    if world_dir is None:
        return None
    distributed.setup(cfg.run.device)
    if distributed.is_main():
        ensure_world(world_dir, cfg.world, replace=False)  # never overwrite another world someone made
    distributed.barrier()
    return world_dir


def cmd_train(args: argparse.Namespace) -> int:
    """``vlm train RECIPE [--config YAML] [--resume] [--teacher DIR] [overrides]``."""
    overrides = list(args.overrides)
    if args.resume:
        overrides.append("run.resume=true")
    if getattr(args, "teacher", None):
        overrides.append(f"maskembed.teacher={args.teacher}")
    cfg = load_recipe_config(args.recipe, args.config, overrides)
    if cfg.run.wandb:
        check_extra("wandb", "wandb", "run.wandb=true")  # before any work, not after the world export
    recipe = RECIPES[args.recipe]
    make_world(recipe, cfg)
    final = recipe.run(cfg)
    print(f"{args.recipe}: final artifact at {final}")
    return 0


OVERRIDES_HELP = "dotted config overrides, e.g. optim.lr=1e-3 run.out_dir=runs/x"


def add_arguments(train: argparse.ArgumentParser) -> None:
    """One sub-parser of ``vlm train`` per recipe in ``RECIPES``."""
    tsub = train.add_subparsers(dest="recipe", required=True, metavar="RECIPE")
    for name, recipe in RECIPES.items():
        cls_name, default_cfg = recipe.config_class.__name__, recipe.default_config
        t = tsub.add_parser(name, help=f"{cls_name} recipe (default {default_cfg})")
        t.add_argument("--config", default=None, help=f"YAML config (default {default_cfg})")
        t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
        if name == "maskembed":
            t.add_argument("--teacher", default=None, help="vision tower to post-train (a checkpoint dir)")
        t.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
        t.set_defaults(func=cmd_train)


__all__ = ["add_arguments", "cmd_train", "load_recipe_config", "make_world"]
