"""GPU benchmark of the real recipes: step time, throughput, MFU and peak memory on one GPU.

``python -m bench.gpu`` (``make bench-gpu``) on one CUDA GPU, random weights (``bench.shapes``:
nothing is downloaded), bf16 autocast, prints one table:

- stage one, ``configs/stage1/sparc_vitb16.yaml`` and its CLIP twin (ViT-B/16, 224 px): step time,
  samples/s, achieved TFLOP/s and MFU, with SDPA attention and, when the flash-attn package is
  installed, flash-attention 2 (a row says so when it is not); the SPARC / CLIP step-time ratio
  (target <= 1.02x; the paper's FLOP ratio is 1.005x).
- stage two, ``configs/stage2/{projector,flamingo}_qwen05b.yaml`` on the Qwen2-0.5B-shaped LLM (all
  24 layers) with LoRA, and the projector with QLoRA (NF4 base weights through bitsandbytes; a
  row says why when bitsandbytes or CUDA is missing): tokens/s, TFLOP/s, MFU, peak memory.

A step is zero_grad, forward, backward and AdamW on the trainable parameters (``bench.shapes``),
timed as the median of ``--iters`` after ``--warmup``. Its FLOPs are counted once with
``FlopCounterMode`` (matmuls and attention, forward and backward: for the frozen LLM only what
backward really computes). MFU = FLOPs per step / step time / the GPU's peak dense bf16 FLOP/s
(``PEAK_BF16`` by device name; n/a for a GPU not in it). Targets: stage one >= 45%, stage two >= 40%.
The whole run takes a few minutes on one H100/H200 (budget: 8).

``--dry-run`` runs the same code with tiny shapes on the CPU (a tiny stage-one recipe, a 2-layer
64-wide LLM), so that CI catches a broken script; its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Qwen2Config

from bench import shapes
from bench.common import median_time
from bench.stage1 import recipe
from eval.report import markdown_table

# Peak dense bf16 tensor-core FLOP/s (no sparsity), by a substring of torch.cuda.get_device_name(),
# most specific first.
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("A100", 312e12))
TARGET_MFU = {"stage one": 0.45, "stage two": 0.40}


@dataclass
class Result:
    """One measured configuration (``seconds`` 0 and ``note`` set when it was skipped)."""

    stage: str
    name: str
    seconds: float = 0.0
    items: int = 0  # samples (stage one) or tokens (stage two) per step
    unit: str = "samples/s"
    flops: int = 0
    peak_bytes: int = 0
    note: str = ""


def peak_flops(device: torch.device) -> Optional[float]:
    """The peak dense bf16 FLOP/s of ``device`` from ``PEAK_BF16``; None when unknown (or a CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def flash_attn_available(device: torch.device) -> bool:
    """True when flash-attention 2 can run: CUDA and the flash-attn package."""
    return device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None


def measure(stage: str, name: str, model: torch.nn.Module, batch: dict, items: int, unit: str,
            device: torch.device, warmup: int, iters: int) -> Result:
    """Time ``model``'s training step on ``batch``, count its FLOPs once, read its peak memory."""
    step = shapes.training_step(model, batch)
    step()  # the AdamW state exists from here on
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = median_time(step, device, warmup, iters)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return Result(stage, name, seconds, items, unit, counter.get_total_flops(), peak)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def guarded(stage: str, name: str, measure_one: Callable[[], Result]) -> Result:
    """``measure_one()``, or a row saying why it failed (out of memory, an attention kernel that
    refuses these shapes...), so that one configuration does not hide the others' numbers."""
    try:
        result = measure_one()
    except (RuntimeError, ValueError, ImportError, torch.cuda.OutOfMemoryError) as e:
        result = Result(stage, name, note=f"failed: {e!r:.150}")
    _free(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return result


def _stage1_one(cfg, tokenizer, impl: str, device: torch.device, batch_size: int, warmup: int,
                iters: int) -> Result:
    model = shapes.stage1_model(cfg, tokenizer, device)
    model.encoder.vision.set_attn_implementation(impl)
    model.encoder.text.set_attn_implementation(impl)
    batch = shapes.stage1_batch(cfg, tokenizer, batch_size, device)
    name = f"{cfg.objective.name}, {impl}, batch {batch_size}"
    return measure("stage one", name, model, batch, batch_size, "samples/s", device, warmup, iters)


def stage1_results(device: torch.device, dry_run: bool, batch_size: int, warmup: int,
                   iters: int) -> tuple[list[Result], list[str]]:
    """SPARC and CLIP (ViT-B/16; tiny recipes in a dry run) per attention implementation, and the
    SPARC / CLIP step-time ratio of each implementation."""
    cfgs = {n: recipe(n, "tiny") for n in ("sparc", "clip")} if dry_run else shapes.stage1_recipes()
    tokenizer = shapes.word_tokenizer()
    impls = ["sdpa"] + (["flash_attention_2"] if flash_attn_available(device) else [])
    results, ratios = [], []
    for impl in impls:
        seconds = {}
        for name, cfg in cfgs.items():
            result = guarded("stage one", f"{name}, {impl}, batch {batch_size}", lambda: _stage1_one(
                cfg, tokenizer, impl, device, batch_size, warmup, iters))
            results.append(result)
            seconds[name] = result.seconds
        if seconds["sparc"] and seconds["clip"]:
            ratios.append(f"SPARC / CLIP step time ({impl}): {seconds['sparc'] / seconds['clip']:.3f}x "
                          f"(target <= 1.02x)")
    if not flash_attn_available(device):
        results.append(Result("stage one", "flash_attention_2", note="skipped: needs CUDA and the flash-attn package"))
    return results, ratios


def _stage2_one(bridge: str, tower: Path, llm: Path, device: torch.device, batch_size: int, text_words: int,
                warmup: int, iters: int, **changes) -> Result:
    cfg = shapes.stage2_recipe(bridge, tower, llm, **changes)
    model = shapes.stage2_model(cfg, device)
    batch = shapes.stage2_batch(model, batch_size, text_words, device)
    tokens = int(batch["attention_mask"].sum())
    kind = "QLoRA 4-bit" if changes.get("load_in_4bit") else "LoRA"
    name = f"{bridge} + {kind}, batch {batch_size}, {tokens} tokens"
    return measure("stage two", name, model, batch, tokens, "tokens/s", device, warmup, iters)


def qlora_unavailable(device: torch.device) -> str:
    """Why QLoRA cannot run here ("" when it can)."""
    if device.type != "cuda":
        return "skipped: QLoRA needs CUDA"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "skipped: QLoRA needs the bitsandbytes package (pip install 'sparc-vlm[gpu]')"
    return ""


def stage2_results(device: torch.device, dry_run: bool, batch_size: int, text_words: int, warmup: int,
                   iters: int) -> list[Result]:
    """Both bridges with LoRA and the projector with QLoRA on the 0.5B-shaped LLM (tiny in a dry run)."""
    llm_dtype = "bf16" if device.type == "cuda" else "fp32"
    with tempfile.TemporaryDirectory() as tmp:
        if dry_run:
            tiny = Qwen2Config(vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
            vision = recipe("sparc", "tiny").model.vision
            tower, llm = shapes.save_stage2_assets(Path(tmp), llm_config=tiny, vision=vision)
        else:
            tower, llm = shapes.save_stage2_assets(Path(tmp))

        def run(bridge: str, **changes) -> Result:
            kind = "QLoRA 4-bit" if changes.get("load_in_4bit") else "LoRA"
            return guarded("stage two", f"{bridge} + {kind}", lambda: _stage2_one(
                bridge, tower, llm, device, batch_size, text_words, warmup, iters, llm_dtype=llm_dtype, **changes))
        results = [run("projector"), run("flamingo")]
        why = qlora_unavailable(device)
        results.append(Result("stage two", "projector + QLoRA 4-bit", note=why) if why else
                       run("projector", load_in_4bit=True))
    return results


def table(results: list[Result], peak: Optional[float]) -> str:
    """The Markdown table of ``results`` (MFU against ``peak`` FLOP/s; n/a when None)."""
    rows = []
    for r in results:
        if not r.seconds:
            rows.append([r.stage, r.name, "", "", "", "", "", r.note])
            continue
        achieved = r.flops / r.seconds
        mfu = f"{achieved / peak:.1%}" if peak else "n/a"
        rows.append([r.stage, r.name, f"{r.seconds * 1e3:.1f}", f"{r.items / r.seconds:,.0f} {r.unit}",
                     f"{achieved / 1e12:.1f}", mfu, f"{r.peak_bytes / 2**30:.2f}" if r.peak_bytes else "",
                     f">= {TARGET_MFU[r.stage]:.0%} MFU"])
    return markdown_table(["stage", "run", "step ms", "throughput", "TFLOP/s", "MFU", "peak GiB", "target / note"],
                          rows, align="llrrrrrl")


def run(dry_run: bool = False, warmup: int = 3, iters: int = 10, stage1_batch: int = 256, stage2_batch: int = 16,
        text_words: int = 200) -> str:
    """Measure everything on the GPU (tiny shapes on the CPU with ``dry_run``); returns the report."""
    if not dry_run and not torch.cuda.is_available():
        raise RuntimeError("bench.gpu needs a CUDA GPU; use --dry-run to check the script on a CPU")
    device = torch.device("cpu" if dry_run else "cuda")
    if dry_run:
        warmup, iters, stage1_batch, stage2_batch, text_words = 0, 1, 2, 2, 8
    results, ratios = stage1_results(device, dry_run, stage1_batch, warmup, iters)
    results += stage2_results(device, dry_run, stage2_batch, text_words, warmup, iters)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run: tiny shapes)"
    lines = [f"### GPU benchmark on {name}", "", table(results, peak_flops(device)), ""]
    return "\n".join(lines + ratios)


def main() -> None:
    """Parse the command line, run, print the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (CI)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--stage1-batch", type=int, default=256)
    parser.add_argument("--stage2-batch", type=int, default=16)
    parser.add_argument("--text-words", type=int, default=200, help="words per question (answers: half)")
    args = parser.parse_args()
    print(run(args.dry_run, args.warmup, args.iters, args.stage1_batch, args.stage2_batch, args.text_words))


if __name__ == "__main__":
    main()
