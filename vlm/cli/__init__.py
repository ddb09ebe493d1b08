"""The ``vlm`` command line: one subcommand per stage, each a thin shell over a library function.

    vlm world   --out DIR --n N --seed S          export the synthetic world in the real formats
    vlm train   stage1|lm|maskembed|stage2 --config YAML [--resume] [key.sub=value ...]
    vlm eval    encoder --ckpt DIR | vlm --ckpt DIR --tasks ... | drift --ckpt DIR
    vlm merge   --ckpt DIR --out DIR              standalone merged LLM + bridge for inference
    vlm demo    [--out DIR]                        everything, on the world, into DIR/report.md
    vlm ablate  --config YAML                      the backbone grid with seeds and CIs

Configs are validated (``vlm.config.load_config``) before any work starts; a bad value exits with
status 2 and a message naming the key. The recipes are ``training.recipes.RECIPES``; ``vlm train``,
``vlm demo`` and ``vlm ablate`` export the embedded world before a recipe that reads it starts (the
training library only reads data that exists). Heavy stacks are imported per command, so
``vlm --help`` is fast.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from vlm.config import VLM_TASK_NAMES, ConfigError, WorldConfig, load_config

# The names of eval.tasks.VLM_TASKS (tests/eval/test_tasks.py checks they agree); read from the config
# layer so `vlm --help` does not import torch through the eval registry.
VLM_TASKS = VLM_TASK_NAMES


def _offline() -> None:
    """Nothing here may reach a hub: make that explicit for every library we call."""
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ---------------------------------------------------------------------------------------------
# vlm world
# ---------------------------------------------------------------------------------------------


def cmd_world(args: argparse.Namespace) -> int:
    """``vlm world``: export the synthetic world ``--out`` (images, shards, COCO, LLaVA, POPE, ...)."""
    from vlm.world.export import export_world  # numpy, PIL, webdataset: only for this command

    overrides = [f"n_train={args.n}", f"seed={args.seed}", f"n_eval={args.n_eval}",
                 f"image_size={args.image_size}", *args.overrides]
    cfg = load_config(WorldConfig, args.config, overrides)
    counts = export_world(args.out, cfg, progress=True)
    print(json.dumps(counts, indent=2))
    print(f"world written to {args.out} (contact sheet: {Path(args.out) / 'contact_sheet.png'})")
    return 0


# ---------------------------------------------------------------------------------------------
# vlm train: vlm/cli/train.py (the recipes of training.recipes.RECIPES; it makes the world first)
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# vlm eval
# ---------------------------------------------------------------------------------------------


def _world_cfg(world_dir: str) -> WorldConfig:
    """The WorldConfig an exported world was made with (its world.json), or the defaults."""
    meta = Path(world_dir) / "world.json"
    if meta.is_file():
        saved = json.loads(meta.read_text()).get("config", {})
        return load_config(WorldConfig, None, [f"{k}={v}" for k, v in saved.items()])
    return WorldConfig()


def cmd_eval_encoder(args: argparse.Namespace) -> int:
    """``vlm eval encoder``: zero-shot, retrieval, patch segmentation and heatmaps on the world."""
    from eval.encoder import run as run_encoder_eval  # torch + transformers (~10 s): only for this command
    from vlm.world.export import ensure_world  # numpy, PIL, webdataset: only for this command

    world = _world_cfg(args.world_dir)
    ensure_world(args.world_dir, world)
    out = args.out or str(Path(args.ckpt) / "eval_encoder")
    summary = run_encoder_eval(args.ckpt, out, world=world, world_dir=args.world_dir,
                               text_from=args.text_from, limit=args.limit)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_eval_vlm(args: argparse.Namespace) -> int:
    """``vlm eval vlm``: the VLM tasks (captioning, CHAIR, POPE, RefCOCO, VSR) of a stage-two checkpoint."""
    from eval.harness import run_vlm_eval  # torch + transformers + peft: only for this command

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(tasks) - set(VLM_TASKS))
    if unknown:
        raise ConfigError(f"--tasks: unknown task(s) {unknown}; valid: {', '.join(VLM_TASKS)}")
    out = args.out or str(Path(args.ckpt) / "eval_vlm")
    summary = run_vlm_eval(args.ckpt, tasks, out, data=args.data, world_dir=args.world_dir,
                           limit=args.limit)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_eval_drift(args: argparse.Namespace) -> int:
    """``vlm eval drift``: the LLM's language ability before and after LoRA (lm-eval)."""
    from eval.lm_eval_adapter import run_language_drift  # torch + lm-eval: only for this command

    out = args.out or str(Path(args.ckpt) / "eval_drift")
    result = run_language_drift(args.ckpt, out, limit=args.limit, world_dir=args.world_dir)
    print(json.dumps(result, indent=2, default=str))
    return 0


# ---------------------------------------------------------------------------------------------
# vlm merge / demo / ablate
# ---------------------------------------------------------------------------------------------


def cmd_merge(args: argparse.Namespace) -> int:
    """``vlm merge``: a standalone merged LLM + bridge for inference."""
    from vlm.model.vision_language_model import VisionLanguageModel  # torch + transformers + peft

    model = VisionLanguageModel.from_pretrained(args.ckpt)
    model.merge_and_save(args.out)
    print(f"merged model written to {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``vlm demo``: every recipe and eval on the world, into ``--out``/report.md."""
    from vlm.cli.demo import run_demo  # the training and eval stacks: only for this command

    report = run_demo(args.out, config_path=args.config, overrides=args.overrides)
    print(f"report: {report}")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    """``vlm ablate``: the backbone grid with seeds and 95% CIs."""
    from vlm.cli.ablate import run_ablation  # the training and eval stacks: only for this command

    report = run_ablation(args.config, overrides=args.overrides)
    print(f"report: {report}")
    return 0


# ---------------------------------------------------------------------------------------------
# argument parsing
# ---------------------------------------------------------------------------------------------

OVERRIDES_HELP = "dotted config overrides, e.g. optim.lr=1e-3 run.out_dir=runs/x"


def _add_eval_parsers(sub: argparse._SubParsersAction) -> None:
    """``vlm eval encoder | vlm | drift``."""
    p = sub.add_parser("eval", help="evaluate an encoder or a VLM")
    esub = p.add_subparsers(dest="target", required=True, metavar="TARGET")
    e = esub.add_parser("encoder", help="zero-shot, retrieval, patch segmentation, heatmaps")
    e.add_argument("--ckpt", required=True, help="a stage-one, MaskEmbed or HF vision checkpoint dir")
    e.add_argument("--text-from", default=None, help="take the text tower from this stage-one ckpt")
    e.add_argument("--world-dir", default="runs/world")
    e.add_argument("--out", default=None, help="default CKPT/eval_encoder")
    e.add_argument("--limit", type=int, default=None, help="evaluate on at most this many images")
    e.set_defaults(func=cmd_eval_encoder)
    e = esub.add_parser("vlm", help="captioning, CHAIR, POPE, RefCOCO, VSR")
    e.add_argument("--ckpt", required=True, help="a stage-two checkpoint dir")
    e.add_argument("--tasks", default=",".join(VLM_TASKS), help=f"comma list of {', '.join(VLM_TASKS)}")
    e.add_argument("--data", default=None, help="real data files (see README); default: the world")
    e.add_argument("--world-dir", default="runs/world")
    e.add_argument("--out", default=None, help="default CKPT/eval_vlm")
    e.add_argument("--limit", type=int, default=None, help="at most this many examples per task")
    e.set_defaults(func=cmd_eval_vlm)
    e = esub.add_parser("drift", help="lm-eval: the LLM's language ability before/after LoRA")
    e.add_argument("--ckpt", required=True, help="a stage-two checkpoint dir")
    e.add_argument("--world-dir", default="runs/world", help="held-out text: this world's eval-split texts")
    e.add_argument("--out", default=None, help="default CKPT/eval_drift")
    e.add_argument("--limit", type=int, default=None, help="at most this many documents")
    e.set_defaults(func=cmd_eval_drift)


def build_parser(train_recipes: bool = True) -> argparse.ArgumentParser:
    """The full ``vlm`` parser (every subcommand has its own --help). ``train_recipes=False`` leaves
    out the recipes' sub-parsers of ``vlm train``, whose table imports the training stacks."""
    parser = argparse.ArgumentParser(prog="vlm", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("world", help="export the synthetic world in the real data formats")
    p.add_argument("--out", default="runs/world", help="output directory (default runs/world)")
    p.add_argument("--n", type=int, default=20000, help="number of train samples")
    p.add_argument("--n-eval", type=int, default=500, help="number of eval samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--config", default=None, help="a WorldConfig YAML (flags above override it)")
    p.add_argument("overrides", nargs="*", help="WorldConfig overrides, e.g. max_objects=6")
    p.set_defaults(func=cmd_world)

    p = sub.add_parser("train", help="train one stage (a recipe: stage1, lm, maskembed, stage2)")
    if train_recipes:
        from vlm.cli.train import add_train_parsers  # torch + transformers (~10 s): only for `vlm train`

        add_train_parsers(p, OVERRIDES_HELP)

    _add_eval_parsers(sub)

    p = sub.add_parser("merge", help="write a standalone merged LLM + bridge")
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("demo", help="the whole pipeline on the world, into DIR/report.md")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--config", default=None, help="a DemoConfig YAML (default: built-in)")
    p.add_argument("overrides", nargs="*", help="DemoConfig overrides")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("ablate", help="backbone ablation grid with seeds and 95%% CIs")
    p.add_argument("--config", default="configs/ablate/backbones_world.yaml")
    p.add_argument("overrides", nargs="*", help="AblateConfig overrides")
    p.set_defaults(func=cmd_ablate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vlm`` console script. Returns the process exit status."""
    _offline()
    argv = sys.argv[1:] if argv is None else list(argv)
    # Only `vlm train` needs the recipes' parsers (and their imports): `vlm --help` stays fast.
    args = build_parser(train_recipes=argv[:1] == ["train"]).parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"vlm: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
