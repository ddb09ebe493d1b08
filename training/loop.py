"""The one training loop shared by every recipe (stage one, MaskEmbed, the world's LLM, stage two).

A recipe supplies a model whose ``forward(batch)`` returns a dict with ``"loss"`` (and any other
scalar terms to log), a ``make_batches(start)`` that yields micro-batches from data position
``start``; the final model is written with its own ``save_pretrained(dir)``. ``train`` does the rest,
top to bottom: device placement and DDP/FSDP wrapping, AdamW with warmup + cosine decay, gradient
accumulation and clipping, bf16 autocast on CUDA, a NaN guard, logging (console, metrics.jsonl,
TensorBoard, optionally W&B), atomic checkpoints with exact resume, and the final export.

Exact resume. The data position is counted in micro-batches consumed by this rank since the start
of the run; a checkpoint after ``step`` optimiser steps stores ``step * grad_accum`` and resuming
calls ``make_batches(step * grad_accum)``. Together with the restored trainable parameters,
optimiser, scheduler and RNG states, a resumed run ends with the same parameters as an
uninterrupted one, provided ``make_batches`` is deterministic in ``start`` and does not draw from
the global RNGs (``training.data.ResumableBatches`` has its own generator) and the recipe rebuilds
the frozen part of the model identically.

Output-directory rule. ``out_dir/checkpoints`` holding a complete checkpoint and ``run.resume``
false is an error (never silently overwritten): pass ``run.resume=true`` to continue or pick a new
``run.out_dir``. With ``run.resume`` true and no checkpoint the run starts from scratch. Resuming a
run whose latest checkpoint is already at ``optim.max_steps`` does no training; it re-exports
``final/`` and returns.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from training import checkpoint as ckpt
from training import distributed as distrib
from vlm.config import OptimConfig, RunConfig, save_config

MakeBatches = Callable[[int], Iterable[dict]]


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN/inf. No optimiser step and no checkpoint were taken."""

    def __init__(self, step: int, terms: dict[str, float], what: str = "loss"):
        self.step, self.terms = step, terms
        shown = ", ".join(f"{k}={v:.6g}" for k, v in terms.items())
        super().__init__(f"non-finite {what} at step {step} (1-based optimiser step, caught before "
                         f"updating): {shown}. The parameters were not updated and no checkpoint was written "
                         f"for this step; lower optim.lr, enable optim.grad_clip, or inspect the batch.")


@dataclass
class TrainResult:
    """What ``train`` returns: the last optimiser step, its mean loss, and where things were written."""

    step: int
    loss: float
    out_dir: Path
    final_dir: Optional[Path]
    history: list[dict] = field(default_factory=list)  # the logged rows (also in metrics.jsonl)


# ----------------------------------------------------------------------------------------------
# Optimiser and schedule
# ----------------------------------------------------------------------------------------------


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier for optimiser step ``step`` (0-based): linear warmup to 1 over ``warmup_steps``
    (step 0 gets ``1/warmup_steps``, never 0), then cosine decay reaching ``min_lr_ratio`` at
    ``max_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
               nn.LocalResponseNorm)


def _clean_name(name: str) -> str:
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "module."):
        if name.startswith(wrapper):
            name = name[len(wrapper):]
        name = name.replace("." + wrapper, ".")
    return name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups over parameters with ``requires_grad``: weight decay on matrices only.

    No decay for biases, 1-d/0-d tensors (norm gains, learned temperatures/logit scales/biases)
    and any parameter of a normalisation layer (``*Norm`` classes, including RMSNorm).
    Each group carries ``names`` for inspection.
    """
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, _NORM_TYPES) or type(module).__name__.endswith(("Norm", "Norm2d", "RMSNorm")):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        clean = _clean_name(name)
        if p.ndim < 2 or clean.endswith("bias") or id(p) in no_decay_ids:
            no_decay.append(p)
            no_decay_names.append(clean)
        else:
            decay.append(p)
            decay_names.append(clean)
    if not decay and not no_decay:
        raise ValueError("the model has no parameters with requires_grad=True; nothing to train")
    return [g for g in (
        {"params": decay, "weight_decay": weight_decay, "names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names},
    ) if g["params"]]


def build_optimizer(model: nn.Module, optim: OptimConfig) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``param_groups(model)`` and the warmup + cosine ``LambdaLR`` (stepped once per optimiser step)."""
    groups = param_groups(model, optim.weight_decay)
    opt = torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, optim.warmup_steps, optim.max_steps, optim.min_lr_ratio))
    return opt, sched


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


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def _is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    return isinstance(model, FSDP)


def _wrap(model: nn.Module, info: distrib.DistInfo, run: RunConfig) -> nn.Module:
    if run.distributed == "fsdp" and dist.is_initialized():
        if info.device.type != "cuda":
            raise RuntimeError("run.distributed=fsdp needs CUDA devices (torch's FSDP does not shard on the CPU); "
                               "use run.distributed=ddp for CPU runs")
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        # One root unit: parameters, gradients and optimiser states are sharded across ranks and
        # the model is gathered for each forward. Without nested units the wrapped module keeps its
        # own submodule names, so save_pretrained sees a plain model.
        # use_orig_params allows frozen and trainable parameters in one unit (frozen LLM + LoRA).
        return FSDP(model, use_orig_params=True, device_id=info.device)
    if info.world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    # A model whose forward leaves some trainable parameters unused declares it with the
    # attribute ``ddp_find_unused_parameters = True``; the default avoids the extra graph walk.
    find_unused = bool(getattr(model, "ddp_find_unused_parameters", False))
    return DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
               find_unused_parameters=find_unused)


def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable tensors of the (possibly wrapped) model, full and on CPU; only meaningful on rank 0 for FSDP."""
    if _is_fsdp(model):
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        keep = {_clean_name(n) for n in ckpt.trainable_state_dict_names(_unwrap(model))}
        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT,
                                  FullStateDictConfig(offload_to_cpu=True, rank0_only=True)):
            full = model.state_dict()
        return {_clean_name(k): v.detach().cpu().contiguous().clone() for k, v in full.items()
                if _clean_name(k) in keep}
    return ckpt.trainable_state_dict(_unwrap(model))


def _optim_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    if _is_fsdp(model):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        return FSDP.optim_state_dict(model, opt)
    return opt.state_dict()


def _load_optim_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    if _is_fsdp(model):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        state = FSDP.optim_state_dict_to_load(model, opt, state)
    opt.load_state_dict(state)


def _load_model_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    if _is_fsdp(model):
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=False)):
            missing, unexpected = model.load_state_dict(tensors, strict=False)
        if unexpected:
            raise ckpt.CheckpointError(f"checkpoint has tensors the model lacks: {unexpected[:8]}")
        return
    ckpt.load_trainable_state_dict(_unwrap(model), tensors)


class _Logger:
    """Console + metrics.jsonl + TensorBoard (+ W&B) on rank 0; a no-op elsewhere."""

    def __init__(self, out_dir: Path, run: RunConfig, active: bool, config: Any, resume_step: int):
        self.active = active
        self.tb = None
        self.wandb = None
        self.path = out_dir / "metrics.jsonl"
        if not active:
            return
        if resume_step > 0 and self.path.is_file():
            # Drop rows logged after the checkpoint we resumed from; they are about to be redone.
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        elif resume_step == 0 and self.path.is_file():
            self.path.unlink()
        if run.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(log_dir=str(out_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)
        if run.wandb:
            try:
                import wandb  # optional extra: pip install .[wandb]
            except ImportError:
                print("run.wandb=true but wandb is not installed (pip install 'sparc-vlm[wandb]'); "
                      "logging to metrics.jsonl and TensorBoard only", file=sys.stderr)
            else:
                from omegaconf import OmegaConf
                cfg_dict = OmegaConf.to_container(OmegaConf.structured(config)) if config is not None else {}
                self.wandb = wandb.init(project="sparc-vlm", name=out_dir.name, dir=str(out_dir),
                                        config=cfg_dict, resume="allow")

    def log(self, row: dict, bar: Optional[tqdm]) -> None:
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
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


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


def _export(model: nn.Module, out_dir: Path, info: distrib.DistInfo) -> Path:
    """Run ``unwrapped.save_pretrained(tmp)`` on rank 0 and rename ``tmp`` to ``out_dir/final`` atomically."""
    final = out_dir / "final"
    tmp = out_dir / ".tmp-final"
    if _is_fsdp(model):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        # (torch refuses CPU offload when a single rank means nothing is sharded)
        ctx = FSDP.summon_full_params(model, writeback=False, offload_to_cpu=info.world_size > 1, rank0_only=True)
    else:
        ctx = contextlib.nullcontext()
    with ctx:
        if info.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            _unwrap(model).save_pretrained(tmp)
            ckpt.fsync_path(tmp)
            if final.exists():
                shutil.rmtree(final)
            tmp.replace(final)
            ckpt.fsync_path(out_dir)
    distrib.barrier()
    return final


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
    """
    info = distrib.setup(run.device)
    out_dir = Path(run.out_dir)
    ckpt_root = out_dir / "checkpoints"
    latest = check_out_dir(out_dir, run)
    distrib.barrier()  # every rank has read the directory before rank 0 touches it
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_tmp(ckpt_root)
        if config is not None:
            save_config(config, out_dir / "config.yaml")
    distrib.barrier()

    seed_everything(run.seed + info.rank)
    model.to(info.device)
    wrapped = _wrap(model, info, run)
    opt, sched = build_optimizer(wrapped, optim)
    accum = optim.grad_accum

    step = 0
    last_loss = float("nan")
    if latest is not None:
        if latest.meta.get("world_size", 1) != info.world_size:
            raise ckpt.CheckpointError(
                f"{latest.path} was written with world_size={latest.meta.get('world_size')} but this run "
                f"has world_size={info.world_size}; exact resume needs the same number of processes")
        if latest.meta.get("grad_accum", accum) != accum:
            raise ckpt.CheckpointError(f"{latest.path} used grad_accum={latest.meta.get('grad_accum')}, "
                                       f"this run has optim.grad_accum={accum}")
        state = ckpt.load_checkpoint(latest.path, rank=info.rank)
        _load_model_tensors(wrapped, state["model"])
        _load_optim_state(wrapped, opt, state["optim"]["optimizer"])
        sched.load_state_dict(state["optim"]["scheduler"])
        if state["rng"] is None:
            raise ckpt.CheckpointError(f"{latest.path} has no RNG state for rank {info.rank}")
        ckpt.set_rng_state(state["rng"])
        step = int(latest.meta["step"])
        last_loss = float(latest.meta.get("loss", float("nan")))
        if info.is_main:
            print(f"resumed from {latest.path} (step {step}, {latest.meta['micro_batches']} micro-batches)",
                  file=sys.stderr)

    logger = _Logger(out_dir, run, info.is_main, config, step)
    history: list[dict] = []
    bar = tqdm(total=optim.max_steps, initial=step, disable=not (info.is_main and run.progress),
               desc=out_dir.name, dynamic_ncols=True)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                if info.device.type == "cuda" and run.precision == "bf16" else contextlib.nullcontext())
    trainable = [p for p in wrapped.parameters() if p.requires_grad]

    def save(at_step: int, loss: float) -> None:
        tmp = ckpt.tmp_dir_for(ckpt_root, at_step)
        if info.is_main and tmp.exists():
            shutil.rmtree(tmp)
        distrib.barrier()
        ckpt.write_rank_files(tmp, info.rank, ckpt.rng_state())
        tensors = _model_tensors(wrapped)  # a collective under FSDP: every rank calls it
        optim_state = {"optimizer": _optim_state(wrapped, opt), "scheduler": sched.state_dict()}
        if info.is_main:
            ckpt.write_main_files(tmp, tensors, optim_state)
        distrib.barrier()  # every rank's RNG file is on disk before the commit
        if info.is_main:
            ckpt.commit(tmp, {"step": at_step, "micro_batches": at_step * accum, "grad_accum": accum,
                              "world_size": info.world_size, "loss": loss, "time": time.time()})
            ckpt.prune_checkpoints(ckpt_root, run.keep_last)
        distrib.barrier()

    wrapped.train()
    batches: Iterator[dict] = iter(make_batches(step * accum))
    window_samples, window_tokens, window_start = 0, 0, time.perf_counter()
    try:
        while step < optim.max_steps:
            sums: dict[str, torch.Tensor] = {}
            exhausted = False
            for micro in range(accum):
                try:
                    batch = next(batches)
                except StopIteration:
                    exhausted = True
                    break
                batch = to_device(batch, info.device)
                window_samples += batch_size_of(batch) * info.world_size
                sync = micro == accum - 1 or not hasattr(wrapped, "no_sync")
                with (contextlib.nullcontext() if sync else wrapped.no_sync()):
                    with autocast:
                        out = wrapped(batch)
                    if not isinstance(out, dict) or "loss" not in out:
                        raise TypeError(f"model(batch) must return a dict with 'loss', got {type(out).__name__}"
                                        + (f" with keys {list(out)}" if isinstance(out, dict) else ""))
                    loss = out["loss"]
                    (loss.float() / accum).backward()
                for k, v in out.items():
                    if k == "num_tokens":
                        window_tokens += int(v.sum().item() if isinstance(v, torch.Tensor) else v) * info.world_size
                    elif isinstance(v, torch.Tensor) and v.numel() == 1:
                        sums[k] = sums.get(k, 0) + v.detach().float().reshape(())
                    elif isinstance(v, (int, float)):
                        sums[k] = sums.get(k, 0) + torch.tensor(float(v), device=info.device)
            if exhausted:
                if info.is_main:
                    print(f"make_batches ran out of data at step {step}; stopping early (the partial "
                          f"accumulation of this step is discarded)", file=sys.stderr)
                opt.zero_grad(set_to_none=True)
                break

            names = sorted(sums)
            terms = torch.stack([sums[k] for k in names]) / accum
            bad = distrib.any_rank(not bool(torch.isfinite(terms).all()), info.device)
            if bad:
                raise NonFiniteLossError(step + 1, {k: float(v) for k, v in zip(names, terms.tolist())})
            if optim.grad_clip > 0:
                if _is_fsdp(wrapped):
                    grad_norm = wrapped.clip_grad_norm_(optim.grad_clip)
                else:
                    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, optim.grad_clip)
                if not torch.isfinite(grad_norm):
                    raise NonFiniteLossError(step + 1, {**{k: float(v) for k, v in zip(names, terms.tolist())},
                                                    "grad_norm": float(grad_norm)}, what="gradient norm")
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1

            if step % run.log_every == 0 or step == optim.max_steps:
                mean_terms = distrib.all_reduce_mean(terms).tolist()
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                row: dict[str, Any] = {"step": step, "lr": lr}
                row.update({k: float(v) for k, v in zip(names, mean_terms)})
                row["samples_per_s"] = window_samples / elapsed
                if window_tokens:
                    row["tokens_per_s"] = window_tokens / elapsed
                if optim.grad_clip > 0:
                    row["grad_norm"] = float(grad_norm)
                history.append(row)
                logger.log(row, bar)
                window_samples, window_tokens, window_start = 0, 0, time.perf_counter()
                last_loss = row["loss"]
            else:
                last_loss = float(terms[names.index("loss")])
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", refresh=False)

            if step % run.ckpt_every == 0 or step == optim.max_steps:
                save(step, last_loss)
    finally:
        bar.close()
        logger.close()

    if ckpt.latest_checkpoint(ckpt_root) is None or ckpt.latest_checkpoint(ckpt_root).step != step:
        save(step, last_loss)  # stopped early on exhausted data: still leave a resumable state
    final_dir = _export(wrapped, out_dir, info) if hasattr(model, "save_pretrained") else None
    return TrainResult(step=step, loss=last_loss, out_dir=out_dir, final_dir=final_dir, history=history)
