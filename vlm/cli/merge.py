"""``vlm merge``: a standalone merged LLM + bridge for inference."""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from vlm.files import VlmError
from vlm.model.vision_language_model import VisionLanguageModel


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``vlm merge --ckpt DIR --out DIR``."""
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", required=True)
    parser.set_defaults(func=cmd_merge)


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge the LoRA adapter into the LLM and write it with the bridge to ``--out``: into a
    temporary dir beside it, renamed when complete; an existing non-empty ``--out`` is refused."""
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise VlmError(f"--out {out} exists and is not empty; refusing to overwrite it")
    if not Path(args.ckpt).is_dir():
        raise FileNotFoundError(f"--ckpt: {args.ckpt} is not a directory")
    model = VisionLanguageModel.from_pretrained(args.ckpt)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        model.merge_and_save(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"merged model written to {out}")
    return 0
