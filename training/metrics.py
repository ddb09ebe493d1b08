"""Training metrics: one row per logged step to the console, ``metrics.jsonl``, TensorBoard and
(optionally) Weights & Biases, written on rank 0 only; plus the throughput window behind the
``samples_per_s`` / ``tokens_per_s`` columns.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from vlm.config import RunConfig
from vlm.extras import require
from vlm.files import atomic_write_text, read_jsonl_rows


class MetricsLogger:
    """Console + ``out_dir/metrics.jsonl`` + TensorBoard (``out_dir/tb``) + W&B on rank 0; a no-op
    where ``active`` is false.

    A run resumed at ``resume_step`` > 0 keeps the rows up to that step and drops later ones
    (they are about to be redone); a fresh run (``resume_step`` 0) starts a new file.
    """

    def __init__(self, out_dir: Path, run: RunConfig, active: bool, config: Any, resume_step: int):
        self.active = active
        self.tb: Optional[SummaryWriter] = None
        self.wandb = None
        self.path = out_dir / "metrics.jsonl"
        if not active:
            return
        self._trim(resume_step)
        if run.tensorboard:
            self.tb = SummaryWriter(log_dir=str(out_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)
        if run.wandb:
            self.wandb = _start_wandb(out_dir, run, config)

    def _trim(self, resume_step: int) -> None:
        """Keep the rows of steps <= ``resume_step`` (none when 0); a half-written last line (a
        kill mid-append) is dropped."""
        if not self.path.is_file():
            return
        if resume_step == 0:
            self.path.unlink()
            return
        kept = [row for row in read_jsonl_rows(self.path) if row.get("step", 0) <= resume_step]
        atomic_write_text(self.path, "".join(json.dumps(row) + "\n" for row in kept))

    def log(self, row: dict, bar: Optional[tqdm]) -> None:
        """Write ``row`` (``{"step": int, name: number, ...}``) everywhere; printed through ``bar``
        when it is shown, so the progress bar stays intact."""
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        msg = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        (bar.write if bar is not None and not bar.disable else print)(msg)
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, row["step"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def close(self) -> None:
        """Flush and close TensorBoard and W&B."""
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(out_dir: Path, run: RunConfig, config: Any) -> Any:
    """A W&B run in ``run.wandb_project`` / ``run.wandb_entity`` named ``run.run_name`` (default: the
    ``out_dir``'s name) with ``config`` attached. Raises ``MissingExtra`` when wandb is not installed
    (rather than training on without the logging the config asked for)."""
    wandb = require("wandb", "wandb", "run.wandb=true")  # heavy to import: only when asked for
    cfg_dict = OmegaConf.to_container(OmegaConf.structured(config)) if config is not None else {}
    return wandb.init(project=run.wandb_project, entity=run.wandb_entity or None, name=run.run_name or out_dir.name,
                      dir=str(out_dir), config=cfg_dict, resume="allow")


class Throughput:
    """Samples and tokens seen (summed over ranks) since the last logged row, and the wall time."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start a new window now."""
        self.samples, self.tokens, self.start = 0, 0, time.perf_counter()

    def rates(self) -> dict[str, float]:
        """``samples_per_s`` and, when tokens were counted, ``tokens_per_s`` over the window."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {"samples_per_s": self.samples / elapsed}
        if self.tokens:
            out["tokens_per_s"] = self.tokens / elapsed
        return out
