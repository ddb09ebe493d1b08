"""Helpers of the fault drill: run the CLI in process and read its one-line error, stop a trainer
after N optimiser steps as a kill would, and a process id that is surely gone."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests" / "training"), str(ROOT / "tests" / "vlm")]


class Killed(BaseException):
    """Raised by ``stop_after`` where a SIGKILL would have hit (a BaseException: nothing catches it)."""


@pytest.fixture
def run_cli(capsys):
    """``run_cli(*argv) -> (exit status, stderr)`` through ``vlm.cli.main``."""
    from vlm.cli import main

    def call(*argv: str) -> tuple[int, str]:
        capsys.readouterr()
        rc = main([str(a) for a in argv])
        return rc, capsys.readouterr().err
    return call


def assert_clean_error(rc: int, err: str, *names: str) -> None:
    """Exit status 2, one line on stderr starting ``vlm:``, naming each of ``names``, no traceback."""
    lines = [ln for ln in err.splitlines() if ln.startswith("vlm:")]
    assert rc == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])


@pytest.fixture
def stop_after(monkeypatch):
    """``stop_after(n)``: the next ``training.loop.train`` dies (``Killed``) when it starts step n + 1,
    with its checkpoints up to n on disk, and leaves a lock of a dead process behind as a SIGKILL
    would; the hook is then removed, so the resumed run is untouched."""
    from training import loop
    from training.runlock import LOCK_FILE

    real_step = loop._step

    def arm(n: int) -> None:
        def step(r):
            if r.step == n:
                monkeypatch.setattr(loop, "_step", real_step)
                (r.out_dir / LOCK_FILE).write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))
                raise Killed
            return real_step(r)
        monkeypatch.setattr(loop, "_step", step)
    return arm


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid
