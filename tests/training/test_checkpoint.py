"""Checkpoint contents, atomicity under crashes (exception and SIGKILL mid-write), discovery and pruning."""
import inspect
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
from torch import nn

from training import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[2]


def write_checkpoint(root, step, model_tensors, optim_state, meta):
    """A complete checkpoint, written the way the training loop writes one in a single process:
    rank files, rank-0 files, then the commit. (Its source is also pasted into KILL_SCRIPT.)"""
    tmp = ckpt.tmp_dir_for(root, step)
    ckpt.write_rank_files(tmp, 0, ckpt.rng_state())
    ckpt.write_main_files(tmp, model_tensors, optim_state)
    return ckpt.commit(tmp, {**meta, "step": step})


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.frozen = nn.Linear(3, 3).requires_grad_(False)
        self.body = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        self.head = nn.Linear(4, 2)
        self.head_tied = self.head  # shared module: must not trip safetensors
        self.register_buffer("not_trained_buffer", torch.ones(2))


def test_trainable_state_dict_keeps_trainable_params_and_their_buffers():
    net = Net()
    names = set(ckpt.trainable_state_dict(net))
    assert names == {"body.0.weight", "body.0.bias", "body.1.weight", "body.1.bias", "body.1.running_mean",
                     "body.1.running_var", "body.1.num_batches_tracked", "head.weight", "head.bias"}
    assert names == set(ckpt.trainable_state_dict_names(net))


def test_save_load_roundtrip_and_mismatch_errors(tmp_path):
    net = Net()
    with torch.no_grad():
        net.body[1].running_mean.fill_(3.0)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=0.1)
    net.head(torch.randn(2, 4)).sum().backward()
    opt.step()
    path = write_checkpoint(tmp_path, 7, ckpt.trainable_state_dict(net), {"optimizer": opt.state_dict()},
                            {"loss": 1.5})
    assert path == tmp_path / "step_00000007" and not list(tmp_path.glob(".tmp-*"))
    state = ckpt.load_checkpoint(path)
    assert state["meta"] == {"loss": 1.5, "step": 7}
    fresh = Net()
    ckpt.load_trainable_state_dict(fresh, state["model"])
    for (n, a), (_, b) in zip(net.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), n
    opt2 = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=0.1)
    opt2.load_state_dict(state["optim"]["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][4]["exp_avg"], opt.state_dict()["state"][4]["exp_avg"])

    class Other(Net):
        def __init__(self):
            super().__init__()
            self.extra = nn.Linear(2, 2)

    with pytest.raises(ckpt.CheckpointError, match="missing.*extra.weight"):
        ckpt.load_trainable_state_dict(Other(), state["model"])
    bad = dict(state["model"], **{"head.weight": torch.zeros(5, 5)})
    with pytest.raises(ckpt.CheckpointError, match="shape"):
        ckpt.load_trainable_state_dict(Net(), bad)


def test_rng_state_roundtrip(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    np.random.randn()  # leave a cached gaussian in numpy's state
    state = ckpt.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    want = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert want[0] == got[0] and want[1] == got[1] and torch.equal(want[2], got[2])


def _save(root, step, value):
    return write_checkpoint(root, step, {"w": torch.full((2,), float(value))}, {"x": torch.tensor(step)},
                            {"loss": float(value)})


def test_exception_mid_write_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    _save(tmp_path, 1, 1.0)

    def crash(*a, **kw):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(OSError, match="simulated"):
        _save(tmp_path, 2, 2.0)
    assert (tmp_path / ".tmp-step_00000002").is_dir() and not (tmp_path / "step_00000002").exists()
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.step == 1
    assert torch.equal(ckpt.load_checkpoint(latest.path)["model"]["w"], torch.ones(2))
    # A final-named dir without meta.json (e.g. copied by hand) is not complete either.
    (tmp_path / "step_00000003").mkdir()
    assert ckpt.latest_checkpoint(tmp_path).step == 1
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
        ckpt.load_checkpoint(tmp_path / "step_00000003")
    assert ckpt.remove_stale_tmp(tmp_path) == [tmp_path / ".tmp-step_00000002"]


KILL_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    from pathlib import Path
    from training import checkpoint as ckpt
    root = Path(sys.argv[1])
""") + inspect.getsource(write_checkpoint) + textwrap.dedent("""
    write_checkpoint(root, 1, {"w": torch.ones(1000)}, {"x": torch.tensor(1)}, {"loss": 1.0})
    real_save_file = ckpt.save_file
    def slow_save_file(tensors, path, metadata=None):
        real_save_file(tensors, path, metadata=metadata)   # the file is there, the checkpoint is not complete
        Path(str(path) + ".written").touch()
        time.sleep(60)
    ckpt.save_file = slow_save_file
    write_checkpoint(root, 2, {"w": torch.zeros(1000)}, {"x": torch.tensor(2)}, {"loss": 2.0})
""")


def test_sigkill_mid_write_leaves_previous_checkpoint_loadable(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(KILL_SCRIPT)
    root = tmp_path / "ckpts"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(script), str(root)], env=env, cwd=ROOT)
    marker = root / ".tmp-step_00000002" / "model.safetensors.written"
    deadline = time.time() + 60
    while not marker.exists():
        assert proc.poll() is None, "writer exited early"
        assert time.time() < deadline, "writer never reached the second checkpoint"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert [c.step for c in ckpt.list_checkpoints(root)] == [1]
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(root).path)
    assert torch.equal(state["model"]["w"], torch.ones(1000)) and state["meta"]["step"] == 1


def test_prune_keeps_newest(tmp_path):
    for s in (3, 1, 10, 5):
        _save(tmp_path, s, s)
    removed = ckpt.prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == ["step_00000001", "step_00000003"]
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [5, 10]
    with pytest.raises(ValueError):
        ckpt.prune_checkpoints(tmp_path, keep_last=0)
    assert ckpt.latest_checkpoint(tmp_path / "nothing_here") is None
