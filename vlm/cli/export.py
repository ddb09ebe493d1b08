"""``vlm export``: a checkpoint as a stock transformers directory (``vlm.model.export``): a stage-two
projector VLM as LLaVA (``--format llava``), a stage-one CLIP encoder as ``CLIPModel`` (``--format clip``)."""
from __future__ import annotations

import argparse
import sys

from encoders.stage1_model import Stage1Model
from vlm.model.export import ExportError, export_clip, export_llava
from vlm.model.vision_language_model import VisionLanguageModel

FORMATS = ("llava", "clip")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``vlm export --ckpt DIR --format llava|clip --out OUT``."""
    parser.add_argument("--ckpt", required=True, help="llava: a stage-two checkpoint dir (adapter or merged); "
                                                      "clip: a stage-one checkpoint dir")
    parser.add_argument("--format", choices=FORMATS, default="llava",
                        help="llava: LlavaForConditionalGeneration + AutoProcessor (projector bridge, CLIP/SigLIP tower); "
                             "clip: CLIPModel + CLIPProcessor (zero-shot-image-classification pipeline)")
    parser.add_argument("--out", required=True)
    parser.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    """Load ``--ckpt``, write it to ``--out`` in ``--format``; exit 2 with the reason when it cannot."""
    try:
        if args.format == "clip":
            export_clip(Stage1Model.from_pretrained(args.ckpt), args.out)
        else:
            export_llava(VisionLanguageModel.from_pretrained(args.ckpt), args.out)
    except ExportError as e:
        print(f"vlm export: {e}", file=sys.stderr)
        return 2
    print(f"{args.format} model written to {args.out}")
    return 0
