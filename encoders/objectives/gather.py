"""Cross-rank feature gathering for the contrastive objectives.

Every objective computes its local rows (this rank's images) against the global columns (all
ranks' texts), as open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True)``. Gathering goes
through ``torch.distributed.nn.functional.all_gather``, whose backward sums the gradients of
every rank's loss into the owner of each row; DDP then averages over ranks, so the effective
gradient is that of the mean of the per-rank losses, which equals the single-process loss on the
concatenated batch.

``gather_with_grad=False`` (the config field ``objective.gather_with_grad``) gathers the other
ranks' features without gradient, as open_clip's ``gather_with_grad=False``: only this rank's own
slice of the gathered columns keeps its gradient, so the terms in which another rank's features
appear as columns send no gradient back to that rank. The resulting gradient is BIASED (it is not
the gradient of the concatenated-batch loss; the share it misses grows with the world size); it saves
one backward all-gather and is only an option, never the default.
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
    the same shape. With ``with_grad`` (the default) the gather is differentiable: gradients flow
    back to the rank that owns each row, and the gradient equals that of the single-process loss
    on the concatenated batch. Without it only this rank's slice keeps its gradient: the gradient
    is biased (the other ranks' rows get none of the gradient their use as columns here would
    send), see the module docstring.
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
