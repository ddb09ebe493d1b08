"""Running a pipeline's stages and evals side by side: a job starts once the jobs it needs are done.

Small models leave a CPU's cores half idle: on 2 cores the world LM trains only 1.5x faster on
two threads than on one, stage two 1.2x, so two one-thread jobs at once finish sooner than the
same jobs one after another on two threads (the measurements are in the README). ``run_jobs``
keeps ``n_jobs`` child processes busy, each with ``threads`` torch threads and its output in
its own log file, launching ready jobs in list order (put the long chain first). With
``n_jobs=1`` every job runs here, in order, exactly as a serial pipeline would.

A job whose ``done`` path exists is not run (the pipeline reuses it); a failed job stops the
others (a stage resumes from its last checkpoint on the next run) and raises with its log's tail.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Callable

from vlm.files import VlmError

# Imported once by the fork server, so that each child starts without re-importing them.
PRELOAD = ["torch", "transformers", "vlm.cli.demo"]
LOG_TAIL = 20  # lines of a failed job's log shown in the error


@dataclass
class Job:
    """One unit of a pipeline: ``fn(*args, **kwargs)`` (a module-level function, so a child can run it)."""

    name: str  # the Timings key, e.g. "stage1/sparc" or "eval encoder stage1/sparc"
    fn: Callable[..., Any]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    needs: list[str] = field(default_factory=list)  # names of jobs that must finish first
    done: Path | None = None  # exists -> nothing to do (a final dir, a saved summary)
    log: Path | None = None  # a child's stdout and stderr (default: <log_dir>/<name>.log)

    def is_done(self) -> bool:
        """Whether ``done`` exists (the job has nothing to do)."""
        return self.done is not None and Path(self.done).exists()


def run_jobs(jobs: list[Job], timings: Any, n_jobs: int = 1, threads: int = 1, log_dir: str | Path = ".") -> None:
    """Run every job once its ``needs`` are done: here in order (``n_jobs == 1``), else in up to
    ``n_jobs`` child processes of ``threads`` torch threads each. Records each job's wall seconds
    in ``timings`` (``vlm.cli.pipeline.Timings``); a job already ``done`` is recorded as reused."""
    names = [j.name for j in jobs]
    for j in jobs:
        missing = [n for n in j.needs if n not in names]
        if missing:
            raise VlmError(f"job {j.name} needs {missing}, which are not jobs of this run")
    if n_jobs <= 1:
        for j in jobs:
            _run_here(j, timings)
        return
    _Scheduler(jobs, timings, n_jobs, threads, Path(log_dir)).run()


def _run_here(job: Job, timings: Any) -> None:
    """Run ``job`` in this process (or record it as reused)."""
    if job.is_done():
        timings.add(job.name, 0.0, reused=True)
        return
    t0 = time.perf_counter()
    job.fn(*job.args, **job.kwargs)
    timings.add(job.name, time.perf_counter() - t0)


def _child(job: Job, threads: int, log: str) -> None:
    """A child process's body: output to ``log``, ``threads`` torch threads, then the job."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    import torch

    torch.set_num_threads(threads)
    job.fn(*job.args, **job.kwargs)


class _Scheduler:
    """The parallel loop of ``run_jobs``: launch what is ready, wait for one to end, repeat."""

    def __init__(self, jobs: list[Job], timings: Any, n_jobs: int, threads: int, log_dir: Path) -> None:
        self.pending = list(jobs)
        self.timings, self.n_jobs, self.threads, self.log_dir = timings, n_jobs, threads, log_dir
        self.finished: set[str] = set()
        self.running: dict[Any, tuple[Job, Any, float, Path]] = {}  # sentinel -> (job, process, t0, log)
        self.ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
        if self.ctx.get_start_method() == "forkserver":
            self.ctx.set_forkserver_preload(PRELOAD)

    def run(self) -> None:
        """Until every job is done; on a failure (or Ctrl-C) stop the running children and raise."""
        try:
            while self.pending or self.running:
                self.launch_ready()
                if not self.running and self.pending:
                    stuck = [j.name for j in self.pending]
                    raise VlmError(f"jobs {stuck} wait on each other (a cycle in their needs)")
                for sentinel in wait(list(self.running)) if self.running else []:
                    self.collect(sentinel)
        finally:
            for _, proc, _, _ in self.running.values():
                proc.terminate()
            for _, proc, _, _ in self.running.values():
                proc.join()

    def launch_ready(self) -> None:
        """Start pending jobs whose needs are finished, in list order, while a slot is free;
        record (without running) those already done."""
        for job in list(self.pending):
            if len(self.running) >= self.n_jobs:
                return
            if not all(n in self.finished for n in job.needs):
                continue
            self.pending.remove(job)
            if job.is_done():
                print(f"[jobs] {job.name}: reusing {job.done}", flush=True)
                self.timings.add(job.name, 0.0, reused=True)
                self.finished.add(job.name)
                continue
            log = Path(job.log) if job.log else self.log_dir / (job.name.replace("/", "_").replace(" ", "_") + ".log")
            log.parent.mkdir(parents=True, exist_ok=True)
            proc = self.ctx.Process(target=_child, args=(job, self.threads, str(log)), name=job.name)
            proc.start()
            self.running[proc.sentinel] = (job, proc, time.perf_counter(), log)
            print(f"[jobs] {job.name}: started ({self.threads} thread(s); log {log})", flush=True)

    def collect(self, sentinel: Any) -> None:
        """Record a child that ended; raise with its log's tail if it failed."""
        job, proc, t0, log = self.running.pop(sentinel)
        proc.join()
        seconds = time.perf_counter() - t0
        if proc.exitcode != 0:
            tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-LOG_TAIL:]) if log.is_file() else ""
            raise VlmError(f"{job.name} failed (exit code {proc.exitcode}); log: {log}\n{tail}")
        self.timings.add(job.name, seconds)
        self.finished.add(job.name)
        print(f"[jobs] {job.name}: done in {seconds:.0f}s", flush=True)
