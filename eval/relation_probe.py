"""Relation probe: can a small transformer, trained from scratch on perfect features, judge the world's
spatial statements? It tests the world's VSR task, not a checkpoint.

Each example is one of the world's VSR statements (``WorldSample.statements``, the ones stage two
trains on and ``vsr/test.jsonl`` holds) with its image's oracle grid (``vlm.model.oracle.cell_features``:
per cell one-hot shape and colour, size, foreground, coverage, and the cell's row / col)::

    [64 cells -> MLP] + [the statement's words] + [query]  -> causal transformer -> True / False

Train images are the world's first ``images`` train indices, held-out ones its eval split, both
regenerated from (seed, index) as the exporter does. Two variants, trained side by side:

- ``plain``: only the above. To answer, the model must find the two named objects among the cells
  (by their shape, colour, size words) and compare their rows or columns for the relation.
- ``roles``: two more bits per cell mark the statement's subject and object cells. The objects are
  handed over; only the comparison is left. A probe diagnostic, never a model input.

A world whose ``plain`` curve stays near 0.5 while ``roles`` climbs asks more of a tiny model than
comparing two places: finding two named objects and keeping their roles apart. A stage-two VLM
(frozen LLM, LoRA, a bridge) gets the same statements with the same oracle features at best.
``vlm eval relation-probe`` runs it; outputs ``OUT/relation_probe/{summary.json, summary.md, curve.png}``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from eval.report import markdown_table, pyplot, save_figure, write_summary
from vlm.config import WorldConfig
from vlm.model.oracle import GRID, cell_bounds, cell_features
from vlm.world.generator import generate_sample
from vlm.world.types import WorldSample

TASK = "relation_probe"
VARIANTS = ("plain", "roles")
QUERY = "<query>"


@dataclass
class RelationExample:
    """One statement: ``grid`` float [GRID*GRID, W] (W = oracle width, + 2 role bits for ``roles``),
    its lower-cased ``words``, ``label`` (true / false) and ``relation``."""

    grid: torch.Tensor
    words: list[str]
    label: bool
    relation: str


def cell_owner(sample: WorldSample, grid: int = GRID) -> np.ndarray:
    """Per cell the index of the object with most pixels in it (as ``cell_features`` picks it), -1
    for a cell without object pixels -> int [grid*grid], row-major."""
    inst = sample.instance_mask
    ys, xs = cell_bounds(inst.shape[0], grid), cell_bounds(inst.shape[1], grid)
    if not sample.objects:
        return np.full(grid * grid, -1)
    ids = np.arange(1, len(sample.objects) + 1)
    per_object = (inst[None] == ids[:, None, None]).astype(np.int64)
    counts = np.add.reduceat(np.add.reduceat(per_object, ys[:-1], axis=1), xs[:-1], axis=2).reshape(len(ids), -1)
    return np.where(counts.sum(0) > 0, counts.argmax(0), -1)


def relation_examples(sample: WorldSample, roles: bool) -> list[RelationExample]:
    """A world sample -> one example per statement; ``roles`` appends [subject, object] bits per cell."""
    grid = cell_features(sample)
    owner = cell_owner(sample)
    out = []
    for st in sample.statements:
        g = grid
        if roles:
            marks = np.stack([owner == st.subject, owner == st.object], 1)
            g = torch.cat([grid, torch.from_numpy(marks).float()], 1)
        out.append(RelationExample(g, re.findall(r"\w+", st.text.lower()), bool(st.label), st.relation))
    return out


class RelationProbe(nn.Module):
    """Cells and words in one causal sequence, the answer read from the last (query) token.

    ``forward(grid [B,P,W], tokens [B,T] long, 0 = left padding) -> logits [B,2]`` (false, true)."""

    def __init__(self, cell_width: int, vocab_size: int, width: int = 128, layers: int = 2, heads: int = 4,
                 max_len: int = 128):
        super().__init__()
        self.cells = nn.Sequential(nn.Linear(cell_width, width), nn.GELU(), nn.Linear(width, width))
        self.words = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.randn(max_len, width) * 0.02)
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, 2)

    def forward(self, grid: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.cells(grid), self.words(tokens)], 1)
        x = x + self.pos[: x.shape[1]]
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.head(self.blocks(x, mask=mask, is_causal=True)[:, -1])


def encode(examples: Sequence[RelationExample], vocab: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Examples -> (grid [B,P,W], tokens [B,T] left-padded with 0, ending in the query token, labels [B])."""
    length = max(len(e.words) for e in examples) + 1
    tokens = torch.zeros(len(examples), length, dtype=torch.long)
    for b, e in enumerate(examples):
        ids = [vocab.get(w, 1) for w in e.words] + [vocab[QUERY]]
        tokens[b, length - len(ids):] = torch.tensor(ids)
    return (torch.stack([e.grid for e in examples]), tokens,
            torch.tensor([int(e.label) for e in examples]))


def accuracy(model: RelationProbe, examples: Sequence[RelationExample], vocab: dict[str, int],
             batch: int = 256) -> float:
    """Fraction of ``examples`` whose argmax answer is the label."""
    model.eval()
    right = 0
    with torch.no_grad():
        for k in range(0, len(examples), batch):
            grid, tokens, labels = encode(examples[k:k + batch], vocab)
            right += int((model(grid, tokens).argmax(-1) == labels).sum())
    model.train()
    return right / len(examples)


def train_variant(train: Sequence[RelationExample], held_out: Sequence[RelationExample], vocab: dict[str, int],
                  steps: int, batch: int, lr: float, layers: int, eval_every: int, seed: int,
                  desc: str) -> list[dict[str, float]]:
    """AdamW from scratch on ``train``; every ``eval_every`` steps (and at the end) a row
    {step, loss, train_acc (on up to 1000 train examples), held_out_acc}."""
    torch.manual_seed(seed)
    model = RelationProbe(train[0].grid.shape[1], len(vocab) + 2, layers=layers)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    curve, losses = [], []
    for step in tqdm(range(1, steps + 1), desc=desc, leave=False):
        grid, tokens, labels = encode([train[i] for i in rng.integers(len(train), size=batch)], vocab)
        loss = F.cross_entropy(model(grid, tokens), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % eval_every == 0 or step == steps:
            curve.append({"step": step, "loss": float(np.mean(losses[-eval_every:])),
                          "train_acc": accuracy(model, train[:1000], vocab),
                          "held_out_acc": accuracy(model, held_out, vocab)})
    return curve


def run(world: WorldConfig, out: str | Path, images: int = 8000, steps: int = 1500, batch: int = 64,
        lr: float = 1e-3, layers: int = 2, eval_every: int = 250, seed: int = 0,
        variants: Sequence[str] = VARIANTS) -> dict[str, Any]:
    """Train each variant on the statements of the world's first ``images`` train images, score it on
    every eval-split statement; write ``out/relation_probe/`` and return the summary."""
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise ValueError(f"relation probe: variants must be among {VARIANTS}, got {list(variants)}")
    if not 0 < images <= world.n_train or world.n_eval <= 0:
        raise ValueError(f"relation probe: --images must be in [1, world.n_train={world.n_train}] and the "
                         f"world needs an eval split (n_eval={world.n_eval})")
    samples = [generate_sample(i, world.seed, world) for i in range(images)]
    held = [generate_sample(world.n_train + i, world.seed, world) for i in range(world.n_eval)]
    summary: dict[str, Any] = {"images": images, "steps": steps, "batch": batch, "lr": lr, "layers": layers,
                               "seed": seed, "curves": {}}
    for variant in variants:
        train = [e for s in samples for e in relation_examples(s, variant == "roles")]
        held_out = [e for s in held for e in relation_examples(s, variant == "roles")]
        vocab = {w: k + 2 for k, w in enumerate(sorted({w for e in train for w in e.words} | {QUERY}))}  # 1 = unknown
        curve = train_variant(train, held_out, vocab, steps, batch, lr, layers, eval_every, seed, f"{TASK} {variant}")
        summary["curves"][variant] = curve
        summary[f"{variant}_held_out_acc"] = curve[-1]["held_out_acc"]
        summary["train_statements"], summary["held_out_statements"] = len(train), len(held_out)
        summary["held_out_majority"] = max(np.mean([e.label for e in held_out]), 1 - np.mean([e.label for e in held_out]))
    folder = Path(out) / TASK
    rows = [[v, c["step"], c["loss"], c["train_acc"], c["held_out_acc"]] for v in variants
            for c in summary["curves"][v]]
    md = (f"# Relation probe ({layers}-layer transformer from scratch on the oracle grid, {images} train images, "
          f"batch {batch}, lr {lr})\n\nHeld-out statements: {summary['held_out_statements']} (majority label "
          f"{summary['held_out_majority']:.3f}).\n\n"
          + markdown_table(["variant", "step", "loss", "train acc", "held-out acc"], rows, digits=3) + "\n")
    write_summary(folder, summary, md)
    plot_curves(summary["curves"], folder / "curve.png")
    return summary


def plot_curves(curves: dict[str, list[dict[str, float]]], out_png: str | Path) -> Path:
    """Held-out accuracy against step, one line per variant, chance at 0.5."""
    fig, ax = pyplot().subplots(figsize=(5, 3.4))
    for variant, rows in curves.items():
        ax.plot([r["step"] for r in rows], [r["held_out_acc"] for r in rows], marker="o", label=variant)
    ax.axhline(0.5, color="grey", lw=1, ls="--", label="chance")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0.4, 1.0)
    ax.legend()
    ax.grid(alpha=0.3)
    return save_figure(fig, out_png, dpi=110)
