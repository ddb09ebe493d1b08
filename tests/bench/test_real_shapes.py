"""CPU smoke runs of the GPU recipes at their real shapes, random weights, no download: one training
step of the ViT-B/16 SPARC and CLIP stage-one models (batch 2) and of each stage-two bridge with
LoRA on a Qwen2-0.5B-shaped LLM (batch 2). Each step runs in its own process (``python -m
bench.shapes``: peak memory is that process's peak resident set) and prints parameters, FLOPs per
step and peak memory; run with ``-s`` to see them.

Layers reduced: the stage-two LLM keeps Qwen2-0.5B's full width, heads and 151,936-row vocabulary
but only 4 of its 24 decoder layers, so that both bridges' steps fit the CI budget on 2 cores (the
full depth takes minutes per step there). Its full-depth parameter count is checked on the meta
device instead; the GPU bench (``bench.gpu``) runs the full depth.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import shapes
from encoders.config import Stage1Config
from vlm.config import Stage2Config, load_config

ROOT = Path(__file__).resolve().parents[2]
LLM_LAYERS = 4  # of Qwen2-0.5B's 24 (see the module docstring)
Q = shapes.QWEN2_05B


def _smoke(*args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-m", "bench.shapes", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    print("\n" + lines[-2])
    return json.loads(lines[-1])


def lora_params_per_layer(r: int) -> int:
    """LoRA A and B of every linear layer of one Qwen2-0.5B decoder layer: r * (in + out) each."""
    kv = Q["hidden_size"] // Q["num_attention_heads"] * Q["num_key_value_heads"]
    d, f = Q["hidden_size"], Q["intermediate_size"]
    return r * ((d + d) * 2 + (d + kv) * 2 + (d + f) * 2 + (f + d))


def test_recipes_load_at_the_real_shapes():
    s1 = load_config(Stage1Config, ROOT / "configs/stage1/sparc_vitb16.yaml")
    v, t = s1.model.vision, s1.model.text
    vision = (v.arch, v.image_size, v.patch_size, v.hidden_size, v.num_layers, v.num_heads)
    assert vision == ("clip", 224, 16, 768, 12, 12)
    assert (t.vocab_size, t.hidden_size, t.num_layers, t.max_len, s1.objective.name) == (32000, 512, 12, 77, "sparc")
    assert shapes.stage1_recipes()["clip"].objective.name == "clip"
    for bridge, path in shapes.STAGE2_RECIPES.items():
        m = load_config(Stage2Config, path).model
        assert m.bridge.name == bridge and m.lora.enabled and m.lora.r == 64 and m.lora.target_modules == ["all-linear"]
        assert m.llm_dtype == "bf16" and Q["hidden_size"] % m.bridge.num_heads == 0
    assert 494.0e6 < shapes.full_depth_params() < 494.1e6  # Qwen2-0.5B: 494,032,768 (tied embedding)


@pytest.fixture(scope="module")
def stage1_costs():
    return {name: _smoke(name) for name in ("sparc", "clip")}


def test_stage1_vitb16_step(stage1_costs):
    sparc, clip = stage1_costs["sparc"], stage1_costs["clip"]
    for cost in (sparc, clip):
        assert 140e6 < cost["params"] < 142e6 and cost["trainable"] == cost["params"]
        assert cost["flops"] > 0.15e12 and cost["peak_bytes"] > 0
    # SPARC adds local heads and a fine-grained loss whose FLOPs are small next to the towers' (paper: 1.005x)
    assert sparc["flops"] / clip["flops"] < 1.02


@pytest.fixture(scope="module")
def stage2_assets(tmp_path_factory):
    return shapes.save_stage2_assets(tmp_path_factory.mktemp("real"), LLM_LAYERS)


@pytest.mark.parametrize("bridge", ["projector", "flamingo"])
def test_stage2_qwen05b_lora_step(stage2_assets, bridge):
    tower, llm = stage2_assets
    cost = _smoke(bridge, "--tower", str(tower), "--llm", str(llm))
    lora = lora_params_per_layer(64) * LLM_LAYERS
    if bridge == "projector":  # 2-layer MLP 768 -> 896 -> 896
        assert cost["trainable"] == lora + 768 * 896 + 896 + 896 * 896 + 896
    else:  # resampler and gated cross-attention blocks
        assert cost["trainable"] > lora + 10e6
    assert cost["params"] > 86e6 + Q["vocab_size"] * Q["hidden_size"]  # ViT-B/16 + the embedding at least
    assert cost["flops"] > 0 and cost["tokens"] > 0 and cost["peak_bytes"] > 0
