"""SPARC's cost is linear in the batch: no tensor of forward or backward grows like B x B x L x P."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from encoders.objectives.sparc import sparc_fine_grained_loss, sparc_loss

L, P, D = 6, 16, 8


class MaxNumel(TorchDispatchMode):
    """Records the largest tensor produced by any op (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def traced_max_numel(batch, total=False):
    g = torch.Generator().manual_seed(batch)
    patch = torch.randn(batch, P, D, generator=g, requires_grad=True)
    token = torch.randn(batch, L, D, generator=g, requires_grad=True)
    mask = torch.ones(batch, L, dtype=torch.bool)
    mask[::2, L // 2:] = False
    img_g = torch.randn(batch, D, generator=g, requires_grad=True)
    txt_g = torch.randn(batch, D, generator=g, requires_grad=True)
    with MaxNumel() as mode:
        if total:
            loss = sparc_loss(img_g, txt_g, patch, token, mask, torch.tensor(10.0))["loss"]
        else:
            loss = sparc_fine_grained_loss(patch, token, mask, 0.1)
        loss.backward()
    assert patch.grad is not None and token.grad is not None
    return mode.max_numel


def test_fine_grained_memory_is_linear_in_batch():
    for batch in (8, 16):
        small, large = traced_max_numel(batch), traced_max_numel(2 * batch)
        assert small > 0
        assert large <= 2.2 * small, (batch, small, large)
        assert large < (2 * batch) ** 2 * L * P


def test_total_never_builds_batch_squared_local_tensor():
    batch = 16
    # the global CLIP term is B x B by nature; nothing may reach B x B x L x P
    assert traced_max_numel(batch, total=True) < batch * batch * L * P
