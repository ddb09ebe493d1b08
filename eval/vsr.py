"""VSR: true/false spatial statements about an image; accuracy overall and per relation.

Scored by single-forward scoring: the answer is true iff log P(True) > log P(False) under
``model.score`` with the choices ``vlm.data.prompts.TRUE`` / ``FALSE`` (the margin also gives an AUC);
``mode="generate"`` parses generated text with ``parse_true_false`` instead (unparseable = wrong,
counted separately).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from tqdm.auto import tqdm

from eval.io import batched, pixel_batch
from eval.parsing import parse_true_false
from eval.pope import roc_auc
from eval.report import markdown_table, write_task_outputs
from vlm.data.prompts import FALSE, TRUE, vsr_prompt

TASK = "vsr"


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


def run(model, data: VsrData, out_dir: str | Path, limit: Optional[int] = None, batch_size: int = 32,
        mode: str = "score", max_new_tokens: int = 8, progress: bool = True) -> dict[str, Any]:
    """Answer the first ``limit`` statements and write ``out_dir/vsr/``."""
    if mode not in ("score", "generate"):
        raise ValueError(f"mode must be 'score' or 'generate', got {mode!r}")
    items = data.items[: limit if limit is not None else None]
    if not items:
        raise ValueError("vsr: no statements")
    cache: dict = {}
    records, pred, gold, rels, margins = [], [], [], [], []
    with tqdm(total=len(items), desc=TASK, disable=not progress) as bar:
        for start, chunk in zip(range(0, len(items), batch_size), batched(items, batch_size)):
            pixels = pixel_batch(model, [Path(data.image_root) / it.image for it in chunk], cache)
            prompts = [vsr_prompt(it.caption) for it in chunk]
            if mode == "score":
                logp = torch.as_tensor(model.score(pixels, prompts, [TRUE, FALSE]), dtype=torch.float64).tolist()
                outputs = [{"logp_true": a, "logp_false": b} for a, b in logp]
                answers: list[Optional[bool]] = [a > b for a, b in logp]
                margins += [a - b for a, b in logp]
            else:
                texts = model.generate(pixels, prompts, max_new_tokens=max_new_tokens)
                outputs = [{"text": t} for t in texts]
                answers = [parse_true_false(t) for t in texts]
            for k, (it, prompt, o, a) in enumerate(zip(chunk, prompts, outputs, answers)):
                g = bool(it.label)
                records.append({"id": start + k, "image": it.image, "relation": it.relation, "prompt": prompt, **o,
                                "answer": a, "gold": g, "correct": a is not None and a == g})
                pred.append(a)
                gold.append(g)
                rels.append(it.relation)
            bar.update(len(chunk))
    summary = vsr_metrics(pred, gold, rels, margins if mode == "score" else None)
    summary["mode"] = mode
    rows = [[r, m["accuracy"], m["n"]] for r, m in summary["relations"].items()]
    rows.append(["all", summary["accuracy"], summary["n"]])
    md = (f"# {TASK} ({mode})\n\n" + markdown_table(["relation", "accuracy", "n"], rows)
          + (f"\n\nAUC (logP(True) - logP(False)): {summary['auc']:.4f}\n" if "auc" in summary and summary["auc"] == summary["auc"] else "\n"))
    write_task_outputs(out_dir, TASK, summary, records, md)
    return summary
