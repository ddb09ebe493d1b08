"""What every benchmark prints: rows of (what, value, unit, target) as one aligned table."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Row:
    """One measured number. ``target`` is the goal it is compared to, as text ("<= 1.05"), or ""."""

    name: str
    value: float
    unit: str = "x"
    target: str = ""


def format_table(rows: list[Row], title: str = "") -> str:
    """An aligned Markdown table of ``rows``."""
    lines = [f"### {title}", ""] if title else []
    lines += ["| measurement | value | target |", "|---|---:|---|"]
    for r in rows:
        value = f"{r.value:.3f}" if abs(r.value) < 1000 else f"{r.value:,.0f}"
        lines.append(f"| {r.name} | {value} {r.unit} | {r.target} |")
    return "\n".join(lines)
