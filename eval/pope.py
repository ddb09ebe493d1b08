"""POPE (Li et al., 2023): yes/no object-existence questions, per negative-sampling split.

Answers come from single-forward scoring (``model.score`` with the choices ``vlm.data.prompts.YES`` /
``NO``: yes iff log P(Yes) > log P(No); the margin log P(Yes) - log P(No) also gives an AUC) or,
with ``mode="generate"``, from generated text parsed the reference way (``parse_yes_no``).
Per split: accuracy, precision, recall, F1 (positive = yes), yes-ratio; over splits: the mean
F1 (``f1_avg``, as LLaVA-1.5 reports), the mean accuracy and the mean yes-ratio.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from eval.io import RunOptions, batched, pixel_batch
from eval.parsing import parse_yes_no
from eval.report import markdown_table, write_task_outputs
from eval.sources import EvalSources, check_images, first
from vlm.data.formats import read_pope
from vlm.data.prompts import NO, YES, pope_prompt

TASK = "pope"
SPLITS = ("random", "popular", "adversarial")
HEADLINE = ["f1_avg", "accuracy_avg", "random/f1", "popular/f1", "adversarial/f1"]  # combined summary.md
REPORT_COLUMNS = ["f1_avg", "accuracy_avg", "random/f1", "popular/f1", "adversarial/f1"]  # demo / ablation
MAX_NEW_TOKENS = 8


def binary_metrics(pred: Sequence[bool], gold: Sequence[bool]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (positive = True) and the ratio of positive predictions.

    pred, gold: equal-length sequences of bools. Precision / recall / F1 with a zero denominator
    are 0 (the POPE reference divides by zero there; a model that never says yes gets 0, not NaN).
    """
    if len(pred) != len(gold):
        raise ValueError(f"{len(pred)} predictions for {len(gold)} labels")
    if not gold:
        raise ValueError("no examples")
    tp = sum(1 for p, g in zip(pred, gold) if p and g)
    fp = sum(1 for p, g in zip(pred, gold) if p and not g)
    fn = sum(1 for p, g in zip(pred, gold) if not p and g)
    tn = len(gold) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / len(gold), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / len(gold), "n": len(gold), "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve of ``scores`` (higher = more positive) for boolean ``labels``.

    The Mann-Whitney statistic: P(score of a random positive > score of a random negative), ties
    counting one half. NaN when only one class is present. O(n log n) via average ranks.
    """
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores for {len(labels)} labels")
    n_pos = sum(1 for y in labels if y)
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        avg = (i + j) / 2 + 1  # 1-based average rank of the tie group
        for k in range(i, j + 1):
            ranks[order[k]] = avg
        i = j + 1
    rank_sum = sum(r for r, y in zip(ranks, labels) if y)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def pope_summary(per_split: dict[str, tuple[list[bool], list[bool], Optional[list[float]]]]) -> dict[str, Any]:
    """split -> (predicted yes, gold yes, margins or None) -> {split: metrics (+ auc)}, f1_avg, accuracy_avg,
    yes_ratio_avg."""
    out: dict[str, Any] = {}
    for split, (pred, gold, margin) in per_split.items():
        m = binary_metrics(pred, gold)
        if margin is not None:
            m["auc"] = roc_auc(margin, gold)
        out[split] = m
    if per_split:
        out["f1_avg"] = sum(out[s]["f1"] for s in per_split) / len(per_split)
        out["accuracy_avg"] = sum(out[s]["accuracy"] for s in per_split) / len(per_split)
        out["yes_ratio_avg"] = sum(out[s]["yes_ratio"] for s in per_split) / len(per_split)
    return out


@dataclass
class PopeData:
    """POPE questions per split (``vlm.data.formats.PopeQuestion``: question_id, image, text, label)
    and the folder their ``image`` file names are relative to."""

    questions: dict[str, list]
    image_root: Path


def load(src: EvalSources, limit: Optional[int] = None) -> PopeData:
    """Read and check the POPE files (``pope_<split>`` per split, ``pope_images``) -> ``PopeData``
    with the first ``limit`` questions of each split."""
    root = src.folder("pope_images")
    questions = {s: first(read_pope(src.file(f"pope_{s}")), limit) for s in SPLITS}
    check_images([root / q.image for qs in questions.values() for q in qs], TASK)
    return PopeData(questions, root)


def answer_batch(model, pixels, questions: Sequence, mode: str,
                 ask: Callable[[str], str] = pope_prompt) -> tuple[list[str], list[dict], list[float]]:
    """Answer one batch (pixels [B,3,H,W]; each question asked as ``ask(text)``) -> (answers
    "yes"/"no"/..., per-question output fields, margins log P(Yes) - log P(No) (empty in "generate" mode))."""
    prompts = [ask(q.text) for q in questions]
    if mode == "score":
        logp = torch.as_tensor(model.score(pixels, prompts, [YES, NO]), dtype=torch.float64)
        outputs = [{"logp_yes": float(a), "logp_no": float(b)} for a, b in logp.tolist()]
        answers = ["yes" if o["logp_yes"] > o["logp_no"] else "no" for o in outputs]
        return answers, outputs, [o["logp_yes"] - o["logp_no"] for o in outputs]
    texts = model.generate(pixels, prompts, max_new_tokens=MAX_NEW_TOKENS)
    return [parse_yes_no(t) for t in texts], [{"text": t} for t in texts], []


def run(model, data: PopeData, out_dir: str | Path, limit: Optional[int] = None, batch_size: int = 16,
        options: Optional[RunOptions] = None) -> dict[str, Any]:
    """Answer every question (first ``limit`` per split; [B,3,H,W] batches of ``batch_size``) and
    write ``out_dir/pope/``; returns the summary (``pope_summary`` plus the mode).

    ``options.answer_mode`` "score": yes iff model.score(...)[Yes] > [No] (AUC from the margin);
    "generate": the generated answer parsed with ``parse_yes_no`` (no AUC).
    """
    options = options or RunOptions()
    mode = options.answer_mode
    todo = {s: first(qs, limit) for s, qs in data.questions.items()}
    total = sum(len(q) for q in todo.values())
    if total == 0:
        raise ValueError("pope: no questions")
    cache: dict = {}
    records: list[dict] = []
    with tqdm(total=total, desc=TASK, disable=not options.progress) as bar:
        for split, qs in todo.items():
            for chunk in batched(qs, batch_size):
                pixels = pixel_batch(model, [Path(data.image_root) / q.image for q in chunk], cache, blank=options.blank_image)
                answers, outputs, _ = answer_batch(model, pixels, chunk, mode, options.prompts.pope)
                records += [{"id": q.question_id, "split": split, "image": q.image,
                             "prompt": options.prompts.pope(q.text), **o, "answer": a, "gold": q.label,
                             "correct": a == q.label} for q, o, a in zip(chunk, outputs, answers)]
                bar.update(len(chunk))
    return write_outputs(out_dir, records, mode, options.prompt_set)


def write_outputs(out_dir: str | Path, records: list[dict], mode: str, prompt_set: Optional[str]) -> dict[str, Any]:
    """Score answered ``records`` (split, answer, gold; "score" mode: logp_yes, logp_no for the AUC),
    write ``out_dir/pope/`` and return the summary (``pope_summary`` plus the mode and prompt set)."""
    per_split: dict[str, tuple[list[bool], list[bool], Optional[list[float]]]] = {}
    for split in dict.fromkeys(r["split"] for r in records):
        rows = [r for r in records if r["split"] == split]
        margins = [r["logp_yes"] - r["logp_no"] for r in rows] if mode == "score" else None
        per_split[split] = ([r["answer"] == "yes" for r in rows], [r["gold"] == "yes" for r in rows], margins)
    summary = pope_summary(per_split)
    summary["mode"] = mode
    summary["prompt_set"] = prompt_set
    write_task_outputs(out_dir, TASK, summary, records, task_markdown(summary, list(per_split), mode))
    return summary


def task_markdown(summary: dict[str, Any], splits: list[str], mode: str) -> str:
    """The per-split table of ``pope/summary.md``."""
    cols = ["accuracy", "precision", "recall", "f1", "yes_ratio"] + (["auc"] if mode == "score" else [])
    return (f"# {TASK} ({mode}, prompt set {summary.get('prompt_set')})\n\n"
            + markdown_table(["split", *cols, "n"], [[s, *[summary[s][c] for c in cols], summary[s]["n"]] for s in splits])
            + f"\n\nF1 averaged over splits: {summary['f1_avg']:.4f}\n")
