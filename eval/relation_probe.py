"""Relation probe: can a small transformer, trained from scratch on perfect features, judge the world's
spatial statements, or box its referring expressions? It tests the world's VSR and RefCOCO tasks, not a
checkpoint.

Each example is one of the world's VSR statements (``WorldSample.statements``, the ones stage two
trains on and ``vsr/test.jsonl`` holds) with its image's oracle grid (``vlm.model.oracle.cell_features``:
per cell one-hot shape and colour, size, foreground, coverage, and the cell's row / col)::

    [64 cells -> MLP] + [the statement's words] + [query]  -> causal transformer -> True / False

``task="refcoco"`` asks for the box of each object's referring expression (``WorldSample.referring``,
what ``refcoco/`` holds) instead: four classifications over ``BINS`` values of the normalised
x1, y1, x2, y2 (0.02 apart), scored as RefCOCO is (Acc@0.5 IoU with the true box).

Train images are the world's first ``images`` train indices, held-out ones its eval split, both
regenerated from (seed, index) as the exporter does. Two variants, trained side by side:

- ``plain``: only the above. To answer, the model must find the two named objects among the cells
  (by their shape, colour, size words) and compare their rows or columns for the relation.
- ``roles``: two more bits per cell mark the statement's subject and object cells (for refcoco the
  referred object's cells, the second bit 0). The objects are handed over; only the comparison (the
  box's extent) is left. A probe diagnostic, never a model input.

How the model is built and answers (``block``, ``answer``; the defaults are the probe's original form):
``block="llama"`` swaps the encoder layers for a ``transformers.LlamaModel`` of the same size, the world
LM's block; ``answer="tokens"`` (refcoco) reads the four coordinates one position after another, each
after the embedded ones before it, as a VLM writes a box. Both ask whether what a stage-two VLM does not
learn is the task or the way the VLM's LLM is built and answers.

A world whose ``plain`` curve stays near 0.5 while ``roles`` climbs asks more of a tiny model than
comparing two places: finding two named objects and keeping their roles apart. A stage-two VLM
(frozen LLM, LoRA, a bridge) gets the same statements with the same oracle features at best.
``vlm eval relation-probe`` runs it; outputs ``OUT/relation_probe/{summary.json, summary.md, curve.png}``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaModel

from eval.refcoco import box_iou
from eval.report import markdown_table, pyplot, save_figure, write_summary
from vlm.config import WorldConfig
from vlm.model.oracle import cell_features, cell_owner
from vlm.world.generator import generate_sample
from vlm.world.text import normalized_box
from vlm.world.types import WorldSample

TASK = "relation_probe"
VARIANTS = ("plain", "roles")
TASKS = ("vsr", "refcoco")
BLOCKS = ("encoder", "llama")
ANSWERS = ("heads", "tokens")
QUERY = "<query>"
BINS = 51  # refcoco: box coordinates 0.00, 0.02, ..., 1.00


@dataclass
class RelationExample:
    """One question: ``grid`` float [GRID*GRID, W] (W = oracle width, + 2 role bits for ``roles``), its
    lower-cased ``words``, ``label`` (vsr: true / false) and ``relation`` (vsr), or ``box`` (refcoco: the
    normalised x1, y1, x2, y2)."""

    grid: torch.Tensor
    words: list[str]
    label: bool = False
    relation: str = ""
    box: Optional[tuple[float, float, float, float]] = None

    def target(self) -> list[int]:
        """What the probe is trained to output: [label] (vsr) or the box's four bins (refcoco)."""
        if self.box is None:
            return [int(self.label)]
        return [int(round(v * (BINS - 1))) for v in self.box]


def _with_roles(grid: torch.Tensor, owner: np.ndarray, first: int, second: int) -> torch.Tensor:
    """grid [P,W] -> [P,W+2]: bits for the cells of object ``first`` and of ``second`` (-1: none)."""
    marks = np.stack([(owner == first) & (first >= 0), (owner == second) & (second >= 0)], 1)
    return torch.cat([grid, torch.from_numpy(marks).float()], 1)


def relation_examples(sample: WorldSample, roles: bool, task: str = "vsr") -> list[RelationExample]:
    """A world sample -> one example per statement (vsr) or per referring expression (refcoco);
    ``roles`` appends [subject, object] bits per cell ([referred object, 0] for refcoco)."""
    grid, owner = cell_features(sample), cell_owner(sample)
    if task == "refcoco":
        size = sample.image.shape[0]
        return [RelationExample(_with_roles(grid, owner, i, -1) if roles else grid, re.findall(r"\w+", expr.lower()),
                                box=normalized_box(sample.objects[i], size))
                for i, expr in enumerate(sample.referring)]
    return [RelationExample(_with_roles(grid, owner, st.subject, st.object) if roles else grid,
                            re.findall(r"\w+", st.text.lower()), bool(st.label), st.relation)
            for st in sample.statements]


class RelationProbe(nn.Module):
    """Cells and words in one causal sequence, the answer read from the last (query) token.

    ``forward(grid [B,P,W], tokens [B,T] long, 0 = left padding, prev=None) -> logits [B,K,C]``: K answers
    of C classes each (vsr: 1 x (false, true); refcoco: 4 coordinates x ``BINS``). ``block``: "encoder"
    (pre-norm ``nn.TransformerEncoderLayer``s, LayerNorm / GELU, learned positions) or "llama" (a
    ``transformers.LlamaModel`` of the same width, depth and heads as the world LM builds it: RMSNorm,
    SwiGLU, RoPE and HF's initialisation, the learned positions added too). ``answer``: "heads" (K
    classifications at the query token) or "tokens" (the VLM's way: answer k is read at the position
    of answer k-1, whose embedded class ``prev`` [B,K-1] follows the query, teacher-forced in training;
    ``decode`` writes them greedily)."""

    def __init__(self, cell_width: int, vocab_size: int, width: int = 128, layers: int = 2, heads: int = 4,
                 max_len: int = 128, answers: int = 1, classes: int = 2, block: str = "encoder", answer: str = "heads"):
        super().__init__()
        if block not in BLOCKS or answer not in ANSWERS:
            raise ValueError(f"relation probe: block must be one of {BLOCKS} and answer one of {ANSWERS}, "
                             f"got {block!r}, {answer!r}")
        self.cells = nn.Sequential(nn.Linear(cell_width, width), nn.GELU(), nn.Linear(width, width))
        self.words = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.randn(max_len + answers, width) * 0.02)
        if block == "encoder":
            layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
            self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        else:
            self.blocks = LlamaModel(LlamaConfig(vocab_size=1, hidden_size=width, intermediate_size=4 * width,
                                                 num_hidden_layers=layers, num_attention_heads=heads,
                                                 num_key_value_heads=heads, max_position_embeddings=max_len + answers,
                                                 attn_implementation="sdpa"))
        self.previous = nn.Embedding(classes, width) if answer == "tokens" else None
        self.head = nn.Linear(width, classes if answer == "tokens" else answers * classes)
        self.answers, self.classes, self.block, self.answer = answers, classes, block, answer

    def forward(self, grid: torch.Tensor, tokens: torch.Tensor, prev: Optional[torch.Tensor] = None) -> torch.Tensor:
        parts = [self.cells(grid), self.words(tokens)]
        if self.answer == "tokens":
            if prev is None or prev.shape != (grid.shape[0], self.answers - 1):
                raise ValueError(f"answer=tokens needs prev [B, {self.answers - 1}] (the earlier answers' classes)")
            parts.append(self.previous(prev))
        x = torch.cat(parts, 1)
        x = x + self.pos[: x.shape[1]]
        if self.block == "encoder":
            mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
            h = self.blocks(x, mask=mask, is_causal=True)
        else:
            h = self.blocks(inputs_embeds=x).last_hidden_state
        if self.answer == "tokens":
            return self.head(h[:, -self.answers:])
        return self.head(h[:, -1]).view(-1, self.answers, self.classes)

    @torch.no_grad()
    def decode(self, grid: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The argmax answers [B,K]; with answer=tokens each one written after the ones before it."""
        if self.answer == "heads":
            return self(grid, tokens).argmax(-1)
        out = torch.zeros(grid.shape[0], self.answers, dtype=torch.long)
        for k in range(self.answers):
            out[:, k] = self(grid, tokens, out[:, :-1])[:, k].argmax(-1)
        return out


def word_vocab(examples: Sequence[RelationExample]) -> dict[str, int]:
    """Every word of ``examples`` and the query token -> ids from 2 (0 = padding, 1 = unknown)."""
    return {w: k + 2 for k, w in enumerate(sorted({w for e in examples for w in e.words} | {QUERY}))}


def encode(examples: Sequence[RelationExample], vocab: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Examples -> (grid [B,P,W], tokens [B,T] left-padded with 0, ending in the query token, targets [B,K])."""
    length = max(len(e.words) for e in examples) + 1
    tokens = torch.zeros(len(examples), length, dtype=torch.long)
    for b, e in enumerate(examples):
        ids = [vocab.get(w, 1) for w in e.words] + [vocab[QUERY]]
        tokens[b, length - len(ids):] = torch.tensor(ids)
    return (torch.stack([e.grid for e in examples]), tokens,
            torch.tensor([e.target() for e in examples]))


def accuracy(model: RelationProbe, examples: Sequence[RelationExample], vocab: dict[str, int],
             batch: int = 256) -> float:
    """Fraction of ``examples`` answered right: the argmax label (vsr), or a box of IoU >= 0.5 with the
    true one from the argmax bins (refcoco, as ``eval.refcoco`` scores)."""
    model.eval()
    right = 0
    with torch.no_grad():
        for k in range(0, len(examples), batch):
            chunk = examples[k:k + batch]
            grid, tokens, targets = encode(chunk, vocab)
            pred = model.decode(grid, tokens)  # [B,K]
            if chunk[0].box is None:
                right += int((pred == targets).all(-1).sum())
            else:
                right += sum(box_iou((p / (BINS - 1)).tolist(), e.box) >= 0.5 for p, e in zip(pred, chunk))
    model.train()
    return right / len(examples)


def train_variant(train: Sequence[RelationExample], held_out: Sequence[RelationExample], vocab: dict[str, int],
                  steps: int, batch: int, lr: float, layers: int, eval_every: int, seed: int,
                  desc: str, block: str = "encoder", answer: str = "heads") -> list[dict[str, float]]:
    """AdamW from scratch on ``train``; every ``eval_every`` steps (and at the end) a row
    {step, loss, train_acc (on up to 1000 train examples), held_out_acc}. ``block`` / ``answer``: see
    ``RelationProbe`` (answer=tokens is teacher-forced: each coordinate after the true ones before it)."""
    torch.manual_seed(seed)
    grounding = train[0].box is not None
    model = RelationProbe(train[0].grid.shape[1], len(vocab) + 2, layers=layers, answers=4 if grounding else 1,
                          classes=BINS if grounding else 2, block=block, answer=answer)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    curve, losses = [], []
    for step in tqdm(range(1, steps + 1), desc=desc, leave=False):
        grid, tokens, labels = encode([train[i] for i in rng.integers(len(train), size=batch)], vocab)
        prev = labels[:, :-1] if answer == "tokens" else None
        loss = F.cross_entropy(model(grid, tokens, prev).flatten(0, 1), labels.flatten())
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
        variants: Sequence[str] = VARIANTS, task: str = "vsr", block: str = "encoder",
        answer: str = "heads") -> dict[str, Any]:
    """Train each variant on the statements (or referring expressions) of the world's first ``images``
    train images, score it on every eval-split one; write ``out/relation_probe[_refcoco][_llama][_tokens]/``
    and return the summary. ``block``: encoder | llama; ``answer``: heads | tokens (refcoco only): see
    ``RelationProbe``."""
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise ValueError(f"relation probe: variants must be among {VARIANTS}, got {list(variants)}")
    if task not in TASKS:
        raise ValueError(f"relation probe: task must be one of {TASKS}, got {task!r}")
    if block not in BLOCKS or answer not in ANSWERS or (answer == "tokens" and task != "refcoco"):
        raise ValueError(f"relation probe: block must be one of {BLOCKS}, answer one of {ANSWERS} (tokens only for "
                         f"refcoco's four coordinates), got {block!r}, {answer!r} for {task}")
    if not 0 < images <= world.n_train or world.n_eval <= 0:
        raise ValueError(f"relation probe: --images must be in [1, world.n_train={world.n_train}] and the "
                         f"world needs an eval split (n_eval={world.n_eval})")
    samples = [generate_sample(i, world.seed, world) for i in range(images)]
    held = [generate_sample(world.n_train + i, world.seed, world) for i in range(world.n_eval)]
    summary: dict[str, Any] = {"task": task, "images": images, "steps": steps, "batch": batch, "lr": lr, "layers": layers,
                               "block": block, "answer": answer, "seed": seed, "curves": {}}
    for variant in variants:
        train = [e for s in samples for e in relation_examples(s, variant == "roles", task)]
        held_out = [e for s in held for e in relation_examples(s, variant == "roles", task)]
        vocab = word_vocab(train)
        curve = train_variant(train, held_out, vocab, steps, batch, lr, layers, eval_every, seed, f"{TASK} {variant}",
                              block, answer)
        summary["curves"][variant] = curve
        summary[f"{variant}_held_out_acc"] = curve[-1]["held_out_acc"]
        summary["train_statements"], summary["held_out_statements"] = len(train), len(held_out)
        if task == "vsr":
            share = float(np.mean([e.label for e in held_out]))
            summary["held_out_majority"] = max(share, 1 - share)
    folder = Path(out) / "_".join([TASK] + [t for t in (task, block, answer) if t not in ("vsr", "encoder", "heads")])
    rows = [[v, c["step"], c["loss"], c["train_acc"], c["held_out_acc"]] for v in variants
            for c in summary["curves"][v]]
    chance = (f" (majority label {summary['held_out_majority']:.3f})" if task == "vsr" else " (accuracy = Acc@0.5 IoU)")
    md = (f"# Relation probe, {task} ({layers}-layer {block} transformer from scratch on the oracle grid, answers as "
          f"{answer}, {images} train "
          f"images, batch {batch}, lr {lr})\n\nHeld-out examples: {summary['held_out_statements']}{chance}.\n\n"
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
