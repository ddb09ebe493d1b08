"""DDP/FSDP wrapping and access to the (possibly sharded) model and optimiser state.

``wrap`` returns the model itself for a single process, a ``DistributedDataParallel`` under
torchrun, and one root ``FullyShardedDataParallel`` unit with ``run.distributed=fsdp`` (CUDA
only). The state helpers hide the difference: ``model_state`` gives the full trainable tensors on
the CPU (on rank 0 under FSDP, where it is a collective every rank must call) in the layout of
``training.checkpoint.trainable_state_dict``, and ``load_model_state`` puts them back. Under FSDP
they go through ``torch.distributed.checkpoint.state_dict`` with full (gathered) state dicts.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.nn.parallel import DistributedDataParallel as DDP

from training import checkpoint as ckpt
from training.distributed import DistInfo
from vlm.config import RunConfig

# Gather full tensors, offloaded to the CPU of rank 0 only (other ranks get empty dicts).
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
# Every rank passes the full tensors read from the checkpoint; frozen parameters are not in it.
_SCATTER = StateDictOptions(full_state_dict=True, strict=False)


def is_fsdp(model: nn.Module) -> bool:
    """True when ``model`` is wrapped in (FSDP1) ``FullyShardedDataParallel``."""
    return isinstance(model, FSDP)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP/FSDP wrapper (``model`` itself when unwrapped)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def wrap(model: nn.Module, info: DistInfo, run: RunConfig) -> nn.Module:
    """Wrap ``model`` (already on ``info.device``) for this launch: FSDP, DDP or nothing.

    FSDP needs CUDA and an initialised process group; DDP is used whenever ``world_size > 1``.
    A model whose forward leaves some trainable parameters unused declares it with the attribute
    ``ddp_find_unused_parameters = True``; the default avoids DDP's extra graph walk.
    """
    if run.distributed == "fsdp" and dist.is_initialized():
        if info.device.type != "cuda":
            raise RuntimeError("run.distributed=fsdp needs CUDA devices (torch's FSDP does not shard on the CPU); "
                               "use run.distributed=ddp for CPU runs")
        # One root unit: parameters, gradients and optimiser states are sharded across ranks and
        # the model is gathered for each forward. Without nested units the wrapped module keeps its
        # own submodule names, so save_pretrained sees a plain model.
        # use_orig_params allows frozen and trainable parameters in one unit (frozen LLM + LoRA).
        return FSDP(model, use_orig_params=True, device_id=info.device)
    if info.world_size == 1:
        return model
    find_unused = bool(getattr(model, "ddp_find_unused_parameters", False))
    return DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
               find_unused_parameters=find_unused)


def grad_sync(model: nn.Module, sync: bool) -> ContextManager:
    """Context for one micro-batch's backward: skips DDP/FSDP's gradient all-reduce unless ``sync``
    (the last micro-batch of an optimiser step). A no-op for unwrapped models."""
    if sync or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def clip_grad_norm(model: nn.Module, params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the gradients of ``params`` to total L2 norm ``max_norm``; returns the pre-clip norm
    (a 0-d tensor). Under FSDP the norm is taken over every rank's shards."""
    if is_fsdp(model):
        return model.clip_grad_norm_(max_norm)
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable tensors of the (possibly wrapped) model, full and on the CPU, keyed as
    ``checkpoint.trainable_state_dict`` of the unwrapped model. Under FSDP a collective: every
    rank calls it and only rank 0 gets the tensors (others get ``{}``)."""
    if not is_fsdp(model):
        return ckpt.trainable_state_dict(unwrap(model))
    keep = set(ckpt.trainable_state_dict_names(unwrap(model)))
    full = get_model_state_dict(model, options=_GATHER)
    return {k: v.detach().cpu().contiguous().clone() for k, v in full.items() if k in keep}


def load_model_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load what ``model_state`` returned (every rank passes the full tensors). Raises
    ``CheckpointError`` when trainable tensors are missing or unknown to the model."""
    if not is_fsdp(model):
        ckpt.load_trainable_state_dict(unwrap(model), tensors)
        return
    missing = sorted(set(ckpt.trainable_state_dict_names(unwrap(model))) - set(tensors))
    if missing:
        raise ckpt.CheckpointError(f"checkpoint lacks trainable tensors of the model: {missing[:8]}")
    result = set_model_state_dict(model, dict(tensors), options=_SCATTER)  # (it edits the dict it gets)
    if result.unexpected_keys:
        raise ckpt.CheckpointError(f"checkpoint has tensors the model lacks: {list(result.unexpected_keys)[:8]}")


def optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The optimiser's state dict; under FSDP the full (unsharded) one, keyed by parameter name,
    on the CPU of rank 0 (a collective; other ranks get ``{}``)."""
    if is_fsdp(model):
        return get_optimizer_state_dict(model, opt, options=_GATHER)
    return opt.state_dict()


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """Load what ``optimizer_state`` returned (every rank passes the full state)."""
    if is_fsdp(model):
        set_optimizer_state_dict(model, opt, state, options=_SCATTER)
        return
    opt.load_state_dict(state)


def full_params(model: nn.Module, info: DistInfo) -> ContextManager:
    """Context in which rank 0's ``unwrap(model)`` holds the full parameters (for ``save_pretrained``);
    a no-op unless FSDP. Every rank must enter it."""
    if not is_fsdp(model):
        return contextlib.nullcontext()
    # (torch refuses CPU offload when a single rank means nothing is sharded)
    return FSDP.summon_full_params(model, writeback=False, offload_to_cpu=info.world_size > 1, rank0_only=True)
