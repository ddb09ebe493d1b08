"""The report toolkit: Markdown tables, JSON files written atomically, and figures.

Every eval task writes three files into its own folder: ``predictions.jsonl`` (one line per example,
so a score can be traced to the outputs it came from), ``summary.json`` (the numbers) and
``summary.md`` (the same numbers as a Markdown table). The encoder eval, the harness, ``vlm demo``,
``vlm ablate`` and the benchmarks build their tables and figures with the same helpers:

    markdown_table(header, rows, digits)       one GitHub table (cells through ``fmt``)
    metrics_table(first, rows, preferred)      name x metric table of flattened summaries
    write_json / write_jsonl / write_text      atomic writes (a killed run leaves no half file)
    cached_json(path, fn, ...)                 a summary saved by an earlier run, or fn's, saved
    write_summary(folder, summary, markdown)   summary.json + summary.md
    plot_training_curves, subplot_grid, save_figure   PNG figures (matplotlib, Agg backend)
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

from vlm.files import atomic_path, atomic_write_text, read_jsonl_rows

# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 4) -> str:
    """One table cell: floats with ``digits`` decimals, None / NaN / inf as ``n/a``, the rest str()."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else "n/a"
    return str(value)


def markdown_table(header: list[str], rows: Iterable[Iterable[Any]], digits: int = 4, align: str = "") -> str:
    """A GitHub Markdown table: ``header`` (n column names) and rows of n cells each -> text.
    ``align``: one letter per column, "r" right-aligns it (default: all left)."""
    header = [str(h) for h in header]
    rules = ["---:" if a == "r" else "---" for a in align.ljust(len(header), "l")]
    lines = ["| " + " | ".join(header) + " |", "|" + "".join(f"{r}|" for r in rules)]
    for row in rows:
        cells = [fmt(c, digits).replace("|", "\\|") for c in row]
        if len(cells) != len(header):
            raise ValueError(f"row has {len(cells)} cells, header has {len(header)}: {cells}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def flatten(summary: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a/b/c": leaf}. Lists and other non-dict leaves are kept as they are."""
    out: dict[str, Any] = {}
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "/"))
        else:
            out[name] = value
    return out


def summary_markdown(title: str, summary: Mapping[str, Any], digits: int = 4) -> str:
    """A '# title' heading and a two-column (metric, value) table of the summary's scalar leaves."""
    flat = flatten(summary)
    rows = [[k, v] for k, v in flat.items() if v is None or isinstance(v, (int, float, str, bool))]
    return f"# {title}\n\n" + markdown_table(["metric", "value"], rows, digits) + "\n"


def pick_columns(flat_rows: Mapping[str, Mapping[str, Any]], preferred: list[str]) -> list[str]:
    """Metric keys to show: the ``preferred`` ones present in any row, in that order; else all keys."""
    present = set().union(*[set(r) for r in flat_rows.values()]) if flat_rows else set()
    cols = [k for k in preferred if k in present]
    return cols or sorted(present)


def metrics_table(first: str, rows: Mapping[str, Mapping[str, Any]], preferred: list[str], digits: int = 3,
                  cell: Optional[Callable[[Mapping[str, Any], str], Any]] = None) -> str:
    """A (name, metric...) table: one row per ``rows`` entry (name -> {metric: value}), the columns
    ``pick_columns(rows, preferred)``; ``cell(metrics, key)`` gives a cell (default: the value or None)."""
    cols = pick_columns(rows, preferred)
    get = cell or (lambda metrics, key: metrics.get(key))
    return markdown_table([first, *cols], [[name, *[get(m, c) for c in cols]] for name, m in rows.items()], digits)


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def jsonable(value: Any) -> Any:
    """NaN / inf (not valid JSON) -> None; Paths -> str; numpy/torch scalars -> Python numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch 0-d values
        try:
            return jsonable(value.item())
        except (ValueError, RuntimeError):
            pass
    return value


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (``vlm.files.atomic_path``: a temporary file beside
    it, fsynced, then renamed); parents created."""
    return atomic_write_text(path, text)


def json_text(obj: Any, indent: Optional[int] = 2, strict: bool = True) -> str:
    """``obj`` as JSON text. ``strict``: valid JSON (``jsonable``: NaN -> null); else as ``json.dumps``
    writes it (NaN kept, objects it cannot encode as str())."""
    if strict:
        return json.dumps(jsonable(obj), indent=indent, allow_nan=False)
    return json.dumps(obj, indent=indent, default=str)


def write_json(path: str | Path, obj: Any, indent: int = 2, strict: bool = True, newline: bool = True) -> Path:
    """Write ``obj`` as indented JSON (``json_text``), with a final newline unless ``newline`` is False."""
    return write_text(path, json_text(obj, indent, strict) + ("\n" if newline else ""))


def write_jsonl(path: str | Path, records: Iterable[Mapping[str, Any]]) -> Path:
    """Write one strict JSON object per line (NaN -> null); parents created. Returns the path."""
    return write_text(path, "".join(json_text(rec, indent=None) + "\n" for rec in records))


def cached_json(path: str | Path, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The JSON already saved at ``path`` by an earlier run, else ``fn(*args, **kwargs)`` saved there
    (as ``json.dumps`` writes it: NaN kept, other objects as str, no final newline). A saved file
    that does not parse (truncated) is recomputed, with a warning."""
    path = Path(path)
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (ValueError, OSError) as e:  # cut short by a kill before writes were atomic: redo it
            print(f"warning: {path} is unreadable ({e}); recomputing it", file=sys.stderr)
    result = fn(*args, **kwargs)
    write_json(path, result, strict=False, newline=False)
    return result


def write_summary(folder: str | Path, summary: Mapping[str, Any], markdown: str, indent: int = 2,
                  newline: bool = True) -> Path:
    """Write ``folder/summary.json`` (strict, see ``write_json``) and ``folder/summary.md``; returns the folder."""
    folder = Path(folder)
    write_json(folder / "summary.json", summary, indent=indent, newline=newline)
    write_text(folder / "summary.md", markdown)
    return folder


def write_task_outputs(out_dir: str | Path, task: str, summary: Mapping[str, Any],
                       predictions: Iterable[Mapping[str, Any]], markdown: str | None = None) -> Path:
    """Write ``out_dir/task/{predictions.jsonl, summary.json, summary.md}``; returns the task folder.

    ``markdown`` replaces the default two-column table (used for per-split tables).
    """
    folder = Path(out_dir) / task
    write_jsonl(folder / "predictions.jsonl", predictions)
    return write_summary(folder, summary, markdown if markdown is not None else summary_markdown(task, summary))


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend."""
    # Imported here: pyplot costs ~2 s and only the figure-drawing callers need it.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def subplot_grid(n_rows: int, n_cols: int, cell_width: float, cell_height: float):
    """(figure, axes [n_rows, n_cols]) with each panel ``cell_width`` x ``cell_height`` inches."""
    return pyplot().subplots(n_rows, n_cols, figsize=(cell_width * n_cols, cell_height * n_rows), squeeze=False)


def save_figure(fig, out_png: str | Path, dpi: int) -> Path:
    """Lay out ``fig``, write it to ``out_png`` (parents created) and close it. Returns the path."""
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=dpi)
    pyplot().close(fig)
    return out_png


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl`` (one dict per logged step); [] when absent."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return read_jsonl_rows(path)  # a last line cut short by a kill is dropped


def plot_training_curves(runs: Mapping[str, Path], out_png: str | Path, key: str = "loss") -> Path | None:
    """One subplot per run: ``key`` against step, from each run's metrics.jsonl. Returns the PNG
    (None when no run logged ``key``)."""
    curves = {name: read_metrics(d) for name, d in runs.items()}
    curves = {n: rows for n, rows in curves.items() if any(key in r for r in rows)}
    if not curves:
        return None
    cols = min(3, len(curves))
    fig, axes = subplot_grid(math.ceil(len(curves) / cols), cols, 4.2, 3.0)
    for ax, (name, rows) in zip(axes.flat, curves.items()):
        pts = [(r["step"], r[key]) for r in rows if key in r and "step" in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.5)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(curves):]:
        ax.axis("off")
    return save_figure(fig, out_png, dpi=110)
