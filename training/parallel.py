"""DDP/FSDP wrapping and access to the (possibly sharded) model and optimiser state.

``wrap`` returns the model itself for a single process, a ``DistributedDataParallel`` under
torchrun, and with ``run.distributed=fsdp`` the model sharded in place by FSDP2 (``fully_shard``)
on CUDA (NCCL) or the CPU (gloo). Sharding is per layer: every block of a layer stack (a module
inside an ``nn.ModuleList``) whose class a submodule declares in ``_no_split_modules`` (the
transformers convention: ``Qwen2DecoderLayer``, ``CLIPEncoderLayer``, ``SiglipEncoderLayer``; the
Flamingo bridge declares its cross-attention blocks and resampler layers) is its own unit, gathered
only for its own forward and backward; the rest (embeddings, heads, the projector) is the root
unit. Frozen and trainable parameters may share a unit (frozen LLM + LoRA): FSDP2 shards both and
reduces gradients only for the trainable ones.

Checkpoints: under FSDP every rank writes its own shards of the trainable tensors and their
optimiser state with ``torch.distributed.checkpoint`` (``save_sharded`` / ``load_sharded``; on
many nodes the checkpoint directory must be on a filesystem every node sees); otherwise
``model_state`` gives the full trainable tensors on the CPU in the layout of
``training.checkpoint.trainable_state_dict`` and ``load_model_state`` puts them back (also into an
FSDP model, scattering the full tensors: a DDP checkpoint resumes under FSDP).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import ContextManager, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict, set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from training import checkpoint as ckpt
from training.distributed import DistInfo
from vlm.config import RunConfig

# Resuming a full (DDP) checkpoint under FSDP: every rank passes the full tensors read from it;
# frozen parameters are not in it.
_SCATTER = StateDictOptions(full_state_dict=True, strict=False)
# Sharded checkpoints: each rank its shards; the frozen weights are rebuilt by the recipe.
_SHARDED = StateDictOptions(ignore_frozen_params=True, strict=False)


def is_fsdp(model: nn.Module) -> bool:
    """True when ``model`` is sharded by FSDP2 (``fully_shard``)."""
    return isinstance(model, FSDPModule)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (``model`` itself when unwrapped or FSDP2-sharded,
    which keeps the module and its parameter names)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def layer_classes(model: nn.Module) -> set[str]:
    """Class names the submodules of ``model`` declare unsplittable (``_no_split_modules``)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The per-layer FSDP units of ``model``, innermost first: every block of a layer stack (an
    ``nn.ModuleList`` entry) whose class is in ``layer_classes(model)``. Call it before sharding
    (``fully_shard`` gives the blocks new classes)."""
    classes = layer_classes(model)
    units = [block for module in model.modules() if isinstance(module, nn.ModuleList)
             for block in module if type(block).__name__ in classes]
    return units[::-1]  # (modules() is pre-order: reversed, a nested unit comes before its parent)


def shard(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """Shard ``model`` in place with FSDP2 over ``world_size`` ranks: one unit per layer
    (``fsdp_units``), then the root; returns it. Needs an initialised process group."""
    mesh = init_device_mesh(device.type, (world_size,))
    # FSDP2 cannot shard 0-d parameters (learned temperatures, Flamingo's gates): they stay
    # replicated and their gradients are averaged by reduce_replicated_grads.
    scalars = {p for p in model.parameters() if p.ndim == 0}
    for unit in fsdp_units(model):
        fully_shard(unit, mesh=mesh, ignored_params=scalars)
    fully_shard(model, mesh=mesh, ignored_params=scalars)
    return model


def wrap(model: nn.Module, info: DistInfo, run: RunConfig) -> nn.Module:
    """Wrap ``model`` (already on ``info.device``) for this launch: FSDP, DDP or nothing.

    FSDP (per-layer FSDP2, module docstring) needs an initialised process group; DDP is used
    whenever ``world_size > 1``. A model whose forward leaves some trainable parameters unused
    declares it with the attribute ``ddp_find_unused_parameters = True``; the default avoids DDP's
    extra graph walk.
    """
    if run.distributed == "fsdp" and dist.is_initialized():
        return shard(model, info.device, info.world_size)
    if info.world_size == 1:
        return model
    find_unused = bool(getattr(model, "ddp_find_unused_parameters", False))
    return DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
               find_unused_parameters=find_unused)


def local_param_bytes(model: nn.Module) -> int:
    """Bytes of the parameters this rank holds (its shards under FSDP, everything otherwise)."""
    return sum(_local(p).numel() * p.element_size() for p in model.parameters())


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t


def _is_dtensor(t: torch.Tensor) -> bool:
    return isinstance(t, DTensor)


def grad_sync(model: nn.Module, sync: bool) -> ContextManager:
    """Context for one micro-batch's backward: skips DDP/FSDP's gradient all-reduce unless ``sync``
    (the last micro-batch of an optimiser step). A no-op for unwrapped models."""
    if sync:
        return contextlib.nullcontext()
    if is_fsdp(model):
        return _fsdp_no_sync(model)
    return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model: FSDPModule):
    """FSDP2's ``no_sync``: gradients accumulate unsharded, reduced at the next synced backward."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def reduce_replicated_grads(model: nn.Module) -> None:
    """Under FSDP, average over ranks the gradients of the parameters it does not shard (the 0-d
    ones, see ``shard``); call after the last backward of a step. A no-op otherwise."""
    if not is_fsdp(model):
        return
    for p in model.parameters():
        if p.grad is not None and not _is_dtensor(p):
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(dist.get_world_size())


def clip_grad_norm(model: nn.Module, params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the gradients of ``params`` to total L2 norm ``max_norm``; returns the pre-clip norm
    (a 0-d tensor). Under FSDP the norm is taken over every rank's shards (and the replicated
    parameters once)."""
    if not is_fsdp(model):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if _is_dtensor(g)]
    plain = [g for g in grads if not _is_dtensor(g)]
    norms = [torch.nn.utils.get_total_norm(sharded).full_tensor()] if sharded else []
    if plain:
        norms.append(torch.nn.utils.get_total_norm(plain))
    total = torch.stack(norms).norm() if norms else torch.zeros(())
    coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))  # as clip_grad_norm_
    for g in grads:
        g.mul_(coef)
    return total


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable tensors of the (DDP-wrapped or plain) model, full and on the CPU, keyed as
    ``checkpoint.trainable_state_dict`` of the unwrapped model. (FSDP saves shards: ``save_sharded``.)"""
    if is_fsdp(model):
        raise TypeError("an FSDP model is checkpointed in shards: use save_sharded")
    return ckpt.trainable_state_dict(unwrap(model))


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
    """The optimiser's state dict (DDP or a single process; FSDP saves shards: ``save_sharded``)."""
    if is_fsdp(model):
        raise TypeError("an FSDP optimiser is checkpointed in shards: use save_sharded")
    return opt.state_dict()


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """Load what ``optimizer_state`` returned (every rank passes the full state)."""
    if is_fsdp(model):
        set_optimizer_state_dict(model, opt, state, options=_SCATTER)
        return
    opt.load_state_dict(state)


def save_sharded(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Write this rank's shards of the trainable tensors and their optimiser state to ``path`` with
    ``torch.distributed.checkpoint`` (a collective: every rank calls it with the same ``path``)."""
    model_sd, optim_sd = get_state_dict(model, opt, options=_SHARDED)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))


def load_sharded(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Load what ``save_sharded`` wrote into the sharded ``model`` and ``opt`` (a collective)."""
    model_sd, optim_sd = get_state_dict(model, opt, options=_SHARDED)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"], options=_SHARDED)


@contextlib.contextmanager
def full_params(model: nn.Module, info: DistInfo) -> Iterator[None]:
    """Context in which rank 0's ``unwrap(model)`` holds full, plain parameters (for its
    ``save_pretrained``); a no-op unless FSDP. Every rank must enter it (each parameter is
    all-gathered in turn; only rank 0 keeps it)."""
    if not is_fsdp(model):
        yield
        return
    # FSDP2's state-dict hooks always give the sharded DTensors, even after unshard(): swap plain
    # full tensors in instead, and the DTensors back afterwards.
    sharded = [(module, name, p) for module in model.modules() for name, p in module.named_parameters(recurse=False)]
    for module, name, p in sharded:
        full = p.full_tensor() if _is_dtensor(p) else p
        if info.is_main:
            module._parameters[name] = nn.Parameter(full.detach(), requires_grad=p.requires_grad)
    try:
        yield
    finally:
        for module, name, p in sharded:
            module._parameters[name] = p
