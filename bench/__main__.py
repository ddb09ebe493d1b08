"""``python -m bench`` (``make bench``): every benchmark in one run, one table of ratios.

World generation and export speed, stage one's data path (shards vs pre-decoded arrays), stage one (SPARC/CLIP step time and memory, ours/open_clip samples/s), stage two (tokens/s per
bridge, KV-cache speed-up), the world LM's step (output head on labelled positions only) and, when a demo has run, its wall time by stage (``--demo DIR``). ``--only towers`` adds
the vision towers' forward+backward times (ViT / ResNet / ConvNeXt, fp32 and bf16; not in the default set).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench import data_path, lm, stage1, stage2, towers, world
from bench.common import Row, format_table

BENCHES = {"world": world.run, "data": data_path.run, "stage1": stage1.run, "stage2": stage2.run, "lm": lm.run, "towers": towers.run}  # name -> run() -> rows


def demo_rows(demo_dir: Path) -> list[Row]:
    """Wall seconds per stage of a finished demo (its timings.json); [] when there is none."""
    path = demo_dir / "timings.json"
    if not path.is_file():
        return []
    seconds = json.loads(path.read_text())["seconds"]
    rows = [Row(f"demo: {name}", s, "s") for name, s in seconds.items()]
    rows.append(Row("demo: total", sum(seconds.values()), "s", "<= 900 s on 2 CPU cores"))
    return rows


def main() -> None:
    """Parse the command line, run the selected benchmarks and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", default="runs/demo", help="a demo output dir to read timings from")
    parser.add_argument("--only", default="world,data,stage1,stage2,lm,demo",
                        help="comma list of world, data, stage1, stage2, lm, towers (not run by default: minutes on a CPU), demo")
    args = parser.parse_args()
    only = set(args.only.split(","))
    rows: list[Row] = []
    for name, run in BENCHES.items():
        if name in only:
            rows += run()
    if "demo" in only:
        rows += demo_rows(Path(args.demo))
    print(format_table(rows, "sparc-vlm benchmarks"))


if __name__ == "__main__":
    main()
