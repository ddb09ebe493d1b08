"""What every benchmark prints: rows of (what, value, unit, target) as one aligned table."""
from __future__ import annotations

from dataclasses import dataclass


from bench.measure import median_time, sync  # noqa: F401  (re-exported: every bench times with them)
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


