"""vlm.cli.jobs: jobs run once what they need is done, side by side in child processes or here in order."""
import json
import time
from pathlib import Path

import pytest

from vlm.cli.demo import plan as demo_plan, stage_jobs
from vlm.cli.jobs import Job, run_jobs
from vlm.cli.pipeline import Timings, stage_needs
from vlm.config import DemoConfig, load_config
from vlm.files import VlmError


def append_line(path: str, text: str, pause: float = 0.0) -> None:
    """A job: wait ``pause`` seconds, then append ``text`` to ``path`` and print it."""
    time.sleep(pause)
    with open(path, "a") as f:
        f.write(text + "\n")
    print(f"wrote {text}")


def record_threads(path: str) -> None:
    """A job: write the child's torch thread count to ``path``."""
    import torch

    Path(path).write_text(str(torch.get_num_threads()))


def fail(message: str) -> None:
    """A job that prints ``message`` and fails."""
    print(message)
    raise RuntimeError(message)


def _chain(tmp_path: Path) -> tuple[Path, list[Job]]:
    out = tmp_path / "order.txt"
    jobs = [Job("c", append_line, (str(out), "c"), needs=["a", "b"]),
            Job("a", append_line, (str(out), "a"), kwargs={"pause": 0.5}),
            Job("b", append_line, (str(out), "b"), needs=["a"])]
    return out, jobs


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_jobs_run_after_what_they_need(tmp_path, n_jobs):
    out, jobs = _chain(tmp_path)
    jobs = [jobs[1], jobs[2], jobs[0]] if n_jobs == 1 else jobs  # here, in list order: needs first
    timings = Timings(tmp_path / "timings.json")
    run_jobs(jobs, timings, n_jobs=n_jobs, threads=1, log_dir=tmp_path / "logs")
    assert out.read_text().split() == ["a", "b", "c"]
    assert set(timings.seconds) == {"a", "b", "c"} and timings.seconds["a"] >= 0.5
    assert json.loads((tmp_path / "timings.json").read_text())["seconds"] == timings.seconds
    if n_jobs == 2:  # each child's output went to its own log
        assert (tmp_path / "logs" / "b.log").read_text() == "wrote b\n"


def test_independent_jobs_overlap_and_get_their_threads(tmp_path):
    out = tmp_path / "order.txt"
    jobs = [Job("slow", append_line, (str(out), "slow"), kwargs={"pause": 1.5}),
            Job("fast", append_line, (str(out), "fast"), kwargs={"pause": 0.2}),
            Job("threads", record_threads, (str(tmp_path / "threads.txt"),), needs=["fast"])]
    t0 = time.perf_counter()
    run_jobs(jobs, Timings(tmp_path / "t.json"), n_jobs=2, threads=3, log_dir=tmp_path / "logs")
    assert out.read_text().split() == ["fast", "slow"]  # started together, the short one ended first
    assert time.perf_counter() - t0 < 1.5 + 0.2 + 0.5 * 1.5 + 5  # not one after the other (plus start-up)
    assert (tmp_path / "threads.txt").read_text() == "3"


def test_done_jobs_are_reused_not_run(tmp_path):
    out, jobs = _chain(tmp_path)
    done = tmp_path / "a_final"
    done.mkdir()
    jobs[1].done = done
    timings = Timings(tmp_path / "timings.json", seconds={"a": 42.0})
    run_jobs(jobs, timings, n_jobs=2, threads=1, log_dir=tmp_path / "logs")
    assert out.read_text().split() == ["b", "c"]
    assert timings.reused == ["a"] and timings.seconds["a"] == 42.0  # the time measured when it ran


def test_a_failed_job_stops_the_run_and_shows_its_log(tmp_path):
    out = tmp_path / "order.txt"
    jobs = [Job("bad", fail, ("the reason it failed",)),
            Job("after", append_line, (str(out), "after"), needs=["bad"])]
    with pytest.raises(VlmError, match="bad failed") as err:
        run_jobs(jobs, Timings(tmp_path / "t.json"), n_jobs=2, threads=1, log_dir=tmp_path / "logs")
    assert "the reason it failed" in str(err.value) and str(tmp_path / "logs" / "bad.log") in str(err.value)
    assert not out.exists()


def test_bad_needs_fail_before_work(tmp_path):
    out = tmp_path / "order.txt"
    with pytest.raises(VlmError, match="needs \\['nope'\\]"):
        run_jobs([Job("a", append_line, (str(out), "a"), needs=["nope"])], Timings(tmp_path / "t.json"), n_jobs=2)
    cycle = [Job("a", append_line, (str(out), "a"), needs=["b"]), Job("b", append_line, (str(out), "b"), needs=["a"])]
    with pytest.raises(VlmError, match="cycle"):
        run_jobs(cycle, Timings(tmp_path / "t.json"), n_jobs=2, log_dir=tmp_path)
    assert not out.exists()


def test_timings_keep_this_runs_measurement_over_a_reuse(tmp_path):
    timings = Timings(tmp_path / "t.json", seconds={"x": 5.0})
    timings.add("x", 7.0)
    timings.add("x", 0.0, reused=True)  # read back moments later: not a reuse of an earlier run
    assert timings.seconds["x"] == 7.0 and timings.reused == []


def test_demo_stages_need_what_their_configs_read(tmp_path):
    cfg = load_config(DemoConfig, None, [f"out_dir={tmp_path}", "from_scratch=[sparc]"])
    stages = demo_plan(cfg)
    needs = stage_needs(stages)
    assert needs["lm"] == [] and needs["tower"] == [] and needs["stage1/sparc_scratch"] == []
    assert needs["stage1/sparc"] == ["tower"] and needs["stage1/clip"] == ["tower"]
    assert needs["maskembed/sparc"] == ["stage1/sparc"]
    assert sorted(needs["stage2/projector"]) == ["lm", "stage1/sparc"]
    assert needs["stage2/oracle"] == ["lm"]
    order = [j.name for j in stage_jobs(cfg, stages)]
    assert order[:4] == ["lm", "tower", "stage1/sparc", "stage2/projector"]  # the longest chain first
    assert sorted(order) == sorted(stages)
