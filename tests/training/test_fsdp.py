"""FSDP2 per layer under torchrun (2 CPU processes, gloo) on the tiny VLM with LoRA, both bridges:
each rank holds about half the parameters, the logged loss equals one process's on the full batch,
and a run resumed from a sharded (torch.distributed.checkpoint) checkpoint repeats the losses."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from training import parallel
from training.loop import train
from vlm.config import OptimConfig, RunConfig

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "vlm"))
from tiny_vlm import save_tiny_llm, save_tiny_tower  # noqa: E402

COMMON = textwrap.dedent("""
    import sys
    sys.path.insert(0, TESTS_VLM)
    import torch
    from tiny_vlm import random_images, vlm_config
    from training.data import ResumableBatches
    from vlm.model.vision_language_model import VisionLanguageModel

    def model(tower, llm, bridge):
        torch.manual_seed(0)
        return VisionLanguageModel.build(vlm_config(tower, llm, bridge))

    def data(vlm, batch_size, rank, world_size):
        images = random_images(16, seed=1)
        answers = ["Yes", "No"] * 8   # one token each: every sample has the same number of targets
        def make(ids):
            return vlm.processor([images[i] for i in ids], ["Is there a red circle?"] * len(ids),
                                 [answers[i] for i in ids])
        return ResumableBatches(16, batch_size, make, seed=2, rank=rank, world_size=world_size)

    OPTIM = dict(lr=0.05, warmup_steps=1, max_steps=4, grad_accum=2, grad_clip=1.0)
""")

SCRIPT = textwrap.dedent("""
    import json, shutil
    from pathlib import Path
    from training import distributed, parallel
    from training.loop import train
    from vlm.config import OptimConfig, RunConfig
    tower, llm, out = sys.argv[1:4]
    info = distributed.setup("cpu")

    def run(bridge, out_dir, resume=False):
        vlm = model(tower, llm, bridge)
        full = parallel.local_param_bytes(vlm)
        run = RunConfig(out_dir=str(out_dir), ckpt_every=2, keep_last=5, log_every=1, progress=False,
                        tensorboard=False, device="cpu", distributed="fsdp", resume=resume)
        result = train(vlm, data(vlm, 2, info.rank, info.world_size), OptimConfig(**OPTIM), run)
        return full, parallel.local_param_bytes(vlm), result

    for bridge in ("projector", "flamingo"):
        a, b = Path(out) / bridge / "a", Path(out) / bridge / "b"
        full, local, result = run(bridge, a)
        units = len(parallel.fsdp_units(model(tower, llm, bridge)))
        if info.is_main:   # b: a's run interrupted after the checkpoint of step 2
            shutil.copytree(a, b, ignore=shutil.ignore_patterns("step_00000004", "final"))
        distributed.barrier()
        resumed = run(bridge, b, resume=True)[2]
        row = {"full": full, "local": local, "units": units, "loss": [h["loss"] for h in result.history],
               "resumed": [h["loss"] for h in resumed.history]}
        (Path(out) / f"{bridge}_rank{info.rank}.json").write_text(json.dumps(row))
    torch.distributed.destroy_process_group()
""")


@pytest.fixture(scope="module")
def tiny_tower_dir(tmp_path_factory) -> Path:
    return save_tiny_tower(tmp_path_factory.mktemp("tower"))


@pytest.fixture(scope="module")
def tiny_llm_dir(tmp_path_factory) -> Path:
    return save_tiny_llm(tmp_path_factory.mktemp("llm"))


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, tiny_tower_dir, tiny_llm_dir):
    tmp = tmp_path_factory.mktemp("fsdp")
    script = tmp / "fsdp_vlm.py"
    script.write_text(f"TESTS_VLM = {str(ROOT / 'tests' / 'vlm')!r}\n" + COMMON + SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tiny_tower_dir), str(tiny_llm_dir), str(tmp)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return tmp


@pytest.mark.parametrize("bridge", ["projector", "flamingo"])
def test_fsdp_shards_per_layer_and_matches_one_process(fsdp_run, tiny_tower_dir, tiny_llm_dir, tmp_path, bridge):
    ranks = [json.loads((fsdp_run / f"{bridge}_rank{r}.json").read_text()) for r in (0, 1)]
    for row in ranks:
        ratio = row["local"] / row["full"]
        print(f"{bridge}: rank param bytes {row['local']} of {row['full']} ({ratio:.3f}), {row['units']} units")
        assert 0.45 < ratio < 0.55
    # tiny LLM 2 decoder layers + tower 2 encoder layers (+ flamingo: 1 resampler layer, 2 cross-attention blocks)
    assert ranks[0]["units"] == (4 if bridge == "projector" else 7)

    toy: dict = {"TESTS_VLM": str(ROOT / "tests" / "vlm")}
    exec(compile(COMMON, "common", "exec"), toy)
    vlm = toy["model"](str(tiny_tower_dir), str(tiny_llm_dir), bridge)
    run = RunConfig(out_dir=str(tmp_path / "single"), ckpt_every=100, log_every=1, progress=False,
                    tensorboard=False, device="cpu")
    single = train(vlm, toy["data"](vlm, 4, 0, 1), OptimConfig(**toy["OPTIM"]), run)  # 2 ranks x 2 per micro-step
    losses = [h["loss"] for h in single.history]
    assert abs(losses[-1] - losses[0]) > 1e-3  # the trainable parameters moved
    torch.testing.assert_close(ranks[0]["loss"], losses, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ranks[0]["resumed"], ranks[0]["loss"][2:], rtol=1e-5, atol=1e-6)


def test_fsdp_units_are_the_layer_stacks_blocks(tiny_tower_dir, tiny_llm_dir):
    toy: dict = {"TESTS_VLM": str(ROOT / "tests" / "vlm")}
    exec(compile(COMMON, "common", "exec"), toy)
    vlm = toy["model"](str(tiny_tower_dir), str(tiny_llm_dir), "flamingo")
    names = sorted(type(u).__name__ for u in parallel.fsdp_units(vlm))
    # the decoder layers are wrapped in (and sharded as) GatedDecoderLayer, which declares itself
    assert names == ["CLIPEncoderLayer"] * 2 + ["GatedCrossAttentionBlock"] * 2 + ["GatedDecoderLayer"] * 2 + \
        ["ResamplerLayer"]
    assert {"LlamaDecoderLayer", "CLIPEncoderLayer"} <= parallel.layer_classes(vlm)
