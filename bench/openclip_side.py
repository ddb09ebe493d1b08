"""open_clip's side of ``bench.stage1``: its own CLIP model class, ``ClipLoss`` and training step.

Run by ``bench.stage1`` as a subprocess in open_clip's environment (``--openclip-python``: open_clip
needs torchvision, which needs another torch than ours), so it imports only torch, open_clip and
``bench.measure``. The model is ``open_clip.model.CLIP`` with the sizes it is given (our tiny ViT and
text tower: width, layers, heads, patch, image size, context = our batch's token length, vocab,
embed dim); the data a fixed in-memory batch (random pixels, random token ids ending in the EOT
id); the step ``open_clip_train.train.train_one_epoch``'s: zero_grad, forward, ``ClipLoss``,
backward, grad-norm clipping, AdamW step, logit-scale clamp to ln 100, and the loss read back
(open_clip logs it each step). Prints one json line: samples/s (``batch / median step time``),
step_ms, peak_mib (``bench.measure.step_peak_bytes``) and the parameter count.
"""
from __future__ import annotations

import argparse
import json
import math

import torch

from bench.measure import median_time, step_peak_bytes


def build(args: argparse.Namespace) -> torch.nn.Module:
    """``open_clip.model.CLIP`` with our tiny towers' sizes."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=args.vision_layers, width=args.vision_width,
                           head_width=args.vision_width // args.vision_heads, mlp_ratio=args.mlp_ratio,
                           patch_size=args.patch_size, image_size=args.image_size)
    text = CLIPTextCfg(context_length=args.context, vocab_size=args.vocab, width=args.text_width,
                       heads=args.text_heads, layers=args.text_layers, mlp_ratio=args.mlp_ratio)
    return CLIP(args.embed_dim, vision, text, init_logit_scale=math.log(1 / 0.07), output_dict=True)


def training_step(model: torch.nn.Module, images: torch.Tensor, texts: torch.Tensor, lr: float, grad_clip: float):
    """(step closure, optimizer): ``train_one_epoch``'s per-batch work on one fixed batch."""
    from open_clip.loss import ClipLoss

    loss_fn = ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.05)

    def step() -> None:
        opt.zero_grad()
        out = model(images, texts)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, norm_type=2.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        float(loss.item())

    return step, opt


def main() -> None:
    """Parse the sizes, measure, print one json line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("batch", 64), ("image-size", 64), ("patch-size", 8), ("vision-width", 128),
                          ("vision-layers", 4), ("vision-heads", 4), ("text-width", 128), ("text-layers", 4),
                          ("text-heads", 4), ("mlp-ratio", 4), ("context", 24), ("vocab", 1024), ("embed-dim", 128),
                          ("threads", 0), ("warmup", 3), ("iters", 10), ("rounds", 2)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--grad-clip", type=float, default=1.0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build(args).to(device).train()
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    texts = torch.randint(1, args.vocab - 1, (args.batch, args.context), device=device)
    texts[:, -1] = args.vocab - 1  # the EOT id, where open_clip's argmax pooling reads the text
    step, opt = training_step(model, images, texts, args.lr, args.grad_clip)
    seconds = min(median_time(step, device, args.warmup if r == 0 else 1, args.iters) for r in range(args.rounds))
    peak = step_peak_bytes(step, list(model.parameters()), opt, device)
    print(json.dumps({"samples_per_s": args.batch / seconds, "step_ms": seconds * 1000, "peak_mib": peak / 2 ** 20,
                      "params": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads(),
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
