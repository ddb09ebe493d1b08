"""Exact resume: an interrupted (exception or SIGKILL) and resumed run ends with the same parameters
as an uninterrupted one, with dropout, python/numpy/torch randomness, shuffled data and accumulation."""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from training import checkpoint as ckpt
from training.data import ResumableBatches
from training.loop import train
from vlm.config import OptimConfig, RunConfig

ROOT = Path(__file__).resolve().parents[2]

TOY = textwrap.dedent("""
    import random, time
    import numpy as np
    import torch
    from torch import nn
    from safetensors.torch import save_file
    from training.data import ResumableBatches

    class Noisy(nn.Module):
        '''Uses every RNG the loop must restore: torch (dropout), numpy and python.'''
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(5, 16), nn.LayerNorm(16), nn.GELU(), nn.Dropout(0.3), nn.Linear(16, 1))
        def forward(self, batch):
            noise = torch.from_numpy(np.random.randn(*batch["x"].shape).astype("float32")) * 0.01
            scale = 1.0 + 0.01 * random.random()
            loss = ((self.net(batch["x"] + noise) * scale - batch["y"]) ** 2).mean()
            return {"loss": loss}

    def data(delay=0.0):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(96, 5, generator=g)
        y = x.sum(1, keepdim=True).sin()
        def make(ids):
            time.sleep(delay)
            return {"x": x[ids], "y": y[ids]}
        return ResumableBatches(len(x), 8, make, seed=3)   # 12 micro-batches per epoch: crosses epochs

    def export(model, d):
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    Noisy.save_pretrained = export
""")

SCRIPT = TOY + textwrap.dedent("""
    import sys
    from training.loop import train
    from vlm.config import OptimConfig, RunConfig
    out, resume, delay = sys.argv[1], sys.argv[2] == "1", float(sys.argv[3])
    if len(sys.argv) > 4:  # SIGKILL this process while it writes the checkpoint of step argv[4]
        import os, signal
        from training import checkpoint as ckpt
        kill_dir, where = ckpt.TMP_PREFIX + ckpt.ckpt_name(int(sys.argv[4])), sys.argv[5]
        real_save_file, real_fsync = ckpt.save_file, ckpt.fsync_path
        def save_file(tensors, path, metadata=None):
            real_save_file(tensors, path, metadata=metadata)
            if where == "tensors" and kill_dir in str(path):
                os.kill(os.getpid(), signal.SIGKILL)
        def fsync_path(path):
            if where == "commit" and path.name == kill_dir and (path / ckpt.META).is_file():
                os.kill(os.getpid(), signal.SIGKILL)   # meta.json written, directory not yet renamed
            real_fsync(path)
        ckpt.save_file, ckpt.fsync_path = save_file, fsync_path
    optim = OptimConfig(lr=3e-3, warmup_steps=3, max_steps=24, grad_accum=2, weight_decay=0.01)
    run = RunConfig(out_dir=out, ckpt_every=4, keep_last=2, log_every=2, progress=False, tensorboard=False,
                    device="cpu", resume=resume)
    train(Noisy(), data(delay), optim, run)
""")


def _launch(script, out, resume, delay, *extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, str(script), str(out), "1" if resume else "0", str(delay), *extra],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigkill_and_resume_equals_uninterrupted(tmp_path):
    script = tmp_path / "toy_train.py"
    script.write_text(SCRIPT)
    ref = _launch(script, tmp_path / "ref", resume=False, delay=0.0)
    victim = _launch(script, tmp_path / "victim", resume=False, delay=0.03)
    first_ckpt = tmp_path / "victim" / "checkpoints" / "step_00000004" / "meta.json"
    deadline = time.time() + 90
    while not first_ckpt.exists():
        assert victim.poll() is None, f"victim exited early:\n{victim.stdout.read()}"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    time.sleep(random.Random().uniform(0.0, 0.4))  # somewhere after the first checkpoint, mid-run
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert not (tmp_path / "victim" / "final").exists()
    resumed = _launch(script, tmp_path / "victim", resume=True, delay=0.0)
    out_resumed = resumed.communicate(timeout=120)[0]
    out_ref = ref.communicate(timeout=120)[0]
    assert resumed.returncode == 0, out_resumed
    assert ref.returncode == 0, out_ref
    assert "resumed from" in out_resumed
    a = load_file(str(tmp_path / "ref" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "victim" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "victim" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(2, 25, 2))  # rows after the resumed checkpoint were replaced, not duplicated


@pytest.mark.parametrize("where", ["tensors", "commit"])
def test_sigkill_during_checkpoint_write_keeps_latest_and_resumes(tmp_path, where):
    """Killed while writing the step-8 checkpoint (after its tensors; after its meta.json, before the
    rename): step 4 stays the latest complete checkpoint, and resuming from it ends like an uninterrupted run."""
    script = tmp_path / "toy_train.py"
    script.write_text(SCRIPT)
    ref = _launch(script, tmp_path / "ref", False, 0.0)
    victim = _launch(script, tmp_path / "victim", False, 0.0, "8", where)
    out_victim = victim.communicate(timeout=120)[0]
    assert victim.returncode == -signal.SIGKILL, out_victim
    root = tmp_path / "victim" / "checkpoints"
    assert (root / ".tmp-step_00000008").is_dir() and not (root / "step_00000008").exists()
    assert (root / ".tmp-step_00000008" / "meta.json").is_file() == (where == "commit")
    assert [c.step for c in ckpt.list_checkpoints(root)] == [4]
    assert ckpt.load_checkpoint(root / "step_00000004")["meta"]["step"] == 4
    resumed = _launch(script, tmp_path / "victim", True, 0.0)
    out_resumed, out_ref = resumed.communicate(timeout=120)[0], ref.communicate(timeout=120)[0]
    assert resumed.returncode == 0 and ref.returncode == 0, out_resumed + out_ref
    assert "resumed from" in out_resumed and "step 4" in out_resumed
    assert not list(root.glob(".tmp-*"))  # the stale half-written directory was cleared
    a = load_file(str(tmp_path / "ref" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "victim" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Interrupt(Exception):
    pass


def _toy():
    namespace: dict = {}
    exec(compile(TOY, "toy", "exec"), namespace)
    return namespace


def test_exception_and_resume_in_process_equals_uninterrupted(tmp_path):
    toy = _toy()
    optim = OptimConfig(lr=3e-3, warmup_steps=3, max_steps=14, grad_accum=3, weight_decay=0.01)

    def run(name, resume=False):
        return RunConfig(out_dir=str(tmp_path / name), ckpt_every=5, log_every=1, progress=False,
                         tensorboard=False, device="cpu", resume=resume, seed=7)

    ref_model = toy["Noisy"]()
    train(ref_model, toy["data"](), optim, run("ref"))

    def failing(start):
        for i, b in enumerate(toy["data"]()(start)):
            if start + i == 31:  # mid-step 11, after the step-10 checkpoint
                raise Interrupt
            yield b

    with pytest.raises(Interrupt):
        train(toy["Noisy"](), failing, optim, run("cut"))
    torch.manual_seed(123), np.random.seed(5), random.seed(5)  # the resumed run must not depend on these
    model = toy["Noisy"]()
    res = train(model, toy["data"](), optim, run("cut", resume=True))
    assert res.step == 14
    for (n, a), (_, b) in zip(ref_model.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), n


def test_resumable_batches_positions_and_sharding():
    seen = []
    rb = ResumableBatches(10, 3, lambda ids: seen.append(ids) or {"ids": torch.tensor(ids)}, seed=1)
    assert rb.batches_per_epoch == 3
    stream = [b["ids"].tolist() for _, b in zip(range(9), rb(0))]
    assert [b["ids"].tolist() for _, b in zip(range(4), rb(5))] == stream[5:9]
    assert len(set(sum(stream[:3], []))) == 9  # 9 of 10 items per epoch, none repeated
    assert stream[:3] != stream[3:6]  # reshuffled each epoch
    assert [b["ids"].tolist() for _, b in zip(range(9), rb(0))] == stream  # deterministic
    r0 = ResumableBatches(10, 2, lambda ids: ids, seed=1, rank=0, world_size=2)
    r1 = ResumableBatches(10, 2, lambda ids: ids, seed=1, rank=1, world_size=2)
    assert not set(r0.epoch_indices(0)) & set(r1.epoch_indices(0))
    assert len(r0.epoch_indices(0)) == len(r1.epoch_indices(0)) == 4
    assert list(ResumableBatches(4, 2, lambda ids: ids, shuffle=False, max_epochs=2)(1)) == [[2, 3], [0, 1], [2, 3]]
    with pytest.raises(ValueError, match="cannot fill"):
        ResumableBatches(3, 4, lambda ids: ids)
    with pytest.raises(ValueError, match="rank"):
        ResumableBatches(10, 2, lambda ids: ids, rank=2, world_size=2)


# ------------------------------------------------------------------------------------------------
# The recipes themselves: stage one and stage two SIGKILLed at a random micro-batch, then resumed
# ------------------------------------------------------------------------------------------------

STAGE_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    tests = Path(sys.argv[1])
    sys.path[:0] = [str(tests / "training"), str(tests / "vlm")]
    import torch
    torch.set_num_threads(1)
    stage, assets, out, resume, kill_at = sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[5] == "1", int(sys.argv[6])
    if stage == "stage1":
        from test_stage1 import tiny_cfg
        from training import stage1 as recipe
        cfg = tiny_cfg(str(assets / "{00000..00001}.tar"), out, "sparc", steps=8, grad_accum=2)
        owner, name = recipe, "stage1_collate"          # called once per micro-batch produced
    else:
        from test_stage2 import tiny_cfg
        from training import stage2 as recipe
        cfg = tiny_cfg({"tower": assets / "tower", "llm": assets / "llm", "json": assets / "data" / "train.json"},
                       out, "flamingo", max_steps=8)
        cfg.optim.grad_accum, cfg.optim.batch_size, cfg.run.ckpt_every = 2, 3, 3
        cfg.model.coordinate_tokens = True              # trained token rows resume too
        owner, name = recipe.LlavaExamples, "make_batch"
    cfg.run.resume = resume
    if kill_at >= 0:
        original, calls = getattr(owner, name), [0]
        def hooked(self, *args, **kwargs):
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)   # no cleanup, no finally blocks
            calls[0] += 1
            return original(self, *args, **kwargs)
        setattr(owner, name, hooked)
    recipe.run(cfg)
""")


@pytest.fixture(scope="module")
def stage_assets(tmp_path_factory):
    sys.path[:0] = [str(ROOT / "tests" / "training"), str(ROOT / "tests" / "vlm")]
    from test_stage1 import write_shards
    from test_stage2 import write_dataset
    from tiny_vlm import save_tiny_llm, save_tiny_tower
    root = tmp_path_factory.mktemp("stage_assets")
    write_shards(root / "shards")
    save_tiny_llm(root / "stage2" / "llm", initializer_range=0.3)
    save_tiny_tower(root / "stage2" / "tower")
    write_dataset(root / "stage2" / "data")
    script = root / "stage_drill.py"
    script.write_text(STAGE_SCRIPT)
    return {"stage1": root / "shards", "stage2": root / "stage2", "script": script}


def _final_tensors(final: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(final.rglob("*.safetensors")):
        out.update({f"{f.relative_to(final)}:{k}": v for k, v in load_file(str(f)).items()})
    return out


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_sigkill_recipe_at_random_step_and_resume_equals_uninterrupted(stage_assets, tmp_path, stage):
    """8 steps, 2 micro-batches each, checkpoints every 3 steps; killed at a random micro-batch after the first."""
    kill_at = random.Random().randrange(6, 16)

    def launch(out, resume, kill):
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        cmd = [sys.executable, str(stage_assets["script"]), str(ROOT / "tests"), stage, str(stage_assets[stage]),
               str(out), "1" if resume else "0", str(kill)]
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    ref, victim = launch(tmp_path / "ref", False, -1), launch(tmp_path / "cut", False, kill_at)
    out_victim = victim.communicate(timeout=300)[0]
    assert victim.returncode == -signal.SIGKILL, f"kill_at={kill_at}\n{out_victim}"
    assert not (tmp_path / "cut" / "final").exists()
    assert (tmp_path / "cut" / "checkpoints" / "step_00000003" / "meta.json").is_file(), kill_at
    resumed = launch(tmp_path / "cut", True, -1)
    out_resumed, out_ref = resumed.communicate(timeout=300)[0], ref.communicate(timeout=300)[0]
    assert ref.returncode == 0, out_ref
    assert resumed.returncode == 0, f"kill_at={kill_at}\n{out_resumed}"
    assert "resumed from" in out_resumed
    a, b = _final_tensors(tmp_path / "ref" / "final"), _final_tensors(tmp_path / "cut" / "final")
    assert a and a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs (killed at micro-batch {kill_at})"
