"""Optional extras (``vlm.extras``): a missing one stops with one line naming it; W&B from the config."""
from __future__ import annotations

import sys
import types

import pytest

from training.metrics import MetricsLogger
from vlm.cli import main
from vlm.config import ConfigError, RunConfig
from vlm.extras import MissingExtra, check_extra, require


def test_require_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an uninstalled module looks like to import
    with pytest.raises(MissingExtra) as e:
        require("wandb", "wandb", "run.wandb=true")
    assert str(e.value) == "run.wandb=true needs the `vlm[wandb]` extra (wandb): pip install 'sparc-vlm[wandb]'"
    with pytest.raises(MissingExtra, match=r"pip install 'sparc-vlm\[flash\]'"):
        check_extra("flash", "surely_not_installed_module_xyz")
    assert require("lmeval", "json").__name__ == "json"


def test_eval_drift_without_lm_eval_prints_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.delitem(sys.modules, "eval.lm_eval_adapter", raising=False)
    assert main(["eval", "drift", "--ckpt", str(tmp_path)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["vlm: vlm eval drift (lm-eval) needs the `vlm[lmeval]` extra (lm-eval): pip install 'sparc-vlm[lmeval]'"]


def test_wandb_run_from_the_config(monkeypatch, tmp_path):
    calls = []
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(kw) or types.SimpleNamespace(finish=lambda: None))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = RunConfig(out_dir=str(tmp_path / "r1"), tensorboard=False, wandb=True, wandb_project="proj",
                    wandb_entity="team", run_name="sparc-a")
    MetricsLogger(tmp_path / "r1", run, active=True, config=run, resume_step=0).close()
    assert (calls[0]["project"], calls[0]["entity"], calls[0]["name"]) == ("proj", "team", "sparc-a")
    default = RunConfig(out_dir=str(tmp_path / "r2"), tensorboard=False, wandb=True)
    MetricsLogger(tmp_path / "r2", default, active=True, config=None, resume_step=0).close()
    assert (calls[1]["project"], calls[1]["entity"], calls[1]["name"]) == ("sparc-vlm", None, "r2")
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(MissingExtra, match=r"sparc-vlm\[wandb\]"):
        MetricsLogger(tmp_path / "r3", default, active=True, config=None, resume_step=0)
    with pytest.raises(ConfigError, match="run.wandb_project"):
        RunConfig(wandb=True, wandb_project="")
