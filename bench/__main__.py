"""``python -m bench`` (``make bench``): every benchmark in one run, one table of ratios.

World generation speed, stage one (SPARC/CLIP step time and memory, ours/open_clip samples/s), stage two (tokens/s per
bridge, KV-cache speed-up) and, when a demo has run, its wall time by stage (``--demo DIR``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.common import Row, format_table


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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", default="runs/demo", help="a demo output dir to read timings from")
    parser.add_argument("--only", default="world,stage1,stage2,demo", help="comma list of world, stage1, stage2, demo")
    args = parser.parse_args()
    only = set(args.only.split(","))
    rows: list[Row] = []
    if "world" in only:
        from bench import world

        rows += world.run()
    if "stage1" in only:
        from bench import stage1

        rows += stage1.run()
    if "stage2" in only:
        from bench import stage2

        rows += stage2.run()
    if "demo" in only:
        rows += demo_rows(Path(args.demo))
    print(format_table(rows, "sparc-vlm benchmarks"))


if __name__ == "__main__":
    main()
