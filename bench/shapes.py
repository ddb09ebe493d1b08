"""The GPU recipes at their real shapes, with random weights (nothing is downloaded), and what one
training step of them costs: parameters, FLOPs, peak memory, seconds.

Stage one: ``configs/stage1/sparc_vitb16.yaml`` (ViT-B/16 at 224 px, a 12-layer 512-wide text tower
with the recipe's 32k vocabulary) and its CLIP twin (``bench.stage1.recipe``: CLS pooling, no
SPARC heads, the CLIP loss). Stage two: ``configs/stage2/{projector,flamingo}_qwen05b.yaml`` on a
ViT-B/16 tower and an LLM built from Qwen2-0.5B's config (``QWEN2_05B``: 896 wide, 24 layers,
14 heads with 2 KV heads, a 151,936-row tied embedding), with the recipe's LoRA (r 64 on every
linear layer). Both are saved to a directory and loaded by ``VisionLanguageModel.build``, the path
a real run takes. ``num_layers`` may shorten the LLM (full width): the CPU smoke tests do so to
stay within the CI budget and say it.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and
attention, forward and backward; elementwise ops are not counted). Peak memory: on CUDA
``torch.cuda.max_memory_allocated`` (everything on the device, the model included); on the CPU
there is no allocator statistic and tracemalloc does not see torch's allocations, so it is the
process's peak resident set (``resource.getrusage().ru_maxrss``) after the step, and the step's
own share is that minus the resident set just before it (``/proc/self/statm``): run each model
in a fresh process (``python -m bench.shapes``) so that an earlier peak does not hide it.

``python -m bench.shapes {sparc,clip,projector,flamingo} [--layers N] [--tower DIR --llm DIR]``
prints one model's line and its figures as JSON (what the smoke tests run).
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import Qwen2Config, Qwen2ForCausalLM

from bench.stage1 import WORDS, build, make_batch, recipe
from encoders.config import Stage1Config
from encoders.stage1_model import Stage1Model
from encoders.towers import ImageTransform, build_vision_tower
from vlm.config import Stage2Config, VisionTowerConfig, load_config, replace
from vlm.data.prompts import IMAGE_TOKEN
from vlm.data.tokenizer import train_bpe_tokenizer
from vlm.model.vision_language_model import VisionLanguageModel

ROOT = Path(__file__).resolve().parents[1]
STAGE2_RECIPES = {b: ROOT / "configs" / "stage2" / f"{b}_qwen05b.yaml" for b in ("projector", "flamingo")}

# Qwen2-0.5B / Qwen2.5-0.5B's config.json (the shapes, not the weights).
QWEN2_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                 rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu")


def qwen05b_config(num_layers: Optional[int] = None) -> Qwen2Config:
    """Qwen2-0.5B's config, optionally with ``num_layers`` decoder layers (same width)."""
    shape = dict(QWEN2_05B)
    if num_layers is not None:
        shape["num_hidden_layers"] = num_layers
    return Qwen2Config(**shape)


def word_tokenizer(vocab_size: int = 512, image_token: bool = False):
    """A byte-level BPE over ``bench.stage1.WORDS`` (seconds to train); the models keep the
    recipes' vocabulary sizes, this only supplies ids."""
    corpus = [" ".join(WORDS)] * 4 + WORDS * 8
    specials = (IMAGE_TOKEN,) if image_token else ()
    return train_bpe_tokenizer(corpus, vocab_size=vocab_size, extra_special_tokens=specials, add_bos=True,
                               add_eos=True, model_max_length=4096)


# ----------------------------------------------------------------------------------------------
# Stage one
# ----------------------------------------------------------------------------------------------


def stage1_recipes() -> dict[str, Stage1Config]:
    """The ViT-B/16 SPARC recipe and its CLIP twin, by objective name."""
    return {name: recipe(name, "vitb16") for name in ("sparc", "clip")}


def stage1_model(cfg: Stage1Config, tokenizer, device: torch.device) -> Stage1Model:
    """The recipe's ``Stage1Model`` with its text embedding at ``cfg.model.text.vocab_size`` rows
    (the recipe trains a BPE of that size on its captions; ``tokenizer`` only supplies ids)."""
    model = build(cfg, tokenizer, torch.device("cpu"))
    model.encoder.text.resize_token_embeddings(cfg.model.text.vocab_size)
    return model.to(device)


def stage1_batch(cfg: Stage1Config, tokenizer, batch_size: int, device: torch.device) -> dict:
    """Random pixels at the recipe's size and random captions padded to its ``max_len``."""
    return {k: v.to(device) for k, v in make_batch(tokenizer, cfg, batch_size).items()}


# ----------------------------------------------------------------------------------------------
# Stage two
# ----------------------------------------------------------------------------------------------


def save_stage2_assets(directory: Path, num_layers: Optional[int] = None, llm_config: Optional[Qwen2Config] = None,
                       vision: Optional[VisionTowerConfig] = None) -> tuple[Path, Path]:
    """A random tower (default: the ViT-B/16 of the stage-one recipe) and a random LLM (default:
    Qwen2-0.5B-shaped with ``num_layers`` layers) with a word tokenizer, saved in bf16 under
    ``directory``: (tower dir, llm dir)."""
    torch.manual_seed(0)
    vision = vision or stage1_recipes()["sparc"].model.vision
    tower_dir, llm_dir = directory / "tower", directory / "llm"
    build_vision_tower(vision).save_pretrained(str(tower_dir))
    ImageTransform(vision.image_size).save_pretrained(tower_dir)
    tokenizer = word_tokenizer(image_token=True)
    llm = Qwen2ForCausalLM(llm_config or qwen05b_config(num_layers)).to(torch.bfloat16)
    llm.generation_config.pad_token_id = tokenizer.pad_token_id
    llm.save_pretrained(str(llm_dir))
    tokenizer.save_pretrained(str(llm_dir))
    return tower_dir, llm_dir


def stage2_recipe(bridge: str, tower: Path, llm: Path, **model_changes) -> Stage2Config:
    """``configs/stage2/{bridge}_qwen05b.yaml`` pointed at ``tower`` and ``llm`` (plus ``model_changes``,
    e.g. ``llm_dtype="fp32"`` on a CPU)."""
    cfg = load_config(Stage2Config, STAGE2_RECIPES[bridge])
    return replace(cfg, model=replace(cfg.model, vision_tower=str(tower), llm=str(llm), **model_changes))


def stage2_model(cfg: Stage2Config, device: torch.device) -> VisionLanguageModel:
    """The recipe's VLM (frozen tower and LLM, new bridge and LoRA) on ``device`` (a 4-bit LLM is
    placed on the current CUDA device by its loader and not moved)."""
    torch.manual_seed(0)
    model = VisionLanguageModel.build(cfg.model, max_len=cfg.data.max_len)
    return model if cfg.model.load_in_4bit else model.to(device)


def stage2_batch(model: VisionLanguageModel, batch_size: int, text_words: int, device: torch.device) -> dict:
    """``batch_size`` random images with one conversation each: a ``text_words``-word question and a
    ``text_words // 2``-word answer (labels on the answer)."""
    rng = random.Random(0)
    size = model.image_transform.image_size
    images = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))

    def words(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))
    convs = [[("human", words(text_words) + "?"), ("gpt", words(text_words // 2) + ".")] for _ in range(batch_size)]
    return {k: v.to(device) for k, v in model.processor.conversations(images, convs).items()}


# ----------------------------------------------------------------------------------------------
# One step's cost
# ----------------------------------------------------------------------------------------------


@dataclass
class StepCost:
    """One training step (zero_grad, forward, backward, AdamW on the trainable parameters)."""

    params: int
    trainable: int
    flops: int
    peak_bytes: int  # peak of the device (CUDA) or of the process's resident set (CPU)
    step_bytes: int  # the step's own share: peak minus what was resident/allocated before it
    seconds: float
    tokens: int  # real tokens in the batch (stage two; 0 for stage one)


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def training_step(model: torch.nn.Module, batch: dict, lr: float = 1e-4):
    """A closure running one training step of ``model`` on ``batch`` (bf16 autocast on CUDA)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    device = batch["pixel_values"].device

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(batch)["loss"]
        loss.float().backward()
        opt.step()
    return step


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure_step(model: torch.nn.Module, batch: dict) -> StepCost:
    """Run one (first) training step counting its FLOPs and peak memory (module docstring)."""
    device = batch["pixel_values"].device
    step = training_step(model, batch)
    params, trainable = count_params(model)
    flops = FlopCounterMode(display=False)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if cuda else _resident_bytes()
    t0 = time.perf_counter()
    with flops:
        step()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # (kilobytes on Linux)
    tokens = int(batch["attention_mask"].sum()) if "labels" in batch else 0
    return StepCost(params, trainable, flops.get_total_flops(), int(peak), int(peak - before), seconds, tokens)


def describe(name: str, cost: StepCost) -> str:
    """One printable line: parameters, FLOPs per step, peak memory, seconds."""
    return (f"{name}: {cost.params / 1e6:.1f}M parameters ({cost.trainable / 1e6:.2f}M trainable), "
            f"{cost.flops / 1e12:.3f} TFLOP per step, peak memory {cost.peak_bytes / 2**30:.2f} GiB "
            f"(the step's own {cost.step_bytes / 2**30:.2f} GiB), {cost.seconds:.1f} s"
            + (f", {cost.tokens} tokens" if cost.tokens else ""))


def full_depth_params() -> int:
    """Parameters of the Qwen2-0.5B-shaped LLM at its 24 layers (built on the meta device: no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for p in Qwen2ForCausalLM(qwen05b_config()).parameters())


def smoke(what: str, layers: Optional[int], tower: str, llm: str, batch_size: int, text_words: int) -> StepCost:
    """Build one model at its real shape (LLM depth ``layers``) and measure one step on the CPU."""
    cpu = torch.device("cpu")
    if what in ("sparc", "clip"):
        cfg = stage1_recipes()[what]
        tokenizer = word_tokenizer()
        return measure_step(stage1_model(cfg, tokenizer, cpu), stage1_batch(cfg, tokenizer, batch_size, cpu))
    with tempfile.TemporaryDirectory() as tmp:
        if not (tower and llm):
            tower, llm = map(str, save_stage2_assets(Path(tmp), layers))
        cfg = stage2_recipe(what, Path(tower), Path(llm), llm_dtype="fp32")  # (CPUs lack fast bf16 matmuls)
        model = stage2_model(cfg, cpu)
        return measure_step(model, stage2_batch(model, batch_size, text_words, cpu))


def main() -> None:
    """Parse the command line, measure one model, print its line and its figures as JSON."""
    parser = argparse.ArgumentParser(description="one real-shape training step on the CPU")
    parser.add_argument("what", choices=("sparc", "clip", "projector", "flamingo"))
    parser.add_argument("--layers", type=int, default=None, help="LLM decoder layers (default: 24)")
    parser.add_argument("--tower", default="", help="a saved tower (save_stage2_assets), else one is made")
    parser.add_argument("--llm", default="", help="a saved LLM (save_stage2_assets), else one is made")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--text-words", type=int, default=60)
    args = parser.parse_args()
    cost = smoke(args.what, args.layers, args.tower, args.llm, args.batch_size, args.text_words)
    print(describe(args.what, cost))
    print(json.dumps({"what": args.what, **cost.__dict__}))


if __name__ == "__main__":
    main()
