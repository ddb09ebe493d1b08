"""Step time and peak memory of one training step, on CUDA or the CPU. Torch only, so that the
open_clip side of ``bench.stage1`` (``bench.openclip_side``, run in open_clip's own environment)
measures exactly as ours.

On CUDA: ``torch.cuda.max_memory_allocated``. On the CPU there is no allocator statistic, so
``PeakTensorMemory`` (a ``TorchDispatchMode``) tracks the bytes of every storage created during the
step until it is freed (weak references); allocator caching and fragmentation are not counted.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Iterable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work so wall-clock timings measure it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], None], device: torch.device, warmup: int, iters: int) -> float:
    """Median wall seconds of ``fn`` over ``iters`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of the tensor storages created while active (CPU or any device).

    Every op's output storages are recorded with a weak reference; freed ones are swept before
    each new op's outputs are counted. ``peak`` is the largest live total seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def _sweep(self) -> None:
        dead = [k for k, (ref, _) in self.live.items() if ref.expired()]
        for k in dead:
            self.current -= self.live.pop(k)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._sweep()
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.live and storage.nbytes() > 0:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def step_peak_bytes(step: Callable[[], None], params: Iterable[torch.nn.Parameter], opt: torch.optim.Optimizer,
                    device: torch.device) -> float:
    """Peak bytes of one training step: the parameters and the optimizer state (created by a first
    step) plus the peak of what a second step allocates on top (activations, gradients, temporaries).
    Other models resident on the device are not counted."""
    step()
    persistent = sum(p.numel() * p.element_size() for p in params)
    persistent += sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                      if isinstance(v, torch.Tensor))
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return float(persistent + torch.cuda.max_memory_allocated(device) - before)
    with PeakTensorMemory() as tracker:
        step()
    return float(persistent + tracker.peak)
