"""The ``vlm`` command line: one module per command group, each a thin shell over a library function.

    vlm world   --out DIR --n N --seed S          export the synthetic world in the real formats
    vlm train   stage1|lm|maskembed|stage2 --config YAML [--resume] [key.sub=value ...]
    vlm eval    encoder --ckpt DIR | vlm --ckpt DIR|--hf-model DIR --tasks ... | drift --ckpt DIR
    vlm score   TASK --predictions FILE --out DIR ...   score outputs made elsewhere
    vlm generate --ckpt DIR|--hf-model DIR --image PATH --prompt TEXT   one answer, streamed
    vlm chat    --ckpt DIR|--hf-model DIR --image PATH   multi-turn, /image PATH to change the image
    vlm serve   --ckpt DIR|--hf-model DIR [--port P]     a local web page: upload an image, chat
    vlm merge   --ckpt DIR --out DIR              standalone merged LLM + bridge for inference
    vlm export  --ckpt DIR --format llava --out DIR   a stock LlavaForConditionalGeneration dir
    vlm demo    [--out DIR]                        everything, on the world, into DIR/report.md
    vlm ablate  --config YAML                      the backbone grid with seeds and CIs
    vlm config  list | show NAME [key=value ...]   the shipped configs; one resolved

``--config`` takes a path or a shipped config's name (``stage1/sparc_tiny``), from any folder.

Configs are validated (``vlm.config.load_config``) before any work starts; a bad value exits with
status 2 and a message naming the key. Every expected failure (``vlm.files.VlmError``: bad
config or data, a damaged checkpoint, a full disk, a busy run dir; or a missing / existing /
forbidden path) is caught once, in ``main``: one line on stderr, exit status 2; a missing optional
extra (``vlm.extras``) exits with status 3 and one line naming it. ``--debug`` (anywhere on the line)
shows the traceback instead. The recipes are ``training.recipes.RECIPES``; ``vlm train``,
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
from vlm.files import DiskFullError, VlmError, is_disk_full

COMMANDS: dict[str, tuple[str, str]] = {  # name -> (module, one-line help)
    "world": ("vlm.cli.world", "export the synthetic world in the real data formats"),
    "train": ("vlm.cli.train", "train one stage (a recipe: stage1, lm, maskembed, stage2)"),
    "eval": ("vlm.cli.eval", "evaluate an encoder or a VLM"),
    "score": ("vlm.cli.score", "score predictions made elsewhere (caption, chair, pope, refcoco, vsr)"),
    "generate": ("vlm.cli.generate", "answer one prompt about one image, streamed"),
    "chat": ("vlm.cli.chat", "a multi-turn conversation about an image in the terminal"),
    "serve": ("vlm.cli.serve", "a local web page to upload an image and chat with the model"),
    "merge": ("vlm.cli.merge", "write a standalone merged LLM + bridge"),
    "export": ("vlm.cli.export", "write a stage-two checkpoint as a stock transformers LLaVA dir"),
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
    parser.add_argument("--debug", action="store_true", help="show the traceback behind a one-line error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if only is None or name == only:
            importlib.import_module(module).add_arguments(p)
    return parser


# OSErrors that mean "this path is not what the command needs": expected, not a bug.
EXPECTED_OS_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


def one_line_error(e: BaseException) -> str | None:
    """The one-line message of an expected failure ``e``, or None when ``e`` is a bug (traceback)."""
    if is_disk_full(e) and not isinstance(e, DiskFullError):
        where = getattr(e, "filename", None)
        e = DiskFullError(f"disk full while writing {where or 'a file'}")
    if not isinstance(e, (VlmError, *EXPECTED_OS_ERRORS)):
        return None
    kind = "config error" if isinstance(e, ConfigError) else "error"
    text = " ".join(str(e).split()) or type(e).__name__
    return f"vlm: {kind}: {text}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vlm`` console script. Returns the process exit status: 0, 2 for an
    expected failure (one line on stderr; ``--debug`` raises it with its traceback), 130 on Ctrl-C."""
    _offline()
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    command = argv[0] if argv and argv[0] in COMMANDS else ""
    args = build_parser(only=command).parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("vlm: interrupted", file=sys.stderr)
        return 130
    except MissingExtra as e:
        if debug:
            raise
        print(f"vlm: {e}", file=sys.stderr)
        return 3
    except Exception as e:
        message = one_line_error(e)
        if message is None or debug:
            raise
        print(message, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
