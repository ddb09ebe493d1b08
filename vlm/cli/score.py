"""``vlm score TASK --predictions FILE --out DIR ...``: score outputs made elsewhere (``eval.score``),
written as ``vlm eval vlm`` writes them: ``DIR/TASK/{predictions.jsonl, summary.json, summary.md}``."""
from __future__ import annotations

import argparse
import json

from eval import score
from eval.prompt_sets import PROMPT_SETS

NEEDS = {"caption": ("captions",), "chair": ("instances",), "pope": ("questions",),
         "refcoco": ("refs", "instances"), "vsr": ("questions",)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``vlm score caption|chair|pope|refcoco|vsr`` and the reference files each reads."""
    parser.add_argument("task", choices=score.SCORE_TASKS)
    parser.add_argument("--predictions", required=True, nargs="+",
                        help="jsonl or a JSON list (formats: eval/score.py); pope: one per question file")
    parser.add_argument("--out", required=True, help="writes OUT/TASK/summary.json")
    parser.add_argument("--captions", help="caption: COCO captions json (references); chair: optional, its "
                                           "reference captions add present objects")
    parser.add_argument("--instances", help="chair, refcoco: COCO instances json")
    parser.add_argument("--questions", nargs="+", help="pope: the POPE repo's question file(s), split from the "
                                                       "name; vsr: the VSR jsonl")
    parser.add_argument("--refs", help="refcoco: refs json")
    parser.add_argument("--vocab", choices=["coco", "world"], default="coco", help="chair: the synonym table")
    parser.add_argument("--box-frame", choices=["square", "image"], default="square",
                        help="refcoco: boxes normalised to the image padded to a square (LLaVA-1.5, vlm eval) "
                             "or to the image itself (lmms-eval)")
    parser.add_argument("--prompt-set", choices=list(PROMPT_SETS), default=None,
                        help="the prompt set the predictions were made with (recorded in the summary)")
    parser.set_defaults(func=cmd_score)


def cmd_score(args: argparse.Namespace) -> int:
    """Check the task's reference files were given, score, print the summary."""
    missing = [f"--{k}" for k in NEEDS[args.task] if not getattr(args, k)]
    if missing:
        raise SystemExit(f"vlm score {args.task}: needs {' '.join(missing)}")
    if args.task != "pope" and len(args.predictions) != 1:
        raise SystemExit(f"vlm score {args.task}: one --predictions file")
    pred = args.predictions[0]
    if args.task == "caption":
        summary = score.score_caption(pred, args.captions, args.out, prompt_set=args.prompt_set)
    elif args.task == "chair":
        summary = score.score_chair(pred, args.instances, args.out, captions=args.captions, vocab=args.vocab,
                                   prompt_set=args.prompt_set)
    elif args.task == "pope":
        summary = score.score_pope(args.predictions, args.questions, args.out, prompt_set=args.prompt_set)
    elif args.task == "refcoco":
        summary = score.score_refcoco(pred, args.refs, args.instances, args.out, box_frame=args.box_frame,
                                      prompt_set=args.prompt_set)
    else:
        if len(args.questions) != 1:
            raise SystemExit("vlm score vsr: one --questions file")
        summary = score.score_vsr(pred, args.questions[0], args.out, prompt_set=args.prompt_set)
    print(json.dumps(summary, indent=2, default=str))
    return 0
