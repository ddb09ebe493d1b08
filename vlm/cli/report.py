"""Pictures and tables for pipeline reports: training curves from ``metrics.jsonl``, Markdown tables."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

# The headline metrics of the report tables (every metric stays in the JSON summaries).
ENCODER_COLUMNS = [
    "zero_shot/top1", "retrieval/i2t_r1", "retrieval/t2i_r1", "retrieval/i2t_r5", "retrieval/t2i_r5",
    "segmentation/zero_shot_miou", "segmentation/probe_miou", "multilabel/f1", "multilabel/precision",
    "multilabel/recall",
]
VLM_COLUMNS = [
    "caption/CIDEr", "caption/BLEU_4", "caption/METEOR", "caption/ROUGE_L", "chair/chair_i", "chair/chair_s",
    "chair/recall", "pope/f1_avg", "pope/accuracy_avg", "pope/random/f1", "pope/popular/f1", "pope/adversarial/f1",
    "refcoco/acc", "refcoco/unparseable", "vsr/accuracy",
]


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl`` (one dict per logged step); [] when absent."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill: the curve just misses one point
    return rows


def plot_training_curves(runs: dict[str, Path], out_png: Path, key: str = "loss") -> Path | None:
    """One subplot per run: ``key`` against step, from each run's metrics.jsonl. Returns the PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {name: read_metrics(d) for name, d in runs.items()}
    curves = {n: rows for n, rows in curves.items() if any(key in r for r in rows)}
    if not curves:
        return None
    cols = min(3, len(curves))
    rows_n = math.ceil(len(curves) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.0 * rows_n), squeeze=False)
    for ax, (name, rows) in zip(axes.flat, curves.items()):
        pts = [(r["step"], r[key]) for r in rows if key in r and "step" in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.5)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(curves):]:
        ax.axis("off")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def fmt(value) -> str:
    """A table cell: floats with 3 decimals, None/NaN as n/a."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def markdown_table(header: list[str], rows: Iterable[list]) -> str:
    """A GitHub Markdown table from a header and rows of cells (formatted with ``fmt``)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(c) for c in row) + " |")
    return "\n".join(lines)


def pick_columns(flat_rows: dict[str, dict[str, float]], preferred: list[str]) -> list[str]:
    """Metric keys to show: the ``preferred`` ones present in any row, in that order; else all keys."""
    present = set().union(*[set(r) for r in flat_rows.values()]) if flat_rows else set()
    cols = [k for k in preferred if k in present]
    return cols or sorted(present)
