"""FSDP2 per layer on 2 CPU processes (gloo). Stage two under torchrun through the training loop, on
the tiny VLM with LoRA, both bridges: each rank holds about half the parameter bytes, the logged
loss equals one process's on the full batch, and a run resumed from a sharded
(torch.distributed.checkpoint) checkpoint repeats the losses. Stage one (CLIP, SPARC, float64):
the sharded dual encoder's gradients, with and without cached accumulation, equal one process's
on the whole batch."""
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


# ------------------------------------------------------------------------------------------------
# Stage one: the dual encoder sharded per tower block, gradients equal to one process's
# ------------------------------------------------------------------------------------------------


def stage1_worker(rank: int, init_file: str, out_dir: str, tokenizer_dir: str) -> None:
    import torch.distributed as dist

    from test_accum_freq import WORLD, B, build, make_batch, rank_batch
    from training.loop import cached_forward_backward, forward_backward
    from vlm.data.tokenizer import load_tokenizer
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(tokenizer_dir)  # loaded here: a Rust tokenizer object is not pickled across spawn
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for name in ("clip", "sparc"):
            model = build(name, tokenizer)
            results[f"{name}/units"] = torch.tensor(len(parallel.fsdp_units(model)))
            parallel.shard(model, torch.device("cpu"), WORLD)
            batch = rank_batch(make_batch(name, tokenizer, WORLD * B), rank, name)
            for accum in (1, 2):
                model.zero_grad(set_to_none=True)
                out = (forward_backward(model, batch, sync=True) if accum == 1 else
                       cached_forward_backward(model, batch, accum, sync=True))
                parallel.reduce_replicated_grads(model)
                results[f"{name}/{accum}/loss"] = out["loss"].detach().clone()
                for pname, p in model.named_parameters():
                    grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                    results[f"{name}/{accum}/{pname}"] = grad.detach().clone()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_stage1_fsdp_two_ranks_equal_the_whole_batch(tmp_path):
    import torch.multiprocessing as mp

    from test_accum_freq import WORLD, B, assert_same, build, grads_after, make_batch, make_tokenizer
    from training.loop import forward_backward
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    mp.spawn(stage1_worker, args=(str(tmp_path / "init"), str(tmp_path), str(tmp_path / "tokenizer")), nprocs=WORLD,
             join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for name in ("clip", "sparc"):
        assert int(ranks[0][f"{name}/units"]) == 2  # one vision and one text encoder layer
        model = build(name, tokenizer)
        want = grads_after(model, lambda: forward_backward(model, make_batch(name, tokenizer, WORLD * B), True))
        for accum in (1, 2):
            got = {k.split("/", 2)[2]: v for k, v in ranks[0].items() if k.startswith(f"{name}/{accum}/")}
            got["loss"] = torch.stack([res[f"{name}/{accum}/loss"] for res in ranks]).mean()
            assert_same(got, want, f"{name} under FSDP, accum_freq={accum}")
