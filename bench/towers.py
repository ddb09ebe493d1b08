"""Vision-tower benchmark: forward + backward time of the ViT, ResNet and ConvNeXt towers, side by side.

The towers are the stage-one recipes' (``configs/stage1/sparc_tiny.yaml``: CLIP ViT, width 128, 4
blocks, 8-px patches; ``configs/stage1/sparc_resnet_tiny.yaml``: ResNet, basic blocks, stages
[64, 128] x [2, 2], stride 8; ConvNeXt: the same stages in ``ConvNextModel``). Each step is one
forward to the patch grid (``encoders.towers.patch_tokens``, [B, 64, w] for a 64-px image), a mean
of squares as the loss, and the backward, on one fixed batch of random pixels; fp32 and bf16
autocast (``torch.autocast(device, dtype=torch.bfloat16)``). Median of ``--iters`` steps after
``--warmup``; the towers alternate for ``--rounds`` rounds and each keeps its best round, so load
from other processes does not land on one tower only.

On a CPU without native bf16 (AVX2 only, as the 2-core dev machine) bf16 autocast is emulated and
6-10x slower than fp32, so a CPU run takes minutes; on CUDA it is the fast path.

``python -m bench.towers [--batch-size 64] [--device cpu|cuda]`` prints the table.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
from pathlib import Path
from typing import Callable

import torch

from bench.common import Row, format_table, median_time
from encoders.config import Stage1Config
from encoders.towers import build_vision_tower, num_patches, patch_tokens, tower_image_size
from vlm.config import VisionTowerConfig, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "stage1"
PRECISIONS = ("fp32", "bf16")


def tower_configs() -> dict[str, VisionTowerConfig]:
    """name -> the tower config of the stage-one recipes (ConvNeXt: the ResNet recipe's stages)."""
    vit = load_config(Stage1Config, CONFIGS / "sparc_tiny.yaml").model.vision
    resnet = load_config(Stage1Config, CONFIGS / "sparc_resnet_tiny.yaml").model.vision
    return {"vit": vit, "resnet": resnet, "convnext": dataclasses.replace(resnet, arch="convnext")}


def step_fn(tower: torch.nn.Module, pixels: torch.Tensor, precision: str) -> Callable[[], None]:
    """One forward (to the patch grid) and backward of ``tower`` on ``pixels`` [B,3,H,W]."""
    def step() -> None:
        tower.zero_grad(set_to_none=True)
        autocast = (torch.autocast(pixels.device.type, dtype=torch.bfloat16) if precision == "bf16"
                    else contextlib.nullcontext())
        with autocast:
            loss = patch_tokens(tower, pixels).float().square().mean()
        loss.backward()
    return step


def run(batch_size: int = 64, device: str = "auto", warmup: int = 1, iters: int = 3, rounds: int = 1) -> list[Row]:
    """Rows: per tower its parameters, patch grid, and fp32 / bf16 forward+backward ms per batch."""
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    towers, steps = {}, {}
    for name, cfg in tower_configs().items():
        torch.manual_seed(0)
        towers[name] = build_vision_tower(cfg).to(dev).train()
        size = tower_image_size(towers[name])
        pixels = torch.randn(batch_size, 3, size, size, device=dev)
        for precision in PRECISIONS:
            steps[name, precision] = step_fn(towers[name], pixels, precision)
    times = {key: median_time(step, dev, warmup, iters) for key, step in steps.items()}
    for _ in range(rounds - 1):
        for key, step in steps.items():
            times[key] = min(times[key], median_time(step, dev, 1, iters))
    where = f"batch {batch_size}, {tower_image_size(towers['vit'])} px, {dev.type}"
    rows = []
    for name, tower in towers.items():
        params = sum(p.numel() for p in tower.parameters())
        rows.append(Row(f"tower {name}: parameters ({num_patches(tower)} patches)", params / 1e6, "M"))
        for precision in PRECISIONS:
            rows.append(Row(f"tower {name}: fwd+bwd {precision} ({where})", times[name, precision] * 1000, "ms"))
    for name in ("resnet", "convnext"):
        for precision in PRECISIONS:
            rows.append(Row(f"tower {name} / vit time {precision}", times[name, precision] / times["vit", precision]))
    return rows


def main() -> None:
    """``python -m bench.towers``: parse the command line and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds; each tower keeps its best")
    args = parser.parse_args()
    print(format_table(run(args.batch_size, args.device, args.warmup, args.iters, args.rounds), "vision towers"))


if __name__ == "__main__":
    main()
