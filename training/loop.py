"""The one training loop shared by every recipe (stage one, MaskEmbed, the world's LLM, stage two).

A recipe supplies a model whose ``forward(batch)`` returns a dict with ``"loss"`` (and any other
scalar terms to log), a ``make_batches(start)`` that yields micro-batches from data position
``start``; the final model is written with its own ``save_pretrained(dir)``. A model may define
``after_optimizer_step()``, called after every optimizer step (``Stage1Model`` clamps its learned
logit scale there, as open_clip does). A model with ``supports_cached_accumulation`` (``Stage1Model``)
also takes ``optim.accum_freq > 1``: each batch is split into micro-batches whose features are cached
(``cached_forward_backward``). ``train`` does the rest,
top to bottom: device placement and DDP/FSDP wrapping, AdamW with warmup + cosine decay, gradient
accumulation and clipping, bf16 autocast on CUDA, a NaN guard, logging (console, metrics.jsonl,
TensorBoard, optionally W&B), atomic checkpoints with exact resume, and the final export.

Exact resume. The data position is counted in micro-batches consumed by this rank since the start
of the run; a checkpoint after ``step`` optimiser steps stores ``step * grad_accum`` and resuming
calls ``make_batches(step * grad_accum)``. Together with the restored trainable parameters,
optimiser, scheduler and RNG states, a resumed run ends with the same parameters as an
uninterrupted one, provided ``make_batches`` is deterministic in ``start`` and does not draw from
the global RNGs (``training.data.ResumableBatches`` has its own generator) and the recipe rebuilds
the frozen part of the model identically. ``optim.accum_freq`` may change on resume: it changes
neither the data order nor (beyond rounding) the gradient.

Output-directory rule. ``out_dir/checkpoints`` holding a complete checkpoint and ``run.resume``
false is an error (never silently overwritten): pass ``run.resume=true`` to continue or pick a new
``run.out_dir``. With ``run.resume`` true and no checkpoint the run starts from scratch. Resuming a
run whose latest checkpoint is already at ``optim.max_steps`` does no training; it re-exports
``final/`` and returns.
"""
from __future__ import annotations

import contextlib
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Iterator, Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from training import checkpoint as ckpt
from training import distributed as distrib
from training import parallel
from training.metrics import MetricsLogger, Throughput
from training.optim import build_optimizer
from training.runlock import RunLock
from vlm.config import ConfigError, OptimConfig, RunConfig, save_config
from vlm.files import VlmError, fsync_path

MakeBatches = Callable[[int], Iterable[dict]]


class NonFiniteLossError(VlmError, RuntimeError):
    """The loss (or gradient norm) became NaN/inf. No optimiser step and no checkpoint were taken."""

    def __init__(self, step: int, terms: dict[str, float], what: str = "loss", clipping: bool = False):
        self.step, self.terms = step, terms
        shown = ", ".join(f"{k}={v:.6g}" for k, v in terms.items())
        hint = "lower optim.lr or optim.grad_clip" if clipping else "lower optim.lr, enable optim.grad_clip"
        super().__init__(f"non-finite {what} at step {step} (1-based optimiser step, caught before "
                         f"updating): {shown}. The parameters were not updated and no checkpoint was written "
                         f"for this step; {hint}, or inspect the batch.")


@dataclass
class TrainResult:
    """What ``train`` returns: the last optimiser step, its mean loss, and where things were written."""

    step: int
    loss: float
    out_dir: Path
    final_dir: Optional[Path]
    history: list[dict] = field(default_factory=list)  # the logged rows (also in metrics.jsonl)


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------


def to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor inside (nested dicts/lists/tuples of) ``obj`` to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_device(v, device) for v in obj]
    if isinstance(obj, tuple):
        return type(obj)(*(to_device(v, device) for v in obj)) if hasattr(obj, "_fields") else \
            tuple(to_device(v, device) for v in obj)
    return obj


def batch_size_of(batch: dict) -> int:
    """Leading dim of the first tensor in ``batch`` (samples in the micro-batch); 0 if none."""
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.ndim > 0:
            return int(v.shape[0])
    return 0


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_out_dir(out_dir: Path, run: RunConfig) -> Optional[ckpt.CheckpointInfo]:
    """Apply the output-directory rule (module docstring); returns the checkpoint to resume, if any."""
    latest = ckpt.latest_checkpoint(out_dir / "checkpoints")
    if latest is not None and not run.resume:
        done = " and a finished final/" if (out_dir / "final").is_dir() else ""
        raise FileExistsError(
            f"{out_dir} already has checkpoints (latest step {latest.step}){done}; refusing to overwrite. "
            f"Pass run.resume=true (--resume) to continue it, or choose a new run.out_dir.")
    if latest is None and run.resume and distrib.is_main():
        print(f"run.resume=true but {out_dir / 'checkpoints'} has no complete checkpoint; starting from scratch",
              file=sys.stderr)
    return latest


# ----------------------------------------------------------------------------------------------
# The state of one run
# ----------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """What ``train`` carries from step to step: the configs, the model (as given and wrapped), the
    optimiser and schedule, the data iterator, the step counter and the logging state."""

    info: distrib.DistInfo
    optim: OptimConfig
    run: RunConfig
    out_dir: Path
    model: nn.Module  # as given: what save_pretrained is called on
    wrapped: nn.Module  # the same model under DDP/FSDP (or itself)
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    step: int = 0  # optimiser steps done
    last_loss: float = float("nan")
    logger: Optional[MetricsLogger] = None
    bar: Optional[tqdm] = None
    autocast: ContextManager = field(default_factory=contextlib.nullcontext)
    trainable: list[torch.Tensor] = field(default_factory=list)
    batches: Iterator[dict] = field(default_factory=lambda: iter(()))
    window: Throughput = field(default_factory=Throughput)
    history: list[dict] = field(default_factory=list)

    @property
    def ckpt_root(self) -> Path:
        """``out_dir/checkpoints``."""
        return self.out_dir / "checkpoints"


@dataclass
class _StepOut:
    """One optimiser step's outcome: the loss terms (sorted ``names``, ``terms`` of shape
    ``(len(names),)``, means over micro-batches of this rank), the lr it used and the pre-clip
    gradient norm (None without clipping)."""

    names: list[str]
    terms: torch.Tensor
    lr: float
    grad_norm: Optional[torch.Tensor]


# ----------------------------------------------------------------------------------------------
# Start
# ----------------------------------------------------------------------------------------------


def _prepare_out_dir(out_dir: Path, info: distrib.DistInfo, config: Any) -> None:
    """Rank 0 creates ``out_dir``, drops half-written checkpoints and saves ``config.yaml``,
    after every rank has read the directory."""
    distrib.barrier()  # every rank has read the directory before rank 0 touches it
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_tmp(out_dir / "checkpoints")
        if config is not None:
            save_config(config, out_dir / "config.yaml")
    distrib.barrier()


def _start(model: nn.Module, make_batches: MakeBatches, optim: OptimConfig, run: RunConfig,
           config: Any) -> _Run:
    """Set up a run: process group, output directory, seeds, device and wrapping, optimiser,
    resume from the latest checkpoint, logging, and the data iterator at the resumed position."""
    if optim.accum_freq > 1 and not getattr(model, "supports_cached_accumulation", False):
        raise ConfigError(f"optim.accum_freq={optim.accum_freq} needs a model with cached accumulation "
                         f"(stage one's Stage1Model), not {type(model).__name__}; use optim.grad_accum")
    info = distrib.setup(run.device)
    out_dir = Path(run.out_dir)
    latest = check_out_dir(out_dir, run)
    _prepare_out_dir(out_dir, info, config)
    seed_everything(run.seed + info.rank)
    model.to(info.device)
    wrapped = parallel.wrap(model, info, run)
    overrides = getattr(parallel.unwrap(wrapped), "optimizer_overrides", dict)()  # per-module / per-parameter lr, decay
    opt, sched = build_optimizer(wrapped, optim, overrides)
    r = _Run(info=info, optim=optim, run=run, out_dir=out_dir, model=model, wrapped=wrapped, opt=opt, sched=sched)
    if latest is not None:
        _resume(r)
    r.logger = MetricsLogger(out_dir, run, info.is_main, config, r.step)
    r.bar = tqdm(total=optim.max_steps, initial=r.step, disable=not (info.is_main and run.progress),
                 desc=out_dir.name, dynamic_ncols=True)
    if run.precision == "bf16" and (info.device.type == "cuda" or run.cpu_bf16):
        r.autocast = torch.autocast(info.device.type, dtype=torch.bfloat16)
    r.trainable = [p for p in wrapped.parameters() if p.requires_grad]
    wrapped.train()
    r.batches = iter(make_batches(r.step * optim.grad_accum))
    r.window.reset()
    return r


def _resume(r: _Run) -> None:
    """Restore model, optimiser, scheduler, RNG states and step from the newest readable checkpoint
    (a damaged newer one is skipped with a warning naming its file); it must come from a run with
    the same world size and gradient accumulation."""
    info, accum = r.info, r.optim.grad_accum
    latest, state = ckpt.load_latest_good(r.ckpt_root, rank=info.rank, warn=info.is_main)
    if latest.meta.get("world_size", 1) != info.world_size:
        raise ckpt.CheckpointError(
            f"{latest.path} was written with world_size={latest.meta.get('world_size')} but this run "
            f"has world_size={info.world_size}; exact resume needs the same number of processes")
    if latest.meta.get("grad_accum", accum) != accum:
        raise ckpt.CheckpointError(f"{latest.path} used grad_accum={latest.meta.get('grad_accum')}, "
                                   f"this run has optim.grad_accum={accum}")
    if state["model"] is None:  # sharded (FSDP): every rank reads its shards
        if not parallel.is_fsdp(r.wrapped):
            raise ckpt.CheckpointError(f"{latest.path} is a sharded (FSDP) checkpoint; resume it with "
                                       f"run.distributed=fsdp")
        parallel.load_sharded(latest.path / ckpt.SHARDED_DIR, r.wrapped, r.opt)
    else:
        parallel.load_model_state(r.wrapped, state["model"])
        parallel.load_optimizer_state(r.wrapped, r.opt, state["optim"]["optimizer"])
    r.sched.load_state_dict(state["optim"]["scheduler"])
    if state["rng"] is None:
        raise ckpt.CheckpointError(f"{latest.path} has no RNG state for rank {info.rank}")
    ckpt.set_rng_state(state["rng"])
    r.step = int(latest.meta["step"])
    r.last_loss = float(latest.meta.get("loss", float("nan")))
    if info.is_main:
        print(f"resumed from {latest.path} (step {r.step}, {latest.meta['micro_batches']} micro-batches)",
              file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# One optimiser step
# ----------------------------------------------------------------------------------------------


def forward_backward(wrapped: nn.Module, batch: dict, sync: bool, loss_scale: float = 1.0,
                     autocast: Optional[ContextManager] = None, **model_kwargs: Any) -> dict:
    """Forward ``wrapped(batch, **model_kwargs)`` (under ``autocast``), backward ``loss * loss_scale``;
    returns the model's output dict. Gradients are all-reduced only when ``sync``."""
    with parallel.grad_sync(wrapped, sync):
        with autocast or contextlib.nullcontext():
            out = wrapped(batch, **model_kwargs)
        if not isinstance(out, dict) or "loss" not in out:
            raise TypeError(f"model(batch) must return a dict with 'loss', got {type(out).__name__}"
                            + (f" with keys {list(out)}" if isinstance(out, dict) else ""))
        (out["loss"].float() * loss_scale).backward()
    return out


def cached_forward_backward(wrapped: nn.Module, batch: dict, accum_freq: int, sync: bool, loss_scale: float = 1.0,
                            autocast: Optional[ContextManager] = None) -> dict:
    """open_clip's ``accum_freq`` on one batch: ``wrapped(batch, split=accum_freq)`` under no_grad
    encodes its ``accum_freq`` micro-batches into a cache; then pass j backpropagates
    ``wrapped(micro_j, cache=cache, index=j)``, the whole batch's loss with micro-batch j
    re-encoded with grad (``encoders.stage1_model``: the passes' gradients add up to the whole
    batch's). Gradients are all-reduced in the last pass only, and only when ``sync``. Returns the
    last pass's output (the whole batch's loss terms)."""
    with torch.no_grad(), autocast or contextlib.nullcontext():
        cache = wrapped(batch, split=accum_freq)
    last = len(cache.micro_batches) - 1
    for j, micro in enumerate(cache.micro_batches):
        out = forward_backward(wrapped, micro, sync and j == last, loss_scale, autocast, cache=cache, index=j)
    return out


def _forward_backward(r: _Run, batch: dict, sync: bool) -> dict:
    """Forward and backward one batch with loss scale 1 / grad_accum, directly or, with
    ``optim.accum_freq > 1``, through ``cached_forward_backward``; returns the model's output."""
    scale = 1.0 / r.optim.grad_accum
    if r.optim.accum_freq > 1:
        return cached_forward_backward(r.wrapped, batch, r.optim.accum_freq, sync, scale, r.autocast)
    return forward_backward(r.wrapped, batch, sync, scale, r.autocast)


def _add_terms(r: _Run, sums: dict[str, torch.Tensor], out: dict) -> None:
    """Add the scalar terms of ``out`` to ``sums`` (0-d float tensors) and ``num_tokens`` to the
    throughput window."""
    for k, v in out.items():
        if k == "num_tokens":
            r.window.tokens += int(v.sum().item() if isinstance(v, torch.Tensor) else v) * r.info.world_size
        elif isinstance(v, torch.Tensor) and v.numel() == 1:
            sums[k] = sums.get(k, 0) + v.detach().float().reshape(())
        elif isinstance(v, (int, float)):
            sums[k] = sums.get(k, 0) + torch.tensor(float(v), device=r.info.device)


def _accumulate(r: _Run) -> Optional[dict[str, torch.Tensor]]:
    """Run ``grad_accum`` micro-batches; returns the summed scalar terms, or None when the data ran
    out first (the partial gradients are then dropped)."""
    sums: dict[str, torch.Tensor] = {}
    accum = r.optim.grad_accum
    for micro in range(accum):
        try:
            batch = next(r.batches)
        except StopIteration:
            if r.info.is_main:
                print(f"make_batches ran out of data at step {r.step}; stopping early (the partial "
                      f"accumulation of this step is discarded)", file=sys.stderr)
            r.opt.zero_grad(set_to_none=True)
            return None
        batch = to_device(batch, r.info.device)
        r.window.samples += batch_size_of(batch) * r.info.world_size
        out = _forward_backward(r, batch, sync=micro == accum - 1)
        _add_terms(r, sums, out)
    return sums


def _after_optimizer_step(r: _Run) -> None:
    """Call the model's ``after_optimizer_step()`` when it defines one (e.g. ``Stage1Model``: the
    objective clamps its learned logit scale in place, as open_clip after ``optimizer.step()``).
    Runs on every rank on the unwrapped module; under FSDP its parameters are this rank's shards
    (DTensors; 0-d ones are replicated), so the hook must be elementwise."""
    hook = getattr(parallel.unwrap(r.wrapped), "after_optimizer_step", None)
    if callable(hook):
        hook()


def _step(r: _Run) -> Optional[_StepOut]:
    """One optimiser step: accumulate, refuse non-finite terms or gradient norm on any rank
    (``NonFiniteLossError``, before updating), clip, step optimiser (then the model's post-step
    hook) and schedule. None when the data ran out."""
    sums = _accumulate(r)
    if sums is None:
        return None
    names = sorted(sums)
    terms = torch.stack([sums[k] for k in names]) / r.optim.grad_accum
    clipping = r.optim.grad_clip > 0
    parallel.reduce_replicated_grads(r.wrapped)
    if distrib.any_rank(not bool(torch.isfinite(terms).all()), r.info.device):
        raise NonFiniteLossError(r.step + 1, dict(zip(names, terms.tolist())), clipping=clipping)
    grad_norm = None
    if clipping:
        grad_norm = parallel.clip_grad_norm(r.wrapped, r.trainable, r.optim.grad_clip)
        if not torch.isfinite(grad_norm):
            raise NonFiniteLossError(r.step + 1, {**dict(zip(names, terms.tolist())), "grad_norm": float(grad_norm)},
                                     what="gradient norm", clipping=clipping)
    lr = r.opt.param_groups[0]["lr"]
    r.opt.step()
    _after_optimizer_step(r)
    r.sched.step()
    r.opt.zero_grad(set_to_none=True)
    r.step += 1
    return _StepOut(names=names, terms=terms, lr=lr, grad_norm=grad_norm)


# ----------------------------------------------------------------------------------------------
# Logging and checkpoints
# ----------------------------------------------------------------------------------------------


def _log(r: _Run, out: _StepOut) -> float:
    """Log the row of the step just taken (terms averaged over ranks, throughput since the last
    row, pre-clip gradient norm); returns its loss."""
    mean_terms = distrib.all_reduce_mean(out.terms).tolist()
    rates = r.window.rates()
    row: dict[str, Any] = {"step": r.step, "lr": out.lr}
    row.update({k: float(v) for k, v in zip(out.names, mean_terms)})
    row.update(rates)
    if out.grad_norm is not None:
        row["grad_norm"] = float(out.grad_norm)
    r.history.append(row)
    r.logger.log(row, r.bar)
    r.window.reset()
    return row["loss"]


def _after_step(r: _Run, out: _StepOut) -> None:
    """Log (every ``run.log_every`` steps and at the last), advance the bar, and checkpoint (every
    ``run.ckpt_every`` steps and at the last)."""
    last = r.step == r.optim.max_steps
    if r.step % r.run.log_every == 0 or last:
        r.last_loss = _log(r, out)
    else:
        r.last_loss = float(out.terms[out.names.index("loss")])
    r.bar.update(1)
    r.bar.set_postfix(loss=f"{r.last_loss:.4f}", lr=f"{out.lr:.2e}", refresh=False)
    if r.step % r.run.ckpt_every == 0 or last:
        _save(r)


def _save(r: _Run) -> None:
    """Write the checkpoint of ``r.step`` atomically (see ``training.checkpoint``): every rank its
    RNG file (and under FSDP its shards), rank 0 the model/optimiser files and then the commit;
    then prune to ``run.keep_last``."""
    info, accum = r.info, r.optim.grad_accum
    tmp = ckpt.tmp_dir_for(r.ckpt_root, r.step)
    if info.is_main and tmp.exists():
        shutil.rmtree(tmp)
    distrib.barrier()
    ckpt.write_rank_files(tmp, info.rank, ckpt.rng_state())
    if parallel.is_fsdp(r.wrapped):  # every rank writes its shards (a collective)
        parallel.save_sharded(tmp / ckpt.SHARDED_DIR, r.wrapped, r.opt)
        tensors, optim_state = None, {"scheduler": r.sched.state_dict()}
    else:
        tensors = parallel.model_state(r.wrapped)
        optim_state = {"optimizer": parallel.optimizer_state(r.wrapped, r.opt), "scheduler": r.sched.state_dict()}
    if info.is_main:
        ckpt.write_main_files(tmp, tensors, optim_state)
    distrib.barrier()  # every rank's RNG file is on disk before the commit
    if info.is_main:
        ckpt.commit(tmp, {"step": r.step, "micro_batches": r.step * accum, "grad_accum": accum,
                          "world_size": info.world_size, "loss": r.last_loss, "time": time.time()})
        ckpt.prune_checkpoints(r.ckpt_root, r.run.keep_last)
    distrib.barrier()


# ----------------------------------------------------------------------------------------------
# Finish
# ----------------------------------------------------------------------------------------------


def _export(r: _Run) -> Path:
    """Run ``unwrapped.save_pretrained(tmp)`` on rank 0 and rename ``tmp`` to ``out_dir/final`` atomically."""
    final = r.out_dir / "final"
    tmp = r.out_dir / ".tmp-final"
    with parallel.full_params(r.wrapped, r.info):
        if r.info.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            parallel.unwrap(r.wrapped).save_pretrained(tmp)
            fsync_path(tmp)
            if final.exists():
                shutil.rmtree(final)
            tmp.replace(final)
            fsync_path(r.out_dir)
    distrib.barrier()
    return final


def _finish(r: _Run) -> TrainResult:
    """Checkpoint the last step if the loop stopped early (data ran out), export ``final/``, and
    return the result."""
    latest = ckpt.latest_checkpoint(r.ckpt_root)
    if latest is None or latest.step != r.step:
        _save(r)  # stopped early on exhausted data: still leave a resumable state
    final_dir = _export(r) if hasattr(r.model, "save_pretrained") else None
    return TrainResult(step=r.step, loss=r.last_loss, out_dir=r.out_dir, final_dir=final_dir, history=r.history)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def train(model: nn.Module, make_batches: MakeBatches, optim: OptimConfig, run: RunConfig,
          config: Any = None) -> TrainResult:
    """Train ``model`` for ``optim.max_steps`` optimiser steps and return a ``TrainResult``.

    ``model(batch)`` returns a dict with a scalar ``"loss"`` tensor, optionally other scalar terms
    (logged, averaged over micro-steps) and ``"num_tokens"`` (for tokens/s). ``make_batches(start)``
    yields dict micro-batches (tensors get moved to the device) starting after ``start``
    micro-batches of this rank; each optimiser step consumes ``optim.grad_accum`` of them.
    When the model has ``save_pretrained(dir)`` it writes the final artifact (rank 0), renamed to
    ``out_dir/final``. ``config`` (the recipe's dataclass) is saved to ``out_dir/config.yaml``.
    Rank 0 holds ``out_dir/.lock`` (``training.runlock``) for the whole call.
    """
    distrib.setup(run.device)
    lock = RunLock(run.out_dir).acquire() if distrib.is_main() else None  # one writer per out_dir
    try:
        r = _start(model, make_batches, optim, run, config)
        try:
            while r.step < optim.max_steps:
                out = _step(r)
                if out is None:
                    break
                _after_step(r, out)
        finally:
            r.bar.close()
            r.logger.close()
        return _finish(r)
    finally:
        if lock is not None:
            lock.release()
