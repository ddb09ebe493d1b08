"""Markdown tables and JSON summaries: what every eval task (and the demo report) writes.

Every task writes three files into its own folder: ``predictions.jsonl`` (one line per example,
so a score can be traced to the outputs it came from), ``summary.json`` (the numbers) and
``summary.md`` (the same numbers as a Markdown table).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping


def fmt(value: Any, digits: int = 4) -> str:
    """One table cell: floats with ``digits`` decimals, None / NaN / inf as ``n/a``, the rest str()."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else "n/a"
    return str(value)


def markdown_table(header: list[str], rows: Iterable[Iterable[Any]], digits: int = 4) -> str:
    """A GitHub Markdown table: ``header`` (n column names) and rows of n cells each -> text."""
    header = [str(h) for h in header]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
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


def _jsonable(value: Any) -> Any:
    """NaN / inf (not valid JSON) -> None; Paths -> str; numpy/torch scalars -> Python numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch 0-d values
        try:
            return _jsonable(value.item())
        except (ValueError, RuntimeError):
            pass
    return value


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented, strict JSON (NaN -> null); parents created. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n")
    return path


def write_jsonl(path: str | Path, records: Iterable[Mapping[str, Any]]) -> Path:
    """Write one JSON object per line (NaN -> null); parents created. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for rec in records:
            f.write(json.dumps(_jsonable(rec), allow_nan=False) + "\n")
    return path


def write_task_outputs(out_dir: str | Path, task: str, summary: Mapping[str, Any],
                       predictions: Iterable[Mapping[str, Any]], markdown: str | None = None) -> Path:
    """Write ``out_dir/task/{predictions.jsonl, summary.json, summary.md}``; returns the task folder.

    ``markdown`` replaces the default two-column table (used for per-split tables).
    """
    folder = Path(out_dir) / task
    write_jsonl(folder / "predictions.jsonl", predictions)
    write_json(folder / "summary.json", summary)
    (folder / "summary.md").write_text(markdown if markdown is not None else summary_markdown(task, summary))
    return folder
