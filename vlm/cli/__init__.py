"""The ``vlm`` command line: one module per command group, each a thin shell over a library function.

    vlm world   --out DIR --n N --seed S          export the synthetic world in the real formats
    vlm train   stage1|lm|maskembed|stage2 --config YAML [--resume] [key.sub=value ...]
    vlm eval    encoder --ckpt DIR | vlm --ckpt DIR --tasks ... | drift --ckpt DIR
    vlm merge   --ckpt DIR --out DIR              standalone merged LLM + bridge for inference
    vlm demo    [--out DIR]                        everything, on the world, into DIR/report.md
    vlm ablate  --config YAML                      the backbone grid with seeds and CIs
    vlm config  list | show NAME [key=value ...]   the shipped configs; one resolved

``--config`` takes a path or a shipped config's name (``stage1/sparc_tiny``), from any folder.

Configs are validated (``vlm.config.load_config``) before any work starts; a bad value exits with
status 2 and a message naming the key; a missing optional extra (``vlm.extras``) exits with status 3
and one line naming it. The recipes are ``training.recipes.RECIPES``; ``vlm train``,
``vlm demo`` and ``vlm ablate`` export the embedded world before a recipe that reads it starts (the
training library only reads data that exists).

``COMMANDS`` names each command's module; a module has ``add_arguments(parser)`` (which sets
``func``) and imports what it needs at its top. Only the invoked command's module is imported,
so ``vlm --help`` answers at once and each command loads only its own stack.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional

from vlm.config import ConfigError
from vlm.extras import MissingExtra

COMMANDS: dict[str, tuple[str, str]] = {  # name -> (module, one-line help)
    "world": ("vlm.cli.world", "export the synthetic world in the real data formats"),
    "train": ("vlm.cli.train", "train one stage (a recipe: stage1, lm, maskembed, stage2)"),
    "eval": ("vlm.cli.eval", "evaluate an encoder or a VLM"),
    "merge": ("vlm.cli.merge", "write a standalone merged LLM + bridge"),
    "demo": ("vlm.cli.demo", "the whole pipeline on the world, into DIR/report.md"),
    "ablate": ("vlm.cli.ablate", "backbone ablation grid with seeds and 95%% CIs"),
    "config": ("vlm.cli.config", "list the shipped configs, or show one resolved"),
}


def _offline() -> None:
    """Nothing here may reach a hub: make that explicit for every library we call."""
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    """The ``vlm`` parser. Every command is listed; the arguments of ``only`` (default: every
    command) are added by importing its module from ``COMMANDS``."""
    parser = argparse.ArgumentParser(prog="vlm", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if only is None or name == only:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vlm`` console script. Returns the process exit status."""
    _offline()
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in COMMANDS else ""
    args = build_parser(only=command).parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"vlm: config error: {e}", file=sys.stderr)
        return 2
    except MissingExtra as e:
        print(f"vlm: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
