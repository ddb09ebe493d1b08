"""Configs: YAML round trip, every shipped config loads, and bad keys / values / files are rejected
with a ConfigError naming the key (or the file) before any work starts."""
from pathlib import Path

import pytest

from encoders.config import Stage1Config
from encoders.objectives import ClipConfig, FlairConfig, SiglipConfig, SparcConfig
from vlm.config import (AblateConfig, ConfigError, DemoConfig, LMConfig, MaskEmbedRunConfig, Stage2Config, TowerPretrainConfig,
                        config_from_yaml_text, load_config, save_config, to_yaml)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = [Stage1Config, Stage2Config, LMConfig, MaskEmbedRunConfig, TowerPretrainConfig, DemoConfig, AblateConfig]
CLASS_OF_DIR = {"stage1": Stage1Config, "stage2": Stage2Config, "lm": LMConfig, "posttrain": MaskEmbedRunConfig,
                "ablate": AblateConfig, "tower": TowerPretrainConfig}


@pytest.mark.parametrize("cls", RECIPES, ids=lambda c: c.__name__)
def test_yaml_round_trip(cls, tmp_path):
    cfg = cls()
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(cls, tmp_path / "c.yaml") == cfg
    assert config_from_yaml_text(cls, to_yaml(cfg)) == cfg


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_loads_and_round_trips(path, tmp_path):
    cls = CLASS_OF_DIR[path.parent.name]
    cfg = load_config(cls, path)
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(cls, tmp_path / "c.yaml") == cfg


def test_overrides_apply_in_order(tmp_path):
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 0.5\n  max_steps: 10\n  warmup_steps: 2\n")
    cfg = load_config(Stage1Config, tmp_path / "c.yaml", ["optim.lr=1e-3", "model.vision.num_layers=3"])
    assert (cfg.optim.lr, cfg.optim.max_steps, cfg.model.vision.num_layers) == (1e-3, 10, 3)


@pytest.mark.parametrize("cls,override,key", [
    (Stage1Config, "optim.bogus=1", "optim.bogus"),
    (Stage1Config, "nope=1", "nope"),
    (Stage1Config, "optim.lr=abc", "optim.lr"),
    (Stage1Config, "optim.lr=0", "optim.lr"),
    (Stage1Config, "optim.eps=-1", "optim.eps"),
    (Stage1Config, "optim.warmup_steps=1000", "optim.warmup_steps"),
    (Stage1Config, "objective.name=clap", "objective.name"),
    (Stage1Config, "model.vision.patch_size=0", "vision.patch_size"),  # was a ZeroDivisionError
    (Stage1Config, "model.vision.num_heads=0", "vision.num_heads"),
    (Stage1Config, "model.vision.patch_size=7", "vision.patch_size"),
    (Stage1Config, "model.text.num_heads=0", "text.num_heads"),
    (Stage1Config, "model.vision.hidden_size=-8", "vision.hidden_size"),
    (Stage1Config, "objective.name=flair objective.num_heads=0", "objective.num_heads"),
    (Stage1Config, "objective.name=flair objective.flair_num_heads=2", "objective.flair_num_heads"),  # old key
    (Stage1Config, "objective.name=clip objective.lambda_fine=2", "objective.lambda_fine"),  # another objective's
    (Stage1Config, "objective.lambda_fine=-1", "objective.lambda_fine"),
    (Stage1Config, "model.pool=median", "model.pool"),
    (Stage1Config, "world.image_size=8", "world.image_size"),
    (Stage1Config, "world.max_objects=9", "world.min_objects/max_objects"),
    (Stage1Config, "run.device=tpu", "run.device"),
    (LMConfig, "model.num_heads=3", "model.num_heads"),
    (LMConfig, "model.hidden_size=0", "model.hidden_size"),
    (Stage2Config, "model.lora.dropout=2", "lora.dropout"),
    (Stage2Config, "model.bridge.num_heads=0", "bridge.num_heads"),
    (Stage2Config, "data.num_workers=-1", "data.num_workers"),
    (MaskEmbedRunConfig, "maskembed.decoder_heads=0", "maskembed.decoder_heads"),
    (AblateConfig, "seeds=[1,1]", "seeds"),
])
def test_bad_keys_and_values_name_the_key(cls, override, key):
    with pytest.raises(ConfigError) as info:
        load_config(cls, None, override.split())
    assert str(info.value).startswith(f"{key}:"), str(info.value)


@pytest.mark.parametrize("text,what", [
    ("optim:\n  lr: [1\n", "not valid YAML"),
    ("- optim\n- run\n", "top level must be a mapping"),
    ("optim:\n  max_stepz: 3\n", "max_stepz"),
])
def test_bad_files_name_the_file(tmp_path, text, what):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=what) as info:
        load_config(Stage1Config, path)
    assert str(path) in str(info.value)
    with pytest.raises(ConfigError, match="not found"):
        load_config(Stage1Config, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(Stage1Config, None, ["optim.lr"])


# ----------------------------------------------------------------------------------------------
# Stage one: the objective section is chosen by objective.name and sets the encoder's choices
# ----------------------------------------------------------------------------------------------

OBJECTIVE_CONFIGS = {"clip": ClipConfig, "siglip": SiglipConfig, "sparc": SparcConfig, "flair": FlairConfig}
PAPER_ENCODER = {"clip": ("cls", False, False), "siglip": ("cls", False, False), "sparc": ("mean", True, False),
                 "flair": ("cls", False, False)}


def choices(cfg: Stage1Config) -> tuple:
    return cfg.model.pool, cfg.model.global_mlp, cfg.model.local_heads


@pytest.mark.parametrize("name", list(OBJECTIVE_CONFIGS))
def test_objective_name_alone_gives_the_papers_encoder(name):
    cfg = load_config(Stage1Config, None, [f"objective.name={name}"])
    assert type(cfg.objective) is OBJECTIVE_CONFIGS[name] and cfg.objective == OBJECTIVE_CONFIGS[name]()
    assert choices(cfg) == PAPER_ENCODER[name]
    assert choices(Stage1Config(objective=OBJECTIVE_CONFIGS[name]())) == PAPER_ENCODER[name]


def test_sparc_is_the_default_and_its_paper_settings():
    cfg = Stage1Config()
    assert cfg.objective == SparcConfig() and choices(cfg) == ("mean", True, False)
    sparc = cfg.objective
    assert (sparc.lambda_global, sparc.lambda_fine, sparc.sparsity_threshold) == (0.5, 1.0, None)


def test_explicit_encoder_choices_win_over_the_objectives():
    cfg = load_config(Stage1Config, None, ["objective.name=sparc", "model.pool=cls", "model.local_heads=true"])
    assert choices(cfg) == ("cls", True, True)
    cfg = load_config(Stage1Config, None, ["objective.name=clip", "model.global_mlp=true"])
    assert choices(cfg) == ("cls", True, False)


@pytest.mark.parametrize("name", ["clip", "siglip", "flair"])
def test_local_heads_without_local_embeddings_name_both_keys(name):
    with pytest.raises(ConfigError, match=f"model.local_heads=true with objective.name={name}"):
        load_config(Stage1Config, None, [f"objective.name={name}", "model.local_heads=true"])


def test_last_objective_name_wins(tmp_path):
    (tmp_path / "c.yaml").write_text("objective:\n  name: clip\n")
    cfg = load_config(Stage1Config, tmp_path / "c.yaml", ["objective.name=flair", "objective.num_subcaptions=3"])
    assert cfg.objective == FlairConfig(num_subcaptions=3) and choices(cfg) == ("cls", False, False)


@pytest.mark.parametrize("name", list(OBJECTIVE_CONFIGS))
def test_stage1_round_trips_with_each_objective(name, tmp_path):
    cfg = load_config(Stage1Config, None, [f"objective.name={name}", "optim.lr=3e-4"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(Stage1Config, tmp_path / "c.yaml") == cfg
    assert config_from_yaml_text(Stage1Config, to_yaml(cfg)) == cfg
    assert config_from_yaml_text(OBJECTIVE_CONFIGS[name], to_yaml(cfg.objective)) == cfg.objective
    assert "pool: null" not in to_yaml(cfg)  # the resolved choices are what is saved


# The encoder each shipped recipe builds: (pool, global_mlp, local_heads). SPARC's recipes follow the
# paper (local embeddings through the shared global linear heads, no separate local heads).
RECIPE_ENCODERS = {"clip_tiny": ("cls", False, False), "siglip_tiny": ("cls", False, False),
                   "sparc_tiny": ("mean", True, False), "flair_tiny": ("cls", False, False),
                   "sparc_vitb16": ("mean", True, False), "sparc_resnet_tiny": ("max", True, False),
                   # the demo's recipe: a ResNet tower max-pooled for every objective
                   "clip_resnet_tiny": ("max", False, False), "siglip_resnet_tiny": ("max", False, False),
                   "flair_resnet_tiny": ("max", False, False)}


def test_shipped_stage1_recipes_keep_their_encoders():
    paths = sorted((ROOT / "configs" / "stage1").glob("*.yaml"))
    assert {p.stem for p in paths} == set(RECIPE_ENCODERS)
    for path in paths:
        cfg = load_config(Stage1Config, path)
        assert cfg.objective.name == path.stem.split("_")[0]
        assert choices(cfg) == RECIPE_ENCODERS[path.stem], path.name
    flair = load_config(Stage1Config, ROOT / "configs/stage1/flair_tiny.yaml").objective
    assert (flair.num_subcaptions, flair.max_merge, flair.num_heads) == (3, 3, 8)


def test_lm_document_contexts_are_checked():
    assert load_config(LMConfig, None, ["data.contexts=[layout]"]).data.contexts == ["layout"]
    with pytest.raises(ConfigError, match="data.contexts"):
        load_config(LMConfig, None, ["data.contexts=[bogus]"])
    with pytest.raises(ConfigError, match="data.contexts"):
        load_config(LMConfig, None, ["data.contexts=[]"])
