"""Fault drill, configs: every bad config file, override or flag is one line on stderr naming the
key / file / line, exit status 2, before any work (the run dir is never created)."""
from __future__ import annotations

import pytest

from conftest import assert_clean_error

RECIPES = ["tower", "stage1", "lm", "maskembed", "stage2"]

# (case id, overrides, what the message must name)
OVERRIDE_FAULTS = [
    ("unknown-key", ["optim.lrr=1"], "lrr"),
    ("wrong-type", ["optim.lr=fast"], "optim.lr"),
    ("out-of-range", ["optim.max_steps=-3"], "optim.max_steps"),
    ("yaml-open-list", ["optim.lr=[1,"], "optim.lr=[1,"),
    ("yaml-open-map", ["run.seed={a"], "run.seed={a"),
    ("yaml-open-quote", ['run.device="cpu'], "run.device"),
    ("no-equals", ["optim.lr"], "optim.lr"),
    ("bad-choice", ["run.device=tpu"], "run.device"),
]

# (case id, YAML text, what the message must name besides the file)
FILE_FAULTS = [
    ("tab-indent", "optim:\n\tlr: 1\n", "line"),
    ("unclosed-bracket", "optim: {lr: 1\n", "line"),
    ("top-level-list", "- 1\n- 2\n", "mapping"),
    ("unknown-section", "optimm:\n  lr: 1\n", "optimm"),
    ("binary", None, "not valid YAML"),
]


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("case,overrides,names", OVERRIDE_FAULTS, ids=[c[0] for c in OVERRIDE_FAULTS])
def test_bad_override(run_cli, tmp_path, recipe, case, overrides, names):
    out = tmp_path / "run"
    rc, err = run_cli("train", recipe, *overrides, f"run.out_dir={out}")
    assert_clean_error(rc, err, names)
    assert not out.exists()


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("case,text,names", FILE_FAULTS, ids=[c[0] for c in FILE_FAULTS])
def test_bad_config_file(run_cli, tmp_path, recipe, case, text, names):
    path = tmp_path / "bad.yaml"
    if text is None:
        path.write_bytes(b"\x00\xff\xfe garbage \x81")
    else:
        path.write_text(text)
    rc, err = run_cli("train", recipe, "--config", path, f"run.out_dir={tmp_path / 'run'}")
    assert_clean_error(rc, err, path, names)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("recipe", RECIPES)
def test_missing_config_file(run_cli, tmp_path, recipe):
    rc, err = run_cli("train", recipe, "--config", tmp_path / "nope.yaml")
    assert_clean_error(rc, err, tmp_path / "nope.yaml")


@pytest.mark.parametrize("recipe", RECIPES)
def test_config_file_is_a_directory(run_cli, tmp_path, recipe):
    rc, err = run_cli("train", recipe, "--config", tmp_path)
    assert_clean_error(rc, err, tmp_path)


@pytest.mark.parametrize("argv,names", [
    (["train", "stage1", "objective.name=clipp"], "clipp"),
    (["train", "stage2", "model.bridge.name=mlp"], "mlp"),
    (["train", "stage1", "model.vision.arch=vgg"], "vgg"),
    (["world", "max_objectz=3"], "max_objectz"),
    (["world", "--n", "-5"], "n_train"),
    (["demo", "--config", "missing.yaml"], "missing.yaml"),
    (["ablate", "--config", "missing.yaml"], "missing.yaml"),
    (["eval", "vlm", "--ckpt", "x", "--tasks", "pope,bogus"], "bogus"),
], ids=["objective", "bridge", "arch", "world-key", "world-n", "demo-config", "ablate-config", "eval-task"])
def test_bad_choice_or_flag(run_cli, argv, names):
    rc, err = run_cli(*argv)
    assert_clean_error(rc, err, names)


def test_debug_shows_the_traceback(run_cli, tmp_path):
    from vlm.config import ConfigError
    with pytest.raises(ConfigError, match="lrr"):
        run_cli("--debug", "train", "lm", "optim.lrr=1", f"run.out_dir={tmp_path / 'run'}")
    with pytest.raises(ConfigError, match="lrr"):
        run_cli("train", "lm", "optim.lrr=1", "--debug")
