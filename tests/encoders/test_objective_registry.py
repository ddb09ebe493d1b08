"""The objective registry: keys match the pipelines' list, typos list the valid keys, every objective
is built the same way, captions_for dispatch, each objective's config next to its loss."""
import random

import pytest

from encoders.objectives import (ClipConfig, ClipObjective, FlairConfig, FlairObjective, ObjectiveConfig,
                                 SiglipConfig, SiglipObjective, SparcConfig, SparcObjective)
from encoders.registry import OBJECTIVES, build_objective, captions_for, objective_config_class
from vlm.config import ENCODER_CHOICES, OBJECTIVE_NAMES, ConfigError

CASES = [("clip", ClipObjective, ClipConfig), ("siglip", SiglipObjective, SiglipConfig),
         ("sparc", SparcObjective, SparcConfig), ("flair", FlairObjective, FlairConfig)]


def test_registry_keys_match_the_pipelines_list():
    assert tuple(OBJECTIVES) == OBJECTIVE_NAMES


@pytest.mark.parametrize("name,cls,cfg_cls", CASES, ids=[c[0] for c in CASES])
def test_build_each(name, cls, cfg_cls):
    assert objective_config_class(name) is cfg_cls and cls.config_class is cfg_cls
    cfg = cfg_cls()
    assert cfg.name == name and isinstance(cfg, ObjectiveConfig)
    assert set(cfg.encoder_defaults) == set(ENCODER_CHOICES)  # the paper's encoder, every choice set
    obj = build_objective(cfg, embed_dim=16, vision_width=12)
    assert isinstance(obj, cls) and obj.cfg is cfg
    # the modules hold only learnable scalars (and FLAIR's pooling)
    scalars = [p for n, p in obj.named_parameters() if not n.startswith("pooling.")]
    assert all(p.dim() == 0 for p in scalars) and scalars


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match="objective.name.*clpi.*clip.*flair.*siglip.*sparc"):
        objective_config_class("clpi")


def test_config_name_is_fixed_and_matches_the_module():
    with pytest.raises(ConfigError, match="objective.name"):
        ClipConfig(name="sparc")
    with pytest.raises(TypeError, match="ClipConfig"):
        ClipObjective(SparcConfig(), 16, 12)


def test_captions_for_dispatch():
    long = "One. Two. Three."
    for cfg in (ClipConfig(), SiglipConfig(), SparcConfig()):
        assert captions_for(cfg, "cap", long, random.Random(0)) == ["cap"]
    texts = captions_for(FlairConfig(num_subcaptions=3), "cap", long, random.Random(0))
    assert texts[0] == "cap" and len(texts) == 4
    assert FlairObjective.captions_for(FlairConfig(num_subcaptions=3), "cap", long, random.Random(0)) == texts
