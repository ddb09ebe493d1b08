"""Process-group bookkeeping for single-process and torchrun launches.

``setup()`` reads the torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``) and initialises ``torch.distributed`` with NCCL on CUDA and gloo
on CPU. Without those variables (or with ``WORLD_SIZE=1``) it is a no-op and the run is a single
process. Every helper here is safe to call in both cases.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global ``rank`` of ``world_size``, ``local_rank`` on its node, ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on global rank 0 (and in single-process runs)."""
        return self.rank == 0


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """Map a ``RunConfig.device`` string (auto | cpu | cuda) to a device; auto picks CUDA when present.

    Asking for ``cuda`` on a machine without CUDA raises a ``RuntimeError`` rather than silently
    running on the CPU.
    """
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda but torch.cuda.is_available() is False; use device=cpu or auto")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def _env_int(key: str, default: int) -> int:
    """Integer environment variable ``key``; ``default`` when unset or empty."""
    value = os.environ.get(key)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as e:
        raise RuntimeError(f"environment variable {key}={value!r} is not an integer") from e


def setup(device: str = "auto") -> DistInfo:
    """Initialise the process group when launched by torchrun; return this process's ``DistInfo``.

    Idempotent: a second call (or a call after someone else initialised the group) only reads the
    existing group. ``device`` is ``RunConfig.device``.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if dist.is_available() and dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
    dev = resolve_device(device, local_rank)
    # Under torchrun (RANK and MASTER_ADDR set) a group is made even for one process, so FSDP and
    # collectives behave the same at any size.
    launched = world_size > 1 or ("RANK" in os.environ and "MASTER_ADDR" in os.environ)
    if launched and not dist.is_initialized():
        if not dist.is_available():
            raise RuntimeError("launched with RANK/WORLD_SIZE but torch.distributed is not available in this build")
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise RuntimeError(f"WORLD_SIZE={world_size} but MASTER_ADDR/MASTER_PORT are unset; launch with torchrun")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
            dist.init_process_group(backend="nccl", device_id=dev)
        else:
            dist.init_process_group(backend="gloo")
    elif dev.type == "cuda":
        torch.cuda.set_device(dev)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def is_main() -> bool:
    """True on global rank 0 and in single-process runs."""
    return get_rank() == 0


def get_rank() -> int:
    """Global rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` (any shape) over ranks; returned unchanged when not distributed."""
    if get_world_size() == 1:
        return values
    out = values.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / get_world_size()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True if ``flag`` is True on any rank (so every rank takes the same branch)."""
    if get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
