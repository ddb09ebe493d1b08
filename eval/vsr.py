"""VSR: true/false spatial statements about an image; accuracy overall and per relation.

Scored by single-forward scoring: the answer is true iff log P(True) > log P(False) under
``model.score`` with the choices ``vlm.data.prompts.TRUE`` / ``FALSE`` (the margin also gives an AUC);
``mode="generate"`` parses generated text with ``parse_true_false`` instead (unparseable = wrong,
counted separately).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from eval.io import RunOptions, batched, pixel_batch
from eval.parsing import parse_true_false
from eval.pope import roc_auc
from eval.report import markdown_table, write_task_outputs
from eval.sources import EvalSources, check_images, first
from vlm.data.formats import read_vsr
from vlm.data.prompts import FALSE, TRUE, vsr_prompt

TASK = "vsr"
HEADLINE = ["accuracy", "auc", "n"]  # the harness's combined summary.md
REPORT_COLUMNS = ["accuracy"]  # the demo / ablation tables
MAX_NEW_TOKENS = 8


def vsr_metrics(pred: Sequence[Optional[bool]], gold: Sequence[bool], relations: Sequence[str],
                margins: Optional[Sequence[float]] = None) -> dict[str, Any]:
    """Accuracy overall and per relation. ``pred``: per example True / False, or None (unparseable,
    wrong); ``gold``: bools; ``relations``: per example; ``margins`` (optional): logP(True) -
    logP(False) for the AUC."""
    if not (len(pred) == len(gold) == len(relations)):
        raise ValueError(f"lengths differ: {len(pred)} predictions, {len(gold)} labels, {len(relations)} relations")
    if not gold:
        raise ValueError("no examples")
    correct = [p is not None and p == g for p, g in zip(pred, gold)]
    per_rel: dict[str, dict[str, float]] = {}
    for rel in sorted(set(relations)):
        idx = [i for i, r in enumerate(relations) if r == rel]
        per_rel[rel] = {"accuracy": sum(correct[i] for i in idx) / len(idx), "n": len(idx)}
    out: dict[str, Any] = {"accuracy": sum(correct) / len(correct), "n": len(correct),
                           "unparseable": sum(p is None for p in pred), "relations": per_rel}
    if margins is not None:
        out["auc"] = roc_auc(list(margins), list(gold))
    return out


@dataclass
class VsrData:
    """VSR statements (``vlm.data.formats.VsrItem``: image, caption, label 0|1, relation) and the
    folder their image file names are relative to."""

    items: list
    image_root: Path


def load(src: EvalSources, limit: Optional[int] = None) -> VsrData:
    """Read and check the VSR files (``vsr``, ``vsr_images``) -> ``VsrData`` (every statement; the
    images of the first ``limit`` are checked)."""
    root = src.folder("vsr_images")
    items = read_vsr(src.file("vsr"))
    check_images([root / it.image for it in first(items, limit)], TASK)
    return VsrData(items, root)


def answer_batch(model, pixels, items: Sequence, mode: str,
                 ask: Callable[[str], str] = vsr_prompt) -> tuple[list[Optional[bool]], list[dict], list[float]]:
    """Answer one batch (pixels [B,3,H,W]; each statement asked as ``ask(caption)``) -> (True / False /
    None (unparseable), per-item output fields, margins logP(True) - logP(False) (empty in "generate" mode))."""
    prompts = [ask(it.caption) for it in items]
    if mode == "score":
        logp = torch.as_tensor(model.score(pixels, prompts, [TRUE, FALSE]), dtype=torch.float64).tolist()
        outputs = [{"logp_true": a, "logp_false": b} for a, b in logp]
        return [a > b for a, b in logp], outputs, [a - b for a, b in logp]
    texts = model.generate(pixels, prompts, max_new_tokens=MAX_NEW_TOKENS)
    return [parse_true_false(t) for t in texts], [{"text": t} for t in texts], []


def run(model, data: VsrData, out_dir: str | Path, limit: Optional[int] = None, batch_size: int = 16,
        options: Optional[RunOptions] = None) -> dict[str, Any]:
    """Answer the first ``limit`` statements ([B,3,H,W] batches of ``batch_size``; ``options.answer_mode``
    "score" or "generate") and write ``out_dir/vsr/``; returns the summary (``vsr_metrics`` plus the mode)."""
    options = options or RunOptions()
    mode = options.answer_mode
    items = first(data.items, limit)
    if not items:
        raise ValueError("vsr: no statements")
    cache: dict = {}
    records: list[dict] = []
    with tqdm(total=len(items), desc=TASK, disable=not options.progress) as bar:
        for chunk in batched(items, batch_size):
            pixels = pixel_batch(model, [Path(data.image_root) / it.image for it in chunk], cache, blank=options.blank_image)
            answers, outputs, _ = answer_batch(model, pixels, chunk, mode, options.prompts.vsr)
            for it, o, a in zip(chunk, outputs, answers):
                g = bool(it.label)
                records.append({"id": len(records), "image": it.image, "relation": it.relation,
                                "prompt": options.prompts.vsr(it.caption), **o, "answer": a, "gold": g,
                                "correct": a is not None and a == g})
            bar.update(len(chunk))
    return write_outputs(out_dir, records, mode, options.prompt_set)


def write_outputs(out_dir: str | Path, records: list[dict], mode: str, prompt_set: Optional[str]) -> dict[str, Any]:
    """Score answered ``records`` (answer, gold, relation; "score" mode: logp_true, logp_false for
    the AUC), write ``out_dir/vsr/`` and return the summary (``vsr_metrics`` plus the mode)."""
    margins = [r["logp_true"] - r["logp_false"] for r in records] if mode == "score" else None
    summary = vsr_metrics([r["answer"] for r in records], [r["gold"] for r in records],
                          [r["relation"] for r in records], margins)
    summary["mode"] = mode
    summary["prompt_set"] = prompt_set
    write_task_outputs(out_dir, TASK, summary, records, task_markdown(summary, mode))
    return summary


def task_markdown(summary: dict[str, Any], mode: str) -> str:
    """The per-relation table of ``vsr/summary.md`` (and the AUC when there is one)."""
    rows = [[r, m["accuracy"], m["n"]] for r, m in summary["relations"].items()]
    rows.append(["all", summary["accuracy"], summary["n"]])
    auc = summary.get("auc")
    return (f"# {TASK} ({mode}, prompt set {summary.get('prompt_set')})\n\n" + markdown_table(["relation", "accuracy", "n"], rows)
            + (f"\n\nAUC (logP(True) - logP(False)): {auc:.4f}\n" if auc is not None and auc == auc else "\n"))
