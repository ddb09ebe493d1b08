"""Cross-rank feature gathering for the contrastive objectives.

Every objective computes its local rows (this rank's images) against the global columns (all
ranks' texts), as open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True)``. Gathering goes
through ``torch.distributed.nn.functional.all_gather``, whose backward sums the gradients of
every rank's loss into the owner of each row; DDP then averages over ranks, so the effective
gradient is that of the mean of the per-rank losses, which equals the single-process loss on the
concatenated batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_gather


def world_info() -> tuple[int, int]:
    """(rank, world_size) of the default process group, or (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_features(x: torch.Tensor, with_grad: bool = True) -> torch.Tensor:
    """Concatenate ``x`` [B, ...] from every rank along dim 0 -> [world_size * B, ...].

    Identity when torch.distributed is not initialised or world_size is 1. Every rank must pass
    the same shape. With ``with_grad`` the gather is differentiable (gradients flow back to the
    rank that owns each row); without it only this rank's slice keeps its gradient.
    """
    rank, world_size = world_info()
    if world_size == 1:
        return x
    if with_grad:
        return torch.cat(all_gather(x), dim=0)
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.detach().contiguous())
    parts[rank] = x
    return torch.cat(parts, dim=0)


def local_offset(batch_size: int) -> int:
    """Global index of this rank's first row: rank * batch_size (labels are offset by it)."""
    rank, _ = world_info()
    return rank * batch_size
