"""Stage-one benchmark: SPARC vs CLIP cost, and our trainer vs an open_clip-style training step.

One run, one model family, one fixed batch (random pixels, random captions from a small word
list; cost does not depend on the content):

1. Step time (forward + backward + AdamW step; median of ``--iters`` after ``--warmup``) and peak
   memory of SPARC vs CLIP. The models are the tiny recipes (``configs/stage1/{clip,sparc}_tiny.yaml``)
   or, with ``--preset vitb16``, the ViT-B/16 recipe and its CLIP twin. SPARC's model is what it
   trains: mean pooling, the non-linear global layer and the local adapters, plus the fine-grained
   loss. Targets (the paper's Table 11 ratios are 1.005x FLOPs and 1.005x memory): time <= 1.05x,
   memory <= 1.10x.
   Peak memory: the model's parameters and AdamW state plus the peak of what one step allocates
   on top, from ``torch.cuda.max_memory_allocated`` on CUDA. On the CPU there is no allocator
   statistic, so ``PeakTensorMemory`` (a ``TorchDispatchMode``) tracks the bytes of every storage
   created during the step until it is freed (weak references); allocator caching and
   fragmentation are not counted.
2. Samples/s of our trainer (``training.loop.train`` on the CLIP ``Stage1Model``: DDP-ready step,
   grad clipping, schedule, logging; measured from its own ``samples_per_s`` log rows) vs an
   open_clip-style step on the same towers: open_clip's ``ClipLoss`` (its ``loss.py``, loaded by
   path because the ``open_clip`` package needs torchvision) on the normalised global features, with
   ``train_one_epoch``'s per-step work (zero_grad, forward, backward, grad clipping, step, logit
   scale clamp). The towers are identical, so this compares loss and trainer overhead, not the
   model zoo. Target (issue 3): ours / open_clip >= 1.0x.

``python -m bench.stage1 [--preset tiny|vitb16] [--device cpu|cuda]`` prints a table of ratios.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import random
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode

from bench.common import Row, format_table, median_time
from encoders.dual_encoder import DualEncoder, tokenize_texts
from encoders.stage1_model import Stage1Model
from training.loop import train
from encoders.config import Stage1Config
from encoders.objectives.clip import ClipConfig
from vlm.config import load_config, replace
from vlm.data.tokenizer import train_bpe_tokenizer

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "stage1"
WORDS = ("a small large red green blue yellow purple orange circle square triangle star hexagon cross "
         "left right above below next to of the two three one is there").split()


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


def recipe(name: str, preset: str) -> Stage1Config:
    """The stage-one config benchmarked for objective ``name`` ("clip" or "sparc") at ``preset``."""
    if preset == "tiny":
        return load_config(Stage1Config, CONFIGS / f"{name}_tiny.yaml")
    cfg = load_config(Stage1Config, CONFIGS / "sparc_vitb16.yaml")
    if name == "clip":
        cfg = replace(cfg, model=replace(cfg.model, pool="cls", global_mlp=False, local_heads=False),
                      objective=ClipConfig())
    return cfg


def make_batch(tokenizer, cfg: Stage1Config, batch_size: int, seed: int = 0) -> dict:
    """A fixed batch: random pixels [B,3,H,W] and random 8-14 word captions."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    size = cfg.model.vision.image_size
    captions = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 14))) + "." for _ in range(batch_size)]
    ids, mask = tokenize_texts(tokenizer, captions, cfg.model.text.max_len)
    return {"pixel_values": torch.randn(batch_size, 3, size, size, generator=g), "input_ids": ids,
            "attention_mask": mask}


def build(cfg: Stage1Config, tokenizer, device: torch.device) -> Stage1Model:
    """The recipe's Stage1Model (weights from seed 0) on ``device``."""
    torch.manual_seed(0)
    return Stage1Model.build(DualEncoder(cfg.model, tokenizer), cfg.objective).to(device)


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def step_fn(model: Stage1Model, batch: dict, lr: float = 1e-4) -> Callable[[], None]:
    """One training step (zero_grad, forward, backward, AdamW step) as a closure."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with _autocast(batch["pixel_values"].device):
            loss = model(batch)["loss"]
        loss.backward()
        opt.step()

    step.optimizer = opt  # type: ignore[attr-defined]
    return step


def peak_memory(step: Callable[[], None], model: Stage1Model, device: torch.device) -> float:
    """Peak bytes of one training step of ``model``: its parameters and AdamW state (created by a first
    step) plus the peak of what the step allocates on top (activations, gradients, temporaries).
    Other models resident on the device are not counted."""
    step()
    opt = step.optimizer  # type: ignore[attr-defined]
    persistent = sum(p.numel() * p.element_size() for p in model.parameters())
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


def load_open_clip_loss():
    """open_clip's ``loss.py`` module, loaded by path (its package imports torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("open_clip is not installed (pip install open_clip_torch)")
    path = Path(spec.submodule_search_locations[0]) / "loss.py"
    module_spec = importlib.util.spec_from_file_location("open_clip_loss", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def open_clip_samples_per_s(cfg: Stage1Config, tokenizer, batch: dict, device: torch.device, warmup: int,
                            iters: int) -> float:
    """Samples/s of an open_clip ``train_one_epoch``-style loop on the CLIP towers of ``cfg``."""
    loss_fn = load_open_clip_loss().ClipLoss()
    encoder = build(cfg, tokenizer, device).encoder
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / cfg.objective.init_temperature), device=device))
    params = list(encoder.parameters()) + [logit_scale]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
                            weight_decay=cfg.optim.weight_decay)

    def step() -> None:
        opt.zero_grad()
        with _autocast(device):
            img = F.normalize(encoder.encode_image(batch["pixel_values"]).global_emb, dim=-1)
            txt = F.normalize(encoder.encode_text(batch["input_ids"], batch["attention_mask"]).global_emb, dim=-1)
            loss = loss_fn(img, txt, logit_scale.exp())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        opt.step()
        with torch.no_grad():
            logit_scale.clamp_(0, math.log(100))
        float(loss.item())  # open_clip logs the loss each step, which syncs

    return batch["input_ids"].shape[0] / median_time(step, device, warmup, iters)


def ours_samples_per_s(cfg: Stage1Config, tokenizer, batch: dict, device: torch.device, warmup: int,
                       iters: int) -> float:
    """Samples/s of ``training.loop.train`` on the CLIP model (median of its logged windows after warm-up)."""
    model = build(cfg, tokenizer, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        run = replace(cfg.run, out_dir=tmp, log_every=max(1, iters // 4), ckpt_every=10 ** 9, progress=False,
                      tensorboard=False, device=device.type, seed=0)
        log_every = run.log_every
        steps = warmup + 4 * log_every
        warmup_rows = math.ceil(warmup / log_every)
        optim = replace(cfg.optim, max_steps=steps, warmup_steps=min(cfg.optim.warmup_steps, steps))

        def batches(start: int):
            while True:
                yield batch

        result = train(model, batches, optim, run)
    rates = [row["samples_per_s"] for row in result.history[warmup_rows:]]
    return statistics.median(rates)


def run(preset: str = "tiny", device: str = "auto", warmup: int = 3, iters: int = 10,
        batch_size: int = 0, rounds: int = 2) -> list[Row]:
    """Measure everything above (each contender's best of ``rounds`` alternating rounds); returns the rows."""
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    cfg_clip, cfg_sparc = recipe("clip", preset), recipe("sparc", preset)
    bs = batch_size or cfg_clip.optim.batch_size
    tokenizer = train_bpe_tokenizer([" ".join(WORDS)] * 4 + WORDS * 8, vocab_size=cfg_clip.model.text.vocab_size,
                                    add_eos=True)
    batch = {k: v.to(dev) for k, v in make_batch(tokenizer, cfg_clip, bs).items()}

    # Measurements alternate between the contenders for ``rounds`` rounds and keep each one's best
    # round, so a burst of load from other processes does not land on one side only.
    steps = {}
    for name, cfg in (("clip", cfg_clip), ("sparc", cfg_sparc)):
        model = build(cfg, tokenizer, dev)
        steps[name] = (model, step_fn(model, batch))
    times = {name: median_time(steps[name][1], dev, warmup, iters) for name in steps}
    for _ in range(rounds - 1):
        for name in steps:
            times[name] = min(times[name], median_time(steps[name][1], dev, 1, iters))
    mems = {name: peak_memory(step, model, dev) for name, (model, step) in steps.items()}
    del steps
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    ours = theirs = 0.0
    for _ in range(rounds):
        ours = max(ours, ours_samples_per_s(cfg_clip, tokenizer, batch, dev, warmup, iters))
        try:
            theirs = max(theirs, open_clip_samples_per_s(cfg_clip, tokenizer, batch, dev, warmup, iters))
        except ImportError as e:
            print(f"open_clip comparison skipped: {e}", file=sys.stderr)
            theirs = float("nan")
    where = f"{preset}, batch {bs}, {dev.type}"
    return [
        Row(f"stage1 CLIP step time ({where})", times["clip"] * 1000, "ms"),
        Row("stage1 SPARC step time", times["sparc"] * 1000, "ms"),
        Row("stage1 SPARC / CLIP step time", times["sparc"] / times["clip"], "x", "<= 1.05"),
        Row("stage1 CLIP peak memory", mems["clip"] / 2 ** 20, "MiB"),
        Row("stage1 SPARC peak memory", mems["sparc"] / 2 ** 20, "MiB"),
        Row("stage1 SPARC / CLIP peak memory", mems["sparc"] / mems["clip"], "x", "<= 1.10"),
        Row("stage1 ours (training.loop) CLIP samples/s", ours, "/s"),
        Row("stage1 open_clip-style step samples/s", theirs, "/s"),
        Row("stage1 ours / open_clip samples/s", ours / theirs, "x", ">= 1.0"),
    ]


def main() -> None:
    """``python -m bench.stage1``: parse the command line and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=("tiny", "vitb16"), default="tiny")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=0, help="0 = the recipe's optim.batch_size")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; each side keeps its best")
    args = parser.parse_args()
    rows = run(args.preset, args.device, args.warmup, args.iters, args.batch_size, args.rounds)
    print(format_table(rows, "stage one"))


if __name__ == "__main__":
    main()
