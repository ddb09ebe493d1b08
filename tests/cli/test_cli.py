"""The `vlm` console script: every subcommand has --help, and bad configs exit 2 before any work."""
import subprocess
import sys

import pytest

from vlm.cli import build_parser, main

SUBCOMMANDS = [["world"], ["train", "stage1"], ["train", "lm"], ["train", "maskembed"], ["train", "stage2"],
               ["eval", "encoder"], ["eval", "vlm"], ["eval", "drift"], ["eval", "probe"], ["eval", "relation-probe"], ["merge"], ["export"], ["score"], ["generate"], ["chat"], ["serve"], ["demo"], ["ablate"]]


@pytest.mark.parametrize("cmd", SUBCOMMANDS, ids=lambda c: " ".join(c))
def test_every_subcommand_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*cmd, "--help"])
    assert e.value.code == 0
    assert "usage: vlm" in capsys.readouterr().out


def test_bad_override_exits_2_naming_the_key(tmp_path, capsys):
    rc = main(["train", "stage1", "--config", "configs/stage1/sparc_tiny.yaml", "optim.lr=-1",
               f"run.out_dir={tmp_path / 'run'}"])
    assert rc == 2
    assert "optim.lr" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_unknown_key_exits_2(tmp_path, capsys):
    rc = main(["train", "lm", "model.hiden_size=3", f"run.out_dir={tmp_path / 'run'}"])
    assert rc == 2
    assert "hiden_size" in capsys.readouterr().err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "vlm.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "demo" in out.stdout
