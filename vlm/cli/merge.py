"""``vlm merge``: a standalone merged LLM + bridge for inference."""
from __future__ import annotations

import argparse

from vlm.model.vision_language_model import VisionLanguageModel


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``vlm merge --ckpt DIR --out DIR``."""
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", required=True)
    parser.set_defaults(func=cmd_merge)


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge the LoRA adapter into the LLM and write it with the bridge to ``--out``."""
    model = VisionLanguageModel.from_pretrained(args.ckpt)
    model.merge_and_save(args.out)
    print(f"merged model written to {args.out}")
    return 0
