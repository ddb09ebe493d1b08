"""The world LM's training step: the output head on every position (HF's ``labels=`` loss) against
only the labelled positions (``training.lm.CausalLMObjective``), side by side on the same batch of
the recipe's answers-only documents (``configs/lm/tiny_world.yaml``, a small world sample)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from bench.common import Row, median_time
from training.lm import CausalLMObjective, build_lm, corpus_blocks
from vlm.config import LMConfig, load_config
from vlm.model.processor import IGNORE_INDEX

ROOT = Path(__file__).resolve().parents[1]


def run(warmup: int = 2, iters: int = 7, samples: int = 400) -> list[Row]:
    """Forward + backward time of both losses on one recipe-sized batch; returns the rows."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(LMConfig, ROOT / "configs/lm/tiny_world.yaml",
                          [f"data.max_world_samples={samples}", f"run.out_dir={tmp}"])
        blocks, labels, tokenizer, _ = corpus_blocks(cfg, resuming=False)
    torch.manual_seed(0)
    lm = build_lm(cfg.model, tokenizer)
    objective = CausalLMObjective(lm)
    batch = {"input_ids": blocks[: cfg.optim.batch_size], "labels": labels[: cfg.optim.batch_size]}
    labelled = float((batch["labels"] != IGNORE_INDEX).float().mean())

    def full() -> None:
        lm(input_ids=batch["input_ids"], labels=batch["labels"]).loss.backward()

    def selected() -> None:
        objective(batch)["loss"].backward()

    cpu = torch.device("cpu")
    t_full, t_sel = (median_time(fn, cpu, warmup, iters) for fn in (full, selected))
    return [Row(f"lm step, head on all positions (batch {cfg.optim.batch_size}, {labelled:.0%} labelled)", t_full * 1e3, "ms"),
            Row("lm step, head on labelled positions only", t_sel * 1e3, "ms"),
            Row("lm step speed-up, labelled-only head", t_full / t_sel, "x", "> 1")]
