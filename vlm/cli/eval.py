"""``vlm eval encoder | vlm | drift | probe | relation-probe``: evaluate a vision tower, a VLM, the LLM's
language drift, an LLM's text-context probe (POPE / VSR answered from the caption, no image), or the
world's VSR task itself (a small transformer trained from scratch on the oracle grid)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from eval.encoder import run as run_encoder_eval
from eval.encoder_real import run_real
from eval.harness import run_vlm_eval
from eval.io import ANSWER_MODES
from eval.prompt_sets import PROMPT_SETS
from eval.relation_probe import ANSWERS as RELATION_ANSWERS
from eval.relation_probe import BLOCKS as RELATION_BLOCKS
from eval.relation_probe import TASKS as RELATION_TASKS
from eval.relation_probe import VARIANTS as RELATION_VARIANTS
from eval.relation_probe import run as run_relation_probe
from eval.tasks import VLM_TASKS
from eval.text_probe import MODES as PROBE_MODES
from eval.text_probe import probe_llm
from vlm.config import VLM_DEFAULT_TASKS, ConfigError, WorldConfig, load_config
from vlm.files import read_json
from vlm.world.export import ensure_world


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The five targets of ``vlm eval``, each with its own flags."""
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
    e = sub.add_parser("vlm", help="captioning, CHAIR, POPE, RefCOCO, VSR (+ grounding attention)")
    which = e.add_mutually_exclusive_group(required=True)
    which.add_argument("--ckpt", help="a stage-two checkpoint dir")
    which.add_argument("--hf-model", help="a local HF VLM dir with a chat template (LLaVA, AutoModelForImageTextToText)")
    e.add_argument("--tasks", default=",".join(VLM_DEFAULT_TASKS),
                   help=f"comma list of {names} (default: all but grounding_attention, a diagnostic of projector VLMs)")
    e.add_argument("--data", default=None, help="real data files (see README); default: the world")
    e.add_argument("--world-dir", default="runs/world")
    e.add_argument("--out", default=None, help="default CKPT/eval_vlm (or HF_MODEL/eval_vlm)")
    e.add_argument("--limit", type=int, default=None, help="at most this many examples per task")
    e.add_argument("--answer-mode", choices=ANSWER_MODES, default="score",
                   help="POPE / VSR: score (log P(yes) vs P(no), with AUC) or generate (the answer parsed as the reference)")
    e.add_argument("--prompt-set", choices=list(PROMPT_SETS), default="world",
                   help="world: the prompts the world's models learn; lmms-eval: the published wordings (eval/prompt_sets.py)")
    e.add_argument("--blank-image", action="store_true",
                   help="image-ablation control: every image replaced by a uniform one of the processor's mean colour")
    e.set_defaults(func=cmd_eval_vlm)
    e = sub.add_parser("drift", help="lm-eval: the LLM's language ability before/after LoRA")
    e.add_argument("--ckpt", required=True, help="a stage-two checkpoint dir")
    e.add_argument("--world-dir", default="runs/world", help="held-out text: this world's eval-split texts")
    e.add_argument("--out", default=None, help="default CKPT/eval_drift")
    e.add_argument("--limit", type=int, default=None, help="at most this many documents")
    e.add_argument("--tasks", default=None,
                   help="comma list of lm-eval tasks (default: the world's held-out text task; others need their "
                        "data available offline)")
    e.add_argument("--base-llm", default=None,
                   help="the LLM stage two started from: needed for a merged checkpoint (its vlm.yaml names llm/)")
    e.set_defaults(func=cmd_eval_drift)
    e = sub.add_parser("probe", help="text-context probe: POPE / VSR answered from the caption, no image")
    e.add_argument("--llm", required=True, help="a causal LM dir with its tokenizer (e.g. runs/lm/final)")
    e.add_argument("--world-dir", default="runs/world", help="the world export whose eval split is asked about")
    e.add_argument("--out", default=None, help="default LLM/eval_probe")
    e.add_argument("--limit", type=int, default=None, help="at most this many questions per POPE split and of VSR")
    e.add_argument("--mode", choices=PROBE_MODES, default="score", help="answers as the harness reads them")
    e.set_defaults(func=cmd_eval_probe)
    add_relation_probe_arguments(sub)


def add_relation_probe_arguments(sub: "argparse._SubParsersAction") -> None:
    """``vlm eval relation-probe``'s parser, added to ``vlm eval``'s subparsers ``sub``."""
    e = sub.add_parser("relation-probe", help="the world's VSR statements (or RefCOCO boxes) learnt from scratch on "
                                              "the oracle grid (eval.relation_probe): with and without the named objects marked")
    e.add_argument("--world-dir", default="runs/world", help="the world (its world.json config) whose statements are used")
    e.add_argument("--out", default="runs/relation_probe")
    e.add_argument("--images", type=int, default=8000, help="train images (the world's first train indices)")
    e.add_argument("--steps", type=int, default=1500)
    e.add_argument("--batch", type=int, default=64)
    e.add_argument("--lr", type=float, default=1e-3)
    e.add_argument("--layers", type=int, default=2)
    e.add_argument("--eval-every", type=int, default=250)
    e.add_argument("--variants", default=",".join(RELATION_VARIANTS), help=f"comma list of {', '.join(RELATION_VARIANTS)}")
    e.add_argument("--task", choices=RELATION_TASKS, default="vsr",
                   help="vsr: true/false statements; refcoco: the box of each referring expression (Acc@0.5)")
    e.add_argument("--block", choices=RELATION_BLOCKS, default="encoder",
                   help="encoder: torch encoder layers; llama: a transformers LlamaModel of the same size (the world LM's block)")
    e.add_argument("--answer", choices=RELATION_ANSWERS, default="heads",
                   help="heads: every answer at the query token; tokens (refcoco): one coordinate per position, as a VLM writes a box")
    e.set_defaults(func=cmd_eval_relation_probe)


def world_config_of(world_dir: str) -> WorldConfig:
    """The WorldConfig an exported world was made with (its world.json), or the defaults."""
    meta = Path(world_dir) / "world.json"
    if meta.is_file():
        saved = read_json(meta, "world export metadata").get("config", {})
        return load_config(WorldConfig, None, [f"{k}={v}" for k, v in saved.items()])
    return WorldConfig()


def existing(path: str, flag: str) -> str:
    """``path``, or a ``FileNotFoundError`` naming ``flag`` and ``path`` before any work (a world export)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{flag}: {path} does not exist")
    return path


def cmd_eval_encoder(args: argparse.Namespace) -> int:
    """``vlm eval encoder``: zero-shot, retrieval, patch segmentation, pointing and heatmaps on the
    world; with ``--imagefolder`` / ``--captions``, zero-shot and retrieval on those real images."""
    existing(args.ckpt, "--ckpt")
    if args.text_from:
        existing(args.text_from, "--text-from")
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
    """``vlm eval vlm``: the registered VLM tasks (``eval.tasks.VLM_TASKS``) of a stage-two checkpoint
    or of a local HF VLM (``--hf-model``)."""
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(tasks) - set(VLM_TASKS))
    if unknown:
        raise ConfigError(f"--tasks: unknown task(s) {unknown}; valid: {', '.join(VLM_TASKS)}")
    model_dir = args.ckpt or args.hf_model
    existing(model_dir, "--ckpt" if args.ckpt else "--hf-model")
    out = args.out or str(Path(model_dir) / ("eval_vlm_blank" if args.blank_image else "eval_vlm"))
    summary = run_vlm_eval(model_dir, tasks, out, data=args.data, world_dir=args.world_dir, limit=args.limit,
                           blank_image=args.blank_image, hf_model=args.hf_model is not None,
                           answer_mode=args.answer_mode, prompt_set=args.prompt_set)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_eval_relation_probe(args: argparse.Namespace) -> int:
    """``vlm eval relation-probe``: can a small transformer learn the world's VSR statements from perfect features?"""
    world = world_config_of(existing(args.world_dir, "--world-dir"))
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    summary = run_relation_probe(world, args.out, images=args.images, steps=args.steps, batch=args.batch, lr=args.lr,
                                 layers=args.layers, eval_every=args.eval_every, variants=variants,
                                 task=args.task, block=args.block, answer=args.answer)
    print(json.dumps({k: v for k, v in summary.items() if k != "curves"}, indent=2))
    return 0


def cmd_eval_drift(args: argparse.Namespace) -> int:
    """``vlm eval drift``: the LLM's language ability before and after stage two (lm-eval's HFLM, the
    ``lmeval`` extra), for a LoRA or (with ``--base-llm``) a merged checkpoint."""
    existing(args.ckpt, "--ckpt")
    from eval.lm_eval_adapter import TASK_NAME, run_language_drift  # here: lm-eval is optional
    out = args.out or str(Path(args.ckpt) / "eval_drift")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else [TASK_NAME]
    result = run_language_drift(args.ckpt, out, base_llm_path=args.base_llm, limit=args.limit,
                                world_dir=args.world_dir, tasks=tasks)
    print(json.dumps(result, indent=2, default=str))
    return 0


def cmd_eval_probe(args: argparse.Namespace) -> int:
    """``vlm eval probe``: an LLM answers the world's eval POPE / VSR questions from each image's caption."""
    existing(args.llm, "--llm")
    out = args.out or str(Path(args.llm) / "eval_probe")
    summary = probe_llm(args.llm, args.world_dir, out, limit=args.limit, mode=args.mode)
    print(json.dumps({k: v for k, v in summary.items() if k.startswith("text_probe_")}, indent=2))
    return 0
