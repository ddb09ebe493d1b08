"""``vlm config list | show NAME [overrides]``: the shipped configs, and one resolved as a run would see it.

A config is named as ``--config`` takes it (``stage1/sparc_tiny``, or a path); ``show`` prints the
YAML after the dataclass defaults, the file and the overrides are merged and checked. The config's
class is the recipe of its folder (``stage1/`` -> ``vlm train stage1``, ``posttrain/`` -> maskembed,
``ablate/`` -> ``vlm ablate``), or ``--recipe`` for a file elsewhere.
"""
from __future__ import annotations

import argparse

from training.recipes import RECIPES
from vlm.config import AblateConfig, ConfigError, DemoConfig, config_names, load_config, resolve_config_path, to_yaml

PIPELINES = {"demo": DemoConfig, "ablate": AblateConfig}
FOLDER_RECIPES = {"stage1": "stage1", "stage2": "stage2", "lm": "lm", "posttrain": "maskembed", "tower": "tower",
                  "ablate": "ablate", "demo": "demo"}


def config_class(name: str, recipe: str | None) -> type:
    """The dataclass of config ``name``: ``recipe``'s, else the one of the folder holding the file."""
    if recipe is None:
        folder = resolve_config_path(name).parent.name
        recipe = FOLDER_RECIPES.get(folder)
        if recipe is None:
            raise ConfigError(f"--recipe: cannot tell the recipe of {name} from its folder {folder!r}; "
                              f"pass --recipe ({', '.join([*RECIPES, *PIPELINES])})")
    return PIPELINES[recipe] if recipe in PIPELINES else RECIPES[recipe].config_class


def cmd_show(args: argparse.Namespace) -> int:
    """``vlm config show NAME [--recipe R] [overrides]``: print the resolved YAML."""
    cfg = load_config(config_class(args.name, args.recipe), args.name, list(args.overrides))
    print(f"# {resolve_config_path(args.name)}")
    print(to_yaml(cfg), end="")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """``vlm config list``: every shipped config name."""
    print("\n".join(config_names()))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``vlm config list`` and ``vlm config show``."""
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("list", help="the shipped config names").set_defaults(func=cmd_list)
    show = sub.add_parser("show", help="a config resolved (defaults <- file <- overrides), as YAML")
    show.add_argument("name", help="a shipped config name (stage1/sparc_tiny) or a YAML path")
    show.add_argument("--recipe", choices=[*RECIPES, *PIPELINES], default=None,
                      help="the config's recipe (default: from its folder)")
    show.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. optim.lr=1e-3")
    show.set_defaults(func=cmd_show)
