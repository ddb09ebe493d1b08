"""``vlm export``: a stage-two checkpoint as a stock transformers directory (``vlm.model.export``)."""
from __future__ import annotations

import argparse
import sys

from vlm.model.export import ExportError, export_llava
from vlm.model.vision_language_model import VisionLanguageModel

FORMATS = ("llava",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``vlm export --ckpt DIR --format llava --out OUT``."""
    parser.add_argument("--ckpt", required=True, help="a stage-two checkpoint dir (adapter or merged)")
    parser.add_argument("--format", choices=FORMATS, default="llava",
                        help="llava: LlavaForConditionalGeneration + AutoProcessor (projector bridge, CLIP/SigLIP tower)")
    parser.add_argument("--out", required=True)
    parser.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    """Load ``--ckpt``, write it to ``--out`` in ``--format``; exit 2 with the reason when it cannot."""
    model = VisionLanguageModel.from_pretrained(args.ckpt)
    try:
        export_llava(model, args.out)
    except ExportError as e:
        print(f"vlm export: {e}", file=sys.stderr)
        return 2
    print(f"{args.format} model written to {args.out}")
    return 0
