"""Fault drill, files: damaged checkpoints, torn logs, truncated summaries, run-dir locks, a full
disk, a foreign world dir. Each fault has one outcome: a clean error naming its cause, or a resume
that ends with the same parameters as an uninterrupted run; nothing the project did not write is lost."""
from __future__ import annotations

import errno
import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import Killed, assert_clean_error, dead_pid
from test_resume import _toy
from training import checkpoint as ckpt
from training.loop import NonFiniteLossError, train
from training.runlock import LOCK_FILE, RunDirBusyError, RunLock
from vlm.config import OptimConfig, RunConfig
from vlm.files import DiskFullError, VlmError, atomic_write_text, read_jsonl_rows

TOY = _toy()
OPTIM = OptimConfig(lr=3e-3, warmup_steps=2, max_steps=6, grad_accum=2, weight_decay=0.01)


def _run(out: Path, resume: bool = False) -> RunConfig:
    return RunConfig(out_dir=str(out), ckpt_every=2, keep_last=3, log_every=1, progress=False, tensorboard=False,
                     device="cpu", resume=resume, seed=5)


def _final(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    train(TOY["Noisy"](), TOY["data"](), OPTIM, _run(out))
    return out


def _cut(out: Path, stop_after, at: int = 4) -> Path:
    stop_after(at)
    with pytest.raises(Killed):
        train(TOY["Noisy"](), TOY["data"](), OPTIM, _run(out))
    return out / "checkpoints" / ckpt.ckpt_name(at)


def _resume_equals(reference: Path, out: Path) -> None:
    train(TOY["Noisy"](), TOY["data"](), OPTIM, _run(out, resume=True))
    a, b = _final(reference), _final(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (out / LOCK_FILE).exists()


class Evil:
    """Unpickling this would run a shell command."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/vlm-pwned",))


DAMAGE = {  # how the newest checkpoint is damaged -> resume falls back to the one before it
    "model-truncated": lambda d: _truncate(d / ckpt.MODEL_FILE),
    "model-empty": lambda d: (d / ckpt.MODEL_FILE).write_bytes(b""),
    "model-garbage": lambda d: (d / ckpt.MODEL_FILE).write_bytes(os.urandom(256)),
    "model-missing": lambda d: (d / ckpt.MODEL_FILE).unlink(),
    "optim-truncated": lambda d: _truncate(d / ckpt.OPTIM_FILE),
    "optim-hostile-pickle": lambda d: (d / ckpt.OPTIM_FILE).write_bytes(pickle.dumps(Evil())),
    "optim-missing": lambda d: (d / ckpt.OPTIM_FILE).unlink(),
    "rng-truncated": lambda d: _truncate(d / "rng_rank0.pt"),
    "rng-hostile-pickle": lambda d: (d / "rng_rank0.pt").write_bytes(pickle.dumps(Evil())),
    "meta-truncated": lambda d: _truncate(d / ckpt.META),
    "meta-not-an-object": lambda d: (d / ckpt.META).write_text("[4]"),
    "meta-empty": lambda d: (d / ckpt.META).write_text(""),
}


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_and_resumes_exactly(reference, tmp_path, stop_after, capsys, damage):
    newest = _cut(tmp_path / "run", stop_after)
    DAMAGE[damage](newest)
    capsys.readouterr()
    _resume_equals(reference, tmp_path / "run")
    err = capsys.readouterr().err
    assert "resumed from" in err and "step_00000002" in err
    assert "warning" in err and str(newest) in err  # the damaged file (or its dir) is named
    assert not Path("/tmp/vlm-pwned").exists()


def test_every_checkpoint_damaged_is_a_clean_error_naming_a_file(tmp_path, stop_after):
    _cut(tmp_path / "run", stop_after)
    for d in (tmp_path / "run" / "checkpoints").iterdir():
        _truncate(d / ckpt.MODEL_FILE)
    with pytest.raises(ckpt.DamagedCheckpointError, match=r"model\.safetensors"):
        train(TOY["Noisy"](), TOY["data"](), OPTIM, _run(tmp_path / "run", resume=True))


def test_half_written_checkpoint_dir_is_dropped_and_run_resumes(reference, tmp_path, stop_after):
    newest = _cut(tmp_path / "run", stop_after)
    tmp = newest.parent / (ckpt.TMP_PREFIX + ckpt.ckpt_name(6))
    tmp.mkdir()
    (tmp / ckpt.MODEL_FILE).write_bytes(b"half")
    _resume_equals(reference, tmp_path / "run")
    assert not tmp.exists()


@pytest.mark.parametrize("torn", ['{"step": 9, "lo', '[1, 2', '{"step": 9, "loss": NaN, "x": ', "\x00\x00"])
def test_torn_last_metrics_line_is_dropped_on_resume(reference, tmp_path, stop_after, capsys, torn):
    _cut(tmp_path / "run", stop_after)
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write(torn)
    _resume_equals(reference, tmp_path / "run")
    assert [r["step"] for r in read_jsonl_rows(metrics)] == list(range(1, 7))
    assert "half-written last line" in capsys.readouterr().err


def test_damaged_middle_metrics_line_names_the_line(tmp_path, stop_after):
    _cut(tmp_path / "run", stop_after)
    metrics = tmp_path / "run" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[2] = lines[2][:5]
    metrics.write_text("\n".join(lines) + "\n")
    with pytest.raises(VlmError, match=rf"{metrics}:3"):
        train(TOY["Noisy"](), TOY["data"](), OPTIM, _run(tmp_path / "run", resume=True))


# ------------------------------------------------------------------------------------------------
# The run lock
# ------------------------------------------------------------------------------------------------


def _lock(out: Path, pid: int, host: str | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname()}))


def test_live_owner_blocks_a_second_run_and_loses_nothing(tmp_path, stop_after):
    _cut(tmp_path / "run", stop_after)
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        _lock(tmp_path / "run", owner.pid)
        with pytest.raises(RunDirBusyError, match=rf"pid {owner.pid}"):
            train(TOY["Noisy"](), TOY["data"](), OPTIM, _run(tmp_path / "run", resume=True))
    finally:
        owner.kill()
        owner.wait()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before
    assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == owner.pid  # not taken


def test_lock_of_another_host_blocks(tmp_path):
    _lock(tmp_path / "run", 1, host="elsewhere.invalid")
    with pytest.raises(RunDirBusyError, match="elsewhere.invalid"):
        RunLock(tmp_path / "run").acquire()


@pytest.mark.parametrize("content", ["dead", "garbage", "empty"])
def test_stale_lock_is_taken_over_with_a_warning(tmp_path, capsys, content):
    out = tmp_path / "run"
    out.mkdir()
    text = {"dead": json.dumps({"pid": dead_pid(), "host": socket.gethostname()}), "garbage": "{pid", "empty": ""}
    (out / LOCK_FILE).write_text(text[content])
    train(TOY["Noisy"](), TOY["data"](), OptimConfig(max_steps=2, warmup_steps=1), _run(out))
    assert "taking over the stale lock" in capsys.readouterr().err
    assert not (out / LOCK_FILE).exists()


def test_lock_names_its_owner_while_training(tmp_path, monkeypatch):
    seen = []
    from training import loop
    real = loop._step
    monkeypatch.setattr(loop, "_step", lambda r: seen.append(json.loads((r.out_dir / LOCK_FILE).read_text())) or real(r))
    train(TOY["Noisy"](), TOY["data"](), OptimConfig(max_steps=1, warmup_steps=1), _run(tmp_path / "run"))
    assert seen[0]["pid"] == os.getpid() and seen[0]["host"] == socket.gethostname()


# ------------------------------------------------------------------------------------------------
# A full disk
# ------------------------------------------------------------------------------------------------


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_while_writing_a_checkpoint_names_the_file_and_keeps_the_previous(tmp_path, monkeypatch):
    train(TOY["Noisy"](), TOY["data"](), OptimConfig(max_steps=2, warmup_steps=1), _run(tmp_path / "run"))
    monkeypatch.setattr(ckpt, "save_file", _enospc)
    with pytest.raises(DiskFullError, match=r"disk full while writing .*model\.safetensors"):
        train(TOY["Noisy"](), TOY["data"](), OptimConfig(max_steps=4, warmup_steps=1), _run(tmp_path / "run", True))
    assert ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints").step == 2


def test_torch_stream_writer_failure_is_a_full_disk(tmp_path, monkeypatch):
    def failing(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing "
                           "file data/0: file write failed")
    monkeypatch.setattr(ckpt.torch, "save", failing)
    with pytest.raises(DiskFullError, match=r"rng_rank0\.pt"):
        train(TOY["Noisy"](), TOY["data"](), OptimConfig(max_steps=2, warmup_steps=1), _run(tmp_path / "run"))


@pytest.mark.parametrize("what", ["config.yaml", "metrics.jsonl"])
def test_full_disk_on_small_files_names_them(tmp_path, monkeypatch, what):
    out = tmp_path / "run"
    if what == "metrics.jsonl":  # the trim on resume rewrites it
        train(TOY["Noisy"](), TOY["data"](), OptimConfig(max_steps=2, warmup_steps=1), _run(out))
    real = Path.write_bytes
    monkeypatch.setattr(Path, "write_bytes", lambda self, data: _enospc() if Path(what).stem in self.name else real(self, data))
    optim = OptimConfig(max_steps=4, warmup_steps=1)
    with pytest.raises(DiskFullError, match=what.replace(".", r"\.")):
        train(TOY["Noisy"](), TOY["data"](), optim, _run(out, resume=True), config=optim)  # config -> config.yaml


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    atomic_write_text(path, '{"old": 1}\n')
    monkeypatch.setattr(Path, "write_bytes", _enospc)
    with pytest.raises(DiskFullError, match="summary.json"):
        atomic_write_text(path, '{"new": 2}\n')
    assert path.read_text() == '{"old": 1}\n' and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_cli_maps_a_raw_enospc_to_one_line(run_cli, tmp_path, monkeypatch):
    import vlm.cli.world as world_cli
    monkeypatch.setattr(world_cli, "export_world",
                        lambda out, *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space", str(out))))
    rc, err = run_cli("world", "--out", tmp_path / "w", "--n", "4", "--n-eval", "2")
    assert_clean_error(rc, err, "disk full", tmp_path / "w")


# ------------------------------------------------------------------------------------------------
# NaN
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("clipping", [True, False])
def test_nan_hint_matches_the_clipping_setting(clipping):
    msg = str(NonFiniteLossError(3, {"loss": float("nan")}, clipping=clipping))
    assert ("enable optim.grad_clip" in msg) is not clipping
    assert isinstance(NonFiniteLossError(3, {}), VlmError)
