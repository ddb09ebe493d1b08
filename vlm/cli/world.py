"""``vlm world``: export the synthetic world in the real data formats."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from vlm.config import WorldConfig, load_config
from vlm.world.export import export_world


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``vlm world [--out DIR] [--n N] [--n-eval N] [--seed S] [--image-size S] [--config YAML] [overrides]``."""
    parser.add_argument("--out", default="runs/world", help="output directory (default runs/world)")
    parser.add_argument("--n", type=int, default=20000, help="number of train samples")
    parser.add_argument("--n-eval", type=int, default=500, help="number of eval samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--config", default=None, help="a WorldConfig YAML (flags above override it)")
    parser.add_argument("overrides", nargs="*", help="WorldConfig overrides, e.g. max_objects=6")
    parser.set_defaults(func=cmd_world)


def cmd_world(args: argparse.Namespace) -> int:
    """Export the world ``--out`` (images, shards, COCO, LLaVA, POPE, RefCOCO, VSR, contact sheet)."""
    overrides = [f"n_train={args.n}", f"seed={args.seed}", f"n_eval={args.n_eval}",
                 f"image_size={args.image_size}", *args.overrides]
    cfg = load_config(WorldConfig, args.config, overrides)
    counts = export_world(args.out, cfg, progress=True)
    print(json.dumps(counts, indent=2))
    print(f"world written to {args.out} (contact sheet: {Path(args.out) / 'contact_sheet.png'})")
    return 0
