"""The objective registry: keys match the config, typos list the valid keys, captions_for dispatch."""
import random

import pytest

from encoders.objectives import ClipObjective, FlairObjective, SiglipObjective, SparcObjective
from encoders.registry import OBJECTIVES, build_objective, captions_for
from vlm.config import OBJECTIVE_NAMES, ObjectiveConfig


def test_registry_keys_match_config():
    assert set(OBJECTIVES) == set(OBJECTIVE_NAMES)


@pytest.mark.parametrize("name,cls", [("clip", ClipObjective), ("siglip", SiglipObjective),
                                      ("sparc", SparcObjective), ("flair", FlairObjective)])
def test_build_each(name, cls):
    obj = build_objective(ObjectiveConfig(name=name), embed_dim=16, vision_width=12)
    assert isinstance(obj, cls)
    # the modules hold only learnable scalars (and FLAIR's pooling)
    scalars = [p for n, p in obj.named_parameters() if not n.startswith("pooling.")]
    assert all(p.dim() == 0 for p in scalars) and scalars


def test_unknown_key_lists_valid_keys():
    cfg = ObjectiveConfig(name="clip")
    cfg.name = "clpi"
    with pytest.raises(KeyError, match="valid keys.*clip.*flair.*siglip.*sparc"):
        build_objective(cfg, 16)


def test_flair_needs_vision_width():
    with pytest.raises(ValueError, match="vision_width"):
        build_objective(ObjectiveConfig(name="flair"), 16)


def test_captions_for_dispatch():
    long = "One. Two. Three."
    for name in ("clip", "siglip", "sparc"):
        assert captions_for(ObjectiveConfig(name=name), "cap", long, random.Random(0)) == ["cap"]
    texts = captions_for(ObjectiveConfig(name="flair", flair_num_subcaptions=3), "cap", long, random.Random(0))
    assert texts[0] == "cap" and len(texts) == 4
