"""Tiny stand-ins every VLM (and stage-two) test loads from disk through the same code real users use.

A byte-level BPE (with ``<image>``) and a 2-layer ``LlamaForCausalLM`` saved together (the world's
LLM layout: no chat template), and a 2-layer CLIP (or SigLIP) vision tower (32 px, 8 px patches: P = 16) saved
with its ``preprocessor_config.json``. The fixtures in conftest.py build them once per session.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import AutoProcessor, LlamaConfig, LlamaForCausalLM, LlavaForConditionalGeneration

from encoders.towers import ImageTransform, build_vision_tower
from vlm.config import BridgeConfig, LoraConfig, VisionTowerConfig, VLMConfig
from vlm.data.tokenizer import train_bpe_tokenizer

COLORS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle", "star"]


def corpus() -> list[str]:
    texts = []
    for c in COLORS:
        for s in SHAPES:
            texts += [f"a small {c} {s} left of a large {s}.", f"Is there a {c} {s} in the image? Yes",
                      f"Describe the image briefly. There is a {c} {s}.", "No", "Yes", "How many objects? 2"]
    return texts


def save_tiny_llm(directory: Path, chat_template: str | None = None, image_token: bool = True,
                  initializer_range: float = 0.02) -> Path:
    """A 2-layer Llama + BPE saved to ``directory`` (optionally with a chat template / without ``<image>``).

    A larger ``initializer_range`` gives the frozen (tied) output head enough scale for LoRA and a
    bridge to fit data in a few steps.
    """
    tok = train_bpe_tokenizer(corpus(), vocab_size=300, model_max_length=128,
                              extra_special_tokens=("<image>",) if image_token else (), add_bos=True, add_eos=False)
    if chat_template:
        tok.chat_template = chat_template
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=True, initializer_range=initializer_range)
    LlamaForCausalLM(config).save_pretrained(str(directory))
    tok.save_pretrained(str(directory))
    return directory


def save_tiny_tower(directory: Path, arch: str = "clip") -> Path:
    """A 2-layer CLIP (or SigLIP) vision tower (32 px, 8 px patches, width 32) + its preprocessor config."""
    torch.manual_seed(1)
    tower = build_vision_tower(VisionTowerConfig(arch=arch, image_size=32, patch_size=8, hidden_size=32,
                                                 num_layers=2, num_heads=2, mlp_ratio=2))
    tower.save_pretrained(str(directory))
    ImageTransform(32).save_pretrained(directory)
    return directory


def save_conv_tower(directory: Path, arch: str) -> Path:
    """A 32-px conv tower (stride 8: a 4x4 grid, P = 16) saved with its preprocessor config."""
    torch.manual_seed(2)
    tower = build_vision_tower(VisionTowerConfig(arch=arch, image_size=32, patch_size=8, stage_widths=[16, 32],
                                                 stage_depths=[1, 1]))
    tower.save_pretrained(str(directory))
    ImageTransform(32).save_pretrained(directory)
    return directory


def vlm_config(tower: Path, llm: Path, bridge: str = "projector", **kw) -> VLMConfig:
    """A tiny VLMConfig (LoRA r=4 on all linear layers; flamingo: 4 latents, 1 resampler layer)."""
    kw.setdefault("lora", LoraConfig(r=4, alpha=8))
    return VLMConfig(vision_tower=str(tower), llm=str(llm),
                     bridge=BridgeConfig(name=bridge, num_latents=4, resampler_layers=1, xattn_every=1, num_heads=2),
                     **kw)


def random_images(n: int, seed: int = 0, size: int = 40) -> list[np.ndarray]:
    """n random uint8 RGB images [size, size, 3]."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def perturb_trainable(model, seed: int = 0, scale: float = 0.2) -> None:
    """Give every trainable tensor (LoRA B = 0 and gates = 0 at init) random values, so tests see them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


PROBE_PROMPTS = ["Is there a red circle?", "How many objects are in the image?"]


def probe_logits(model) -> torch.Tensor:
    """The model's logits [2, T, V] on a fixed batch (two random images, ``PROBE_PROMPTS``), no grad:
    what save / reload round-trip tests compare."""
    batch = model.processor(random_images(2, seed=3), PROBE_PROMPTS)
    with torch.no_grad():
        return model.logits(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])


def stock_logits(out_dir, image, prompt):
    """Logits of the exported dir through transformers alone: AutoProcessor's chat template and
    pixels, LlavaForConditionalGeneration's forward. One image, one prompt -> ([T,V], input_ids [T])."""
    processor = AutoProcessor.from_pretrained(str(out_dir))
    llava = LlavaForConditionalGeneration.from_pretrained(str(out_dir)).eval()
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        return llava(**inputs).logits[0], inputs["input_ids"][0]


def our_logits(model, image, prompt):
    """The same through our VisionLanguageModel: one image, one prompt -> ([T,V], input_ids [T])."""
    batch = model.processor([image], [prompt])
    with torch.no_grad():
        return model.logits(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])[0], batch["input_ids"][0]
