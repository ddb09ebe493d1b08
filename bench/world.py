"""World benchmark: how long generating the synthetic world takes (issue budget: 50k 64x64 samples
well under a minute).

``python -m bench.world [--n 2000]`` generates ``n`` samples at the default size and prints the
samples/s and the implied seconds for 50k samples.
"""
from __future__ import annotations

import argparse
import time

from bench.common import Row, format_table
from vlm.config import WorldConfig
from vlm.world.generator import generate_sample


def run(n: int = 2000) -> list[Row]:
    """Rows: world samples/s (one process) and the implied seconds for 50k samples."""
    cfg = WorldConfig()
    generate_sample(0, 0, cfg)  # warm caches (fonts, textures)
    t = time.perf_counter()
    for i in range(n):
        generate_sample(i, 1, cfg)
    per_s = n / (time.perf_counter() - t)
    return [Row(f"world: samples/s ({cfg.image_size}px)", per_s, "/s"),
            Row("world: 50k samples", 50_000 / per_s, "s", "< 60 s")]


def main() -> None:
    """``python -m bench.world``: parse the command line and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000)
    print(format_table(run(parser.parse_args().n), "world generation"))


if __name__ == "__main__":
    main()
