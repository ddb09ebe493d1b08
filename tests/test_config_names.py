"""Configs by name from any folder (``vlm.config.resolve_config_path``), ``vlm config show``, and
the paths a saved config records (``portable_path`` / ``saved_path``)."""
from __future__ import annotations

from pathlib import Path

import pytest

from encoders.config import Stage1Config
from training.recipes import RECIPES
from vlm.cli import main
from vlm.config import (ConfigError, config_names, configs_dir, load_config, portable_path, resolve_config_path,
                        saved_path)

REPO = Path(__file__).resolve().parent.parent


def test_shipped_configs_are_the_top_level_folder():
    top = sorted(str(p.relative_to(REPO / "configs").with_suffix("")) for p in (REPO / "configs").rglob("*.yaml"))
    assert config_names() == top and "stage1/sparc_tiny" in top


@pytest.mark.parametrize("name", ["stage1/sparc_tiny", "stage1/sparc_tiny.yaml", "configs/stage1/sparc_tiny.yaml"])
def test_config_by_name_from_another_folder(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path(name) == configs_dir() / "stage1" / "sparc_tiny.yaml"
    cfg = load_config(Stage1Config, name, ["optim.lr=0.25"])
    assert cfg.objective.name == "sparc" and cfg.optim.lr == 0.25


def test_every_recipe_default_loads_from_another_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for recipe in RECIPES.values():
        assert isinstance(load_config(recipe.config_class, recipe.default_config), recipe.config_class)


def test_a_path_wins_over_a_name_and_an_unknown_name_lists_the_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "stage1").mkdir()
    (tmp_path / "stage1" / "sparc_tiny.yaml").write_text("optim:\n  lr: 0.125\n")
    assert load_config(Stage1Config, "stage1/sparc_tiny.yaml").optim.lr == 0.125
    with pytest.raises(ConfigError, match="neither a file nor a shipped config name.*stage1/clip_tiny"):
        resolve_config_path("stage1/nope")


def test_config_show_prints_the_resolved_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["config", "show", "stage2/flamingo_tiny", "optim.lr=0.5"]) == 0
    out = capsys.readouterr().out
    assert "name: flamingo" in out and "lr: 0.5" in out
    assert main(["config", "list"]) == 0
    assert "posttrain/maskembed_tiny" in capsys.readouterr().out.split()
    (tmp_path / "mine.yaml").write_text("optim:\n  lr: 0.3\n")
    assert main(["config", "show", "mine.yaml"]) == 2  # the recipe cannot be told from the folder
    assert "--recipe" in capsys.readouterr().err
    assert main(["config", "show", "mine.yaml", "--recipe", "lm"]) == 0
    assert "lr: 0.3" in capsys.readouterr().out


def test_portable_paths_move_with_the_tree(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "lm" / "final").mkdir(parents=True)
    ckpt = Path("runs/stage2/final")
    ckpt.mkdir(parents=True)
    written = portable_path("runs/lm/final", ckpt)
    assert written == "../../lm/final"
    assert portable_path(tmp_path / "elsewhere", ckpt) == str(tmp_path / "elsewhere")  # absolute stays absolute
    (tmp_path / "runs").rename(tmp_path / "moved")
    assert saved_path(tmp_path / "moved" / "stage2" / "final", written).resolve() == tmp_path / "moved" / "lm" / "final"
