"""One owner per run directory: ``out_dir/.lock`` names the process that writes there.

``RunLock(out_dir).acquire()`` creates the lock file (``{"pid", "host", "time"}``) exclusively. When
one exists and its owner is alive (same host, the pid answers) it raises ``RunDirBusyError``, so a
second run never interleaves its checkpoints and logs with the first; when its owner is gone (a
killed run) the lock is taken over with a warning. ``release()`` removes the file if it is still ours.
A lock written by another host cannot be checked from here and counts as alive.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

from vlm.files import VlmError, atomic_write_text

LOCK_FILE = ".lock"


class RunDirBusyError(VlmError):
    """Another live process holds the run directory's lock."""


def pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """The lock of ``out_dir`` (see the module docstring)."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / LOCK_FILE
        self.held = False

    def _owner(self) -> Optional[dict]:
        """The current lock's contents; None when it is unreadable (half-written: treated as stale)."""
        try:
            owner = json.loads(self.path.read_text())
            return owner if isinstance(owner, dict) else None
        except (OSError, ValueError):
            return None

    def _mine(self) -> str:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()})

    def acquire(self) -> "RunLock":
        """Take the lock (module docstring); returns self."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            self._take_over()
        else:
            with os.fdopen(fd, "w") as f:
                f.write(self._mine())
        self.held = True
        return self

    def _take_over(self) -> None:
        """The lock exists: fail if its owner is a live other process, else replace it."""
        owner = self._owner() or {}
        pid, host = int(owner.get("pid", -1) or -1), owner.get("host")
        if pid == os.getpid() and host == socket.gethostname():
            return  # this process already holds it (an earlier in-process run that did not release)
        if host not in (None, socket.gethostname()) or pid_alive(pid):
            raise RunDirBusyError(f"{self.path.parent} is in use by pid {pid} on {host} (lock {self.path}); "
                                  "wait for that run, or pick another run.out_dir")
        print(f"warning: taking over the stale lock {self.path} (pid {pid} on {host} is gone)", file=sys.stderr)
        atomic_write_text(self.path, self._mine())

    def release(self) -> None:
        """Remove the lock file if this process still owns it."""
        if not self.held:
            return
        self.held = False
        owner = self._owner() or {}
        if owner.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
