"""``vlm eval encoder | vlm | drift | probe``: evaluate a vision tower, a VLM, the LLM's language
drift, or an LLM's text-context probe (POPE / VSR answered from the caption, no image)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from eval.encoder import run as run_encoder_eval
from eval.encoder_real import run_real
from eval.harness import run_vlm_eval
from eval.tasks import VLM_TASKS
from eval.text_probe import MODES as PROBE_MODES
from eval.text_probe import probe_llm
from vlm.config import ConfigError, WorldConfig, load_config
from vlm.world.export import ensure_world


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The four targets of ``vlm eval``, each with its own flags."""
    sub = parser.add_subparsers(dest="target", required=True, metavar="TARGET")
    e = sub.add_parser("encoder", help="zero-shot, retrieval, patch segmentation, pointing, heatmaps")
    e.add_argument("--ckpt", required=True, help="a stage-one, MaskEmbed or HF vision checkpoint dir")
    e.add_argument("--text-from", default=None, help="take the text tower from this stage-one ckpt")
    e.add_argument("--world-dir", default="runs/world")
    e.add_argument("--out", default=None, help="default CKPT/eval_encoder")
    e.add_argument("--limit", type=int, default=None, help="evaluate on at most this many images")
    e.add_argument("--flair-scoring", choices=["conditioned", "global"], default="conditioned",
                   help="FLAIR towers: text-conditioned embedding (the reference's default) or global matching")
    real = e.add_argument_group("real data (instead of the world; eval.encoder_real)")
    real.add_argument("--imagefolder", default=None, help="zero-shot classification: ROOT/<class>/<image> folders")
    real.add_argument("--classnames", default=None, help="class names: one per line in folder order, or a json "
                                                         "{folder: name} (default: the folder names)")
    real.add_argument("--templates", default=None, help="prompt templates, one per line with {} for the class name")
    real.add_argument("--captions", default=None, help="retrieval: a COCO captions json")
    real.add_argument("--images", default=None, help="the folder the captions json's file_name entries are in")
    e.set_defaults(func=cmd_eval_encoder)
    names = ", ".join(VLM_TASKS)
    e = sub.add_parser("vlm", help="captioning, CHAIR, POPE, RefCOCO, VSR")
    e.add_argument("--ckpt", required=True, help="a stage-two checkpoint dir")
    e.add_argument("--tasks", default=",".join(VLM_TASKS), help=f"comma list of {names}")
    e.add_argument("--data", default=None, help="real data files (see README); default: the world")
    e.add_argument("--world-dir", default="runs/world")
    e.add_argument("--out", default=None, help="default CKPT/eval_vlm")
    e.add_argument("--limit", type=int, default=None, help="at most this many examples per task")
    e.add_argument("--blank-image", action="store_true",
                   help="image-ablation control: every image replaced by a uniform one of the processor's mean colour")
    e.set_defaults(func=cmd_eval_vlm)
    e = sub.add_parser("drift", help="lm-eval: the LLM's language ability before/after LoRA")
    e.add_argument("--ckpt", required=True, help="a stage-two checkpoint dir")
    e.add_argument("--world-dir", default="runs/world", help="held-out text: this world's eval-split texts")
    e.add_argument("--out", default=None, help="default CKPT/eval_drift")
    e.add_argument("--limit", type=int, default=None, help="at most this many documents")
    e.set_defaults(func=cmd_eval_drift)
    e = sub.add_parser("probe", help="text-context probe: POPE / VSR answered from the caption, no image")
    e.add_argument("--llm", required=True, help="a causal LM dir with its tokenizer (e.g. runs/lm/final)")
    e.add_argument("--world-dir", default="runs/world", help="the world export whose eval split is asked about")
    e.add_argument("--out", default=None, help="default LLM/eval_probe")
    e.add_argument("--limit", type=int, default=None, help="at most this many questions per POPE split and of VSR")
    e.add_argument("--mode", choices=PROBE_MODES, default="score", help="answers as the harness reads them")
    e.set_defaults(func=cmd_eval_probe)


def world_config_of(world_dir: str) -> WorldConfig:
    """The WorldConfig an exported world was made with (its world.json), or the defaults."""
    meta = Path(world_dir) / "world.json"
    if meta.is_file():
        saved = json.loads(meta.read_text()).get("config", {})
        return load_config(WorldConfig, None, [f"{k}={v}" for k, v in saved.items()])
    return WorldConfig()


def cmd_eval_encoder(args: argparse.Namespace) -> int:
    """``vlm eval encoder``: zero-shot, retrieval, patch segmentation, pointing and heatmaps on the
    world; with ``--imagefolder`` / ``--captions``, zero-shot and retrieval on those real images."""
    if args.imagefolder or args.captions:
        out = args.out or str(Path(args.ckpt) / "eval_encoder_real")
        summary = run_real(args.ckpt, out, imagefolder=args.imagefolder, classnames=args.classnames,
                           templates=args.templates, captions=args.captions, images=args.images,
                           text_from=args.text_from, limit=args.limit, flair_scoring=args.flair_scoring)
        print(json.dumps(summary, indent=2))
        return 0
    world = world_config_of(args.world_dir)
    ensure_world(args.world_dir, world)
    out = args.out or str(Path(args.ckpt) / "eval_encoder")
    summary = run_encoder_eval(args.ckpt, out, world=world, world_dir=args.world_dir,
                               text_from=args.text_from, limit=args.limit, flair_scoring=args.flair_scoring)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_eval_vlm(args: argparse.Namespace) -> int:
    """``vlm eval vlm``: the registered VLM tasks (``eval.tasks.VLM_TASKS``) of a stage-two checkpoint."""
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(tasks) - set(VLM_TASKS))
    if unknown:
        raise ConfigError(f"--tasks: unknown task(s) {unknown}; valid: {', '.join(VLM_TASKS)}")
    out = args.out or str(Path(args.ckpt) / ("eval_vlm_blank" if args.blank_image else "eval_vlm"))
    summary = run_vlm_eval(args.ckpt, tasks, out, data=args.data, world_dir=args.world_dir, limit=args.limit,
                           blank_image=args.blank_image)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_eval_drift(args: argparse.Namespace) -> int:
    """``vlm eval drift``: the LLM's language ability before and after LoRA (lm-eval, the ``lmeval`` extra)."""
    from eval.lm_eval_adapter import run_language_drift  # here: lm-eval is optional, the other targets run without it
    out = args.out or str(Path(args.ckpt) / "eval_drift")
    result = run_language_drift(args.ckpt, out, limit=args.limit, world_dir=args.world_dir)
    print(json.dumps(result, indent=2, default=str))
    return 0


def cmd_eval_probe(args: argparse.Namespace) -> int:
    """``vlm eval probe``: an LLM answers the world's eval POPE / VSR questions from each image's caption."""
    out = args.out or str(Path(args.llm) / "eval_probe")
    summary = probe_llm(args.llm, args.world_dir, out, limit=args.limit, mode=args.mode)
    print(json.dumps({k: v for k, v in summary.items() if k.startswith("text_probe_")}, indent=2))
    return 0
