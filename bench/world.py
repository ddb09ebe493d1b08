"""World benchmark: how long generating the synthetic world takes (issue budget: 50k 64x64 samples
well under a minute), and its export (every format written) in one process against the worker pool.

``python -m bench.world [--n 2000]`` generates ``n`` samples at the default size and prints the
samples/s and the implied seconds for 50k samples, then exports a world of 6,000 images both ways.
"""
from __future__ import annotations

import argparse
import tempfile
import time

from bench.common import Row, format_table
from vlm.config import WorldConfig
from vlm.world.export import default_workers, export_world
from vlm.world.generator import generate_sample


def run(n: int = 2000, export_n: int = 6000) -> list[Row]:
    """Rows: world samples/s (one process), the implied seconds for 50k samples, and ``export_rows(export_n)``."""
    cfg = WorldConfig()
    generate_sample(0, 0, cfg)  # warm caches (fonts, textures)
    t = time.perf_counter()
    for i in range(n):
        generate_sample(i, 1, cfg)
    per_s = n / (time.perf_counter() - t)
    return [Row(f"world: samples/s ({cfg.image_size}px)", per_s, "/s"),
            Row("world: 50k samples", 50_000 / per_s, "s", "< 60 s"), *export_rows(export_n)]


def export_rows(n: int) -> list[Row]:
    """Rows: seconds to export a world of ``n`` images rendered in this process, then in
    ``default_workers()`` processes, and the ratio (the files are the same either way)."""
    cfg = WorldConfig(n_train=n, n_eval=0)
    workers = default_workers()
    seconds = {}
    for w in (1, workers):
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            export_world(tmp, cfg, progress=False, workers=w)
            seconds[w] = time.perf_counter() - t
    return [Row(f"world export: {n} images, 1 process", seconds[1], "s"),
            Row(f"world export: {n} images, {workers} render workers", seconds[workers], "s"),
            Row("world export speed-up, render workers", seconds[1] / seconds[workers], "x", "> 1 with 2+ CPUs")]


def main() -> None:
    """``python -m bench.world``: parse the command line and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000)
    print(format_table(run(parser.parse_args().n), "world generation"))


if __name__ == "__main__":
    main()
