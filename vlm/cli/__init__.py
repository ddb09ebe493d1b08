"""The ``vlm`` command line: one subcommand per stage, each a thin shell over a library function.

    vlm world   --out DIR --n N --seed S          export the synthetic world in the real formats
    vlm train   stage1|lm|maskembed|stage2 --config YAML [--resume] [key.sub=value ...]
    vlm eval    encoder --ckpt DIR | vlm --ckpt DIR --tasks ... | drift --ckpt DIR
    vlm merge   --ckpt DIR --out DIR              standalone merged LLM + bridge for inference
    vlm demo    [--out DIR]                        everything, on the world, into DIR/report.md
    vlm ablate  --config YAML                      the backbone grid with seeds and CIs

Configs are validated (``vlm.config.load_config``) before any work starts; a bad value exits with
status 2 and a message naming the key.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from vlm.config import ConfigError

TRAIN_RECIPES = {
    # name: (config class name, as the training module imports it; training module; default config)
    "stage1": ("Stage1Config", "training.stage1", "configs/stage1/sparc_tiny.yaml"),
    "lm": ("LMConfig", "training.lm", "configs/lm/tiny_world.yaml"),
    "maskembed": ("MaskEmbedRunConfig", "training.maskembed", "configs/posttrain/maskembed_tiny.yaml"),
    "stage2": ("Stage2Config", "training.stage2", "configs/stage2/projector_tiny.yaml"),
}
VLM_TASKS = ("caption", "chair", "pope", "refcoco", "vsr")


def _offline() -> None:
    """Nothing here may reach a hub: make that explicit for every library we call."""
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ---------------------------------------------------------------------------------------------
# vlm world
# ---------------------------------------------------------------------------------------------


def cmd_world(args: argparse.Namespace) -> int:
    from vlm.config import WorldConfig, load_config
    from vlm.world.export import export_world

    overrides = [f"n_train={args.n}", f"seed={args.seed}", f"n_eval={args.n_eval}",
                 f"image_size={args.image_size}", *args.overrides]
    cfg = load_config(WorldConfig, args.config, overrides)
    counts = export_world(args.out, cfg, progress=True)
    print(json.dumps(counts, indent=2))
    print(f"world written to {args.out} (contact sheet: {Path(args.out) / 'contact_sheet.png'})")
    return 0


# ---------------------------------------------------------------------------------------------
# vlm train
# ---------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    import importlib

    import vlm.config as config

    cls_name, module_name, default_cfg = TRAIN_RECIPES[args.recipe]
    overrides = list(args.overrides)
    if args.resume:
        overrides.append("run.resume=true")
    if getattr(args, "teacher", None):
        overrides.append(f"maskembed.teacher={args.teacher}")
    module = importlib.import_module(module_name)
    cfg = config.load_config(getattr(module, cls_name), args.config or default_cfg, overrides)
    final = module.run(cfg)
    print(f"{args.recipe}: final artifact at {final}")
    return 0


# ---------------------------------------------------------------------------------------------
# vlm eval
# ---------------------------------------------------------------------------------------------


def _world_cfg(world_dir: str):
    """The WorldConfig an exported world was made with (its world.json), or the defaults."""
    from vlm.config import WorldConfig, load_config

    meta = Path(world_dir) / "world.json"
    if meta.is_file():
        saved = json.loads(meta.read_text()).get("config", {})
        return load_config(WorldConfig, None, [f"{k}={v}" for k, v in saved.items()])
    return WorldConfig()


def cmd_eval_encoder(args: argparse.Namespace) -> int:
    from eval.encoder import run as run_encoder_eval
    from vlm.world.export import ensure_world

    world = _world_cfg(args.world_dir)
    ensure_world(args.world_dir, world)
    out = args.out or str(Path(args.ckpt) / "eval_encoder")
    summary = run_encoder_eval(args.ckpt, out, world=world, world_dir=args.world_dir,
                               text_from=args.text_from, limit=args.limit)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_eval_vlm(args: argparse.Namespace) -> int:
    from eval.harness import run_vlm_eval

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
    from eval.lm_eval_adapter import run_language_drift

    out = args.out or str(Path(args.ckpt) / "eval_drift")
    result = run_language_drift(args.ckpt, out, limit=args.limit, world_dir=args.world_dir)
    print(json.dumps(result, indent=2, default=str))
    return 0


# ---------------------------------------------------------------------------------------------
# vlm merge / demo / ablate
# ---------------------------------------------------------------------------------------------


def cmd_merge(args: argparse.Namespace) -> int:
    from vlm.model.vision_language_model import VisionLanguageModel

    model = VisionLanguageModel.from_pretrained(args.ckpt)
    model.merge_and_save(args.out)
    print(f"merged model written to {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from vlm.cli.demo import run_demo

    report = run_demo(args.out, config_path=args.config, overrides=args.overrides)
    print(f"report: {report}")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from vlm.cli.ablate import run_ablation

    report = run_ablation(args.config, overrides=args.overrides)
    print(f"report: {report}")
    return 0


# ---------------------------------------------------------------------------------------------
# argument parsing
# ---------------------------------------------------------------------------------------------

OVERRIDES_HELP = "dotted config overrides, e.g. optim.lr=1e-3 run.out_dir=runs/x"


def build_parser() -> argparse.ArgumentParser:
    """The full ``vlm`` parser (every subcommand has its own --help)."""
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

    p = sub.add_parser("train", help="train one stage: stage1 | lm | maskembed | stage2")
    tsub = p.add_subparsers(dest="recipe", required=True, metavar="RECIPE")
    for name, (cls_name, _, default_cfg) in TRAIN_RECIPES.items():
        t = tsub.add_parser(name, help=f"{cls_name} recipe (default {default_cfg})")
        t.add_argument("--config", default=None, help=f"YAML config (default {default_cfg})")
        t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
        if name == "maskembed":
            t.add_argument("--teacher", default=None, help="vision tower to post-train (a checkpoint dir)")
        t.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
        t.set_defaults(func=cmd_train)

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
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"vlm: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
