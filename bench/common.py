"""What every benchmark prints: rows of (what, value, unit, target) as one aligned table."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from eval.report import markdown_table


@dataclass
class Row:
    """One measured number. ``target`` is the goal it is compared to, as text ("<= 1.05"), or ""."""

    name: str
    value: float
    unit: str = "x"
    target: str = ""


def format_table(rows: list[Row], title: str = "") -> str:
    """A Markdown table of ``rows`` (values right-aligned, with their units), under a "### title"."""
    heading = f"### {title}\n\n" if title else ""
    cells = [[r.name, (f"{r.value:.3f}" if abs(r.value) < 1000 else f"{r.value:,.0f}") + f" {r.unit}", r.target]
             for r in rows]
    return heading + markdown_table(["measurement", "value", "target"], cells, align="lrl")


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work so wall-clock timings measure it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], None], device: torch.device, warmup: int, iters: int) -> float:
    """Median wall seconds of ``fn`` over ``iters`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
