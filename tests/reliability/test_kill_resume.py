"""Kill and resume, every stage: a run stopped after N optimiser steps (its checkpoints on disk, a
dead owner's lock left behind, as a SIGKILL leaves them) and resumed ends with the same final
tensors as an uninterrupted run; each eval task killed mid-way and run again writes the same
summary and predictions. (SIGKILL itself, mid-step and mid-checkpoint-write, is drilled by
tests/training/test_resume.py and test_checkpoint.py.)"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, Killed

sys.path.insert(0, str(ROOT / "tests" / "eval"))


def _tensors(final: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(final.rglob("*.safetensors")):
        out.update({f"{f.relative_to(final)}:{k}": v for k, v in load_file(str(f)).items()})
    return out


def _same_final(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta and ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def _kill_and_resume(run, make_cfg, tmp_path: Path, stop_after, at: int) -> None:
    """``run(make_cfg(out, resume))`` uninterrupted into ``ref``, killed after ``at`` steps then
    resumed into ``cut``; the two ``final/`` dirs must hold equal tensors."""
    ref = run(make_cfg(tmp_path / "ref", False))
    stop_after(at)
    with pytest.raises(Killed):
        run(make_cfg(tmp_path / "cut", False))
    assert not (tmp_path / "cut" / "final").exists()
    resumed = run(make_cfg(tmp_path / "cut", True))
    _same_final(ref, resumed)
    assert not (tmp_path / "cut" / ".lock").exists()


# ------------------------------------------------------------------------------------------------
# Training stages
# ------------------------------------------------------------------------------------------------


def test_lm(tmp_path, stop_after):
    """Issue 19's first defect: the LLM's tied lm_head / embed_tokens broke every LM resume."""
    from test_lm import tiny_cfg
    from training import lm
    text = tmp_path / "extra.txt"
    text.write_text("zebra quokka axolotl\n")

    def make(out, resume):
        cfg = tiny_cfg(tmp_path, text)
        cfg.optim.max_steps, cfg.run.ckpt_every, cfg.run.out_dir, cfg.run.resume = 4, 2, str(out), resume
        cfg.world.n_train = 12
        return cfg
    _kill_and_resume(lm.run, make, tmp_path, stop_after, at=3)


def test_tower(tmp_path, stop_after):
    from training import tower
    from vlm.config import TowerPretrainConfig, load_config
    from vlm.world.export import ensure_world
    world = ["world.n_train=16", "world.n_eval=2", "world.image_size=32"]

    def make(out, resume):
        return load_config(TowerPretrainConfig, "configs/tower/resnet_world.yaml", [
            *world, f"data.world_dir={tmp_path / 'world'}", "model.image_size=32", "model.stage_widths=[8,16]",
            "model.stage_depths=[1,1]", "optim.batch_size=4", "optim.max_steps=4", "optim.warmup_steps=1",
            f"run.out_dir={out}", f"run.resume={resume}", "run.ckpt_every=2", "run.log_every=1",
            "run.progress=false", "run.tensorboard=false", "run.device=cpu"])
    ensure_world(tmp_path / "world", make(tmp_path / "x", False).world)
    _kill_and_resume(tower.run, make, tmp_path, stop_after, at=3)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from test_stage1 import write_shards
    return write_shards(tmp_path_factory.mktemp("shards"))


@pytest.mark.parametrize("objective", ["clip", "siglip", "sparc", "flair"])
def test_stage1(shards, tmp_path, stop_after, objective):
    from test_stage1 import tiny_cfg
    from training import stage1

    def make(out, resume):
        cfg = tiny_cfg(shards, out, objective, steps=4)
        cfg.run.ckpt_every, cfg.run.resume = 2, resume
        return cfg
    _kill_and_resume(stage1.run, make, tmp_path, stop_after, at=3)


def test_maskembed(tmp_path_factory, tmp_path, stop_after):
    from test_maskembed_run import setup as setup_fixture
    from test_maskembed_run import tiny_cfg
    from training import maskembed
    assets = setup_fixture.__wrapped__(tmp_path_factory)

    def make(out, resume):
        cfg = tiny_cfg(assets, out, steps=5)
        cfg.run.ckpt_every, cfg.run.resume = 2, resume
        return cfg
    _kill_and_resume(maskembed.run, make, tmp_path, stop_after, at=3)


@pytest.fixture(scope="module")
def stage2_assets(tmp_path_factory) -> dict:
    from test_stage2 import write_dataset
    from tiny_vlm import save_tiny_llm, save_tiny_tower
    root = tmp_path_factory.mktemp("stage2")
    return {"llm": save_tiny_llm(root / "llm", initializer_range=0.3), "tower": save_tiny_tower(root / "tower"),
            "json": write_dataset(root / "data")}


@pytest.mark.parametrize("bridge", ["projector", "flamingo"])
def test_stage2(stage2_assets, tmp_path, stop_after, bridge):
    from test_stage2 import tiny_cfg
    from training import stage2

    def make(out, resume):
        cfg = tiny_cfg(stage2_assets, out, bridge, max_steps=4)
        cfg.run.ckpt_every, cfg.run.resume = 2, resume
        return cfg
    _kill_and_resume(stage2.run, make, tmp_path, stop_after, at=3)


# ------------------------------------------------------------------------------------------------
# Eval tasks
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from vlm.config import WorldConfig
    from vlm.world.export import export_world
    out = tmp_path_factory.mktemp("world")
    export_world(out, WorldConfig(n_train=8, n_eval=6, image_size=32), progress=False)
    return out


def _dying(model, after: int):
    """``model`` whose generate / score raise ``Killed`` from their ``after``-th call on."""
    calls = [0]
    for name in ("generate", "score"):
        real = getattr(model, name)

        def hooked(*a, _real=real, **k):
            calls[0] += 1
            if calls[0] > after:
                raise Killed
            return _real(*a, **k)
        setattr(model, name, hooked)
    return model


def _outputs(out: Path) -> dict[str, str]:
    files = {}
    for f in sorted(out.rglob("*")):
        if f.is_file() and f.suffix in (".json", ".jsonl"):
            data = json.loads(f.read_text()) if f.suffix == ".json" else f.read_text()
            if isinstance(data, dict):
                data.pop("wall_s", None)
            files[str(f.relative_to(out))] = json.dumps(data, sort_keys=True)
    return files


@pytest.mark.parametrize("task", ["chair", "pope", "refcoco", "vsr"])
def test_eval_task(world, tmp_path, task):
    """CHAIR runs after captioning (it reuses its captions): killed in the captioning task."""
    from test_harness import OracleVLM
    from eval.harness import run_vlm_eval
    tasks = ["caption", task] if task == "chair" else [task]
    run_vlm_eval(OracleVLM(world), tasks, tmp_path / "ref", world_dir=world, batch_size=2, progress=False)
    with pytest.raises(Killed):
        run_vlm_eval(_dying(OracleVLM(world), 2), tasks, tmp_path / "cut", world_dir=world, batch_size=2,
                     progress=False)
    run_vlm_eval(OracleVLM(world), tasks, tmp_path / "cut", world_dir=world, batch_size=2, progress=False)
    assert _outputs(tmp_path / "ref") == _outputs(tmp_path / "cut")


# ------------------------------------------------------------------------------------------------
# The demo: its pipeline resumes a killed stage, reuses finished ones and recomputes a cut summary
# ------------------------------------------------------------------------------------------------


def test_demo_pipeline_resumes_a_killed_stage_and_reuses_finished_ones(tmp_path, stop_after, capsys):
    from test_lm import tiny_cfg
    from training import lm
    from vlm.cli.pipeline import Stage, Timings, run_stage
    text = tmp_path / "extra.txt"
    text.write_text("zebra quokka axolotl\n")

    def stage(out):
        cfg = tiny_cfg(tmp_path, text)
        cfg.optim.max_steps, cfg.run.ckpt_every, cfg.run.out_dir, cfg.world.n_train = 4, 2, str(out), 12
        return Stage(name="lm", recipe="lm", cfg=cfg, out_dir=out)
    timings = Timings(tmp_path / "timings.json")
    ref = lm.run(stage(tmp_path / "ref").cfg)
    stop_after(3)
    with pytest.raises(Killed):
        run_stage(stage(tmp_path / "demo" / "lm"), timings)
    final = run_stage(stage(tmp_path / "demo" / "lm"), timings)  # the demo run again: resumes
    assert "lm: resuming" in capsys.readouterr().out
    _same_final(ref, final)
    run_stage(stage(tmp_path / "demo" / "lm"), timings)
    assert "lm: reusing" in capsys.readouterr().out


def test_demo_lock_stops_a_second_demo(tmp_path):
    import os
    import socket
    from training.runlock import RunDirBusyError
    from vlm.cli.demo import run_demo
    (tmp_path / "demo").mkdir()
    owner = __import__("subprocess").Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / "demo" / ".lock").write_text(json.dumps({"pid": owner.pid, "host": socket.gethostname()}))
        with pytest.raises(RunDirBusyError, match=str(tmp_path / "demo")):
            run_demo(tmp_path / "demo")
    finally:
        owner.kill()
        owner.wait()
    assert os.listdir(tmp_path / "demo") == [".lock"]
