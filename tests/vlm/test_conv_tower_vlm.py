"""Stage two with a convolutional tower: both bridges read a ResNet / ConvNeXt patch grid."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tiny_vlm import perturb_trainable, probe_logits, random_images, save_conv_tower, vlm_config
from encoders.towers import ImageTransform, build_vision_tower, final_norm, num_patches
from vlm.config import VisionTowerConfig
from vlm.model.vision_language_model import VisionLanguageModel

PROMPTS = ["Is there a red circle?", "How many objects are in the image?"]


@pytest.fixture(scope="module", params=["resnet", "convnext"])
def conv_tower_dir(request, tmp_path_factory) -> Path:
    return save_conv_tower(tmp_path_factory.mktemp(request.param), request.param)


@pytest.mark.parametrize("bridge", ["projector", "flamingo"])
def test_bridge_trains_on_a_conv_tower_and_round_trips(conv_tower_dir, tiny_llm_dir, tmp_path, bridge):
    torch.manual_seed(0)
    model = VisionLanguageModel.build(vlm_config(conv_tower_dir, tiny_llm_dir, bridge, vision_feature_layer=-1,
                                                 freeze_vision=False))
    assert model.tower.num_tokens == num_patches(model.tower.tower) == 16
    perturb_trainable(model)
    batch = model.processor(random_images(2), PROMPTS, ["Yes", "2"])
    out = model(batch)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    norm = {id(p) for p in final_norm(model.tower.tower).parameters()}  # -1 is before the final norm
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
        assert not (id(p) in norm and p.requires_grad), name
    tower_grads = [p.grad for n, p in model.named_parameters() if n.startswith("tower.") and p.requires_grad]
    assert tower_grads and any(g.abs().sum() > 0 for g in tower_grads)
    model.eval()
    model.save_pretrained(tmp_path / "vlm")
    again = VisionLanguageModel.from_pretrained(tmp_path / "vlm").eval()
    torch.testing.assert_close(probe_logits(model), probe_logits(again))


def test_default_feature_layer_needs_the_patch_grid(conv_tower_dir, tiny_llm_dir):
    """-2 is the stem's 8x8 output, not the 4x4 patch grid: a clear error, naming the fix."""
    with pytest.raises(ValueError, match="use -1"):
        VisionLanguageModel.build(vlm_config(conv_tower_dir, tiny_llm_dir, "projector"))


def test_projector_position_table_tells_the_grid_cells_apart(conv_tower_dir, tiny_llm_dir, tmp_path):
    """bridge.position_embedding adds one learned vector per grid cell after the MLP; it trains,
    round-trips with the checkpoint and keeps the model out of the LLaVA export."""
    from vlm.model.export import ExportError, check_llava_exportable

    cfg = vlm_config(conv_tower_dir, tiny_llm_dir, "projector", vision_feature_layer=-1)
    cfg.bridge.position_embedding = True
    torch.manual_seed(0)
    model = VisionLanguageModel.build(cfg)
    bridge = model.bridge
    assert bridge.position.shape == (16, model.llm.config.hidden_size) and bridge.position.requires_grad
    same = torch.ones(1, 16, model.tower.width)  # one feature in every cell
    tokens = bridge(same)[0]
    torch.testing.assert_close(tokens - bridge.position, bridge.mlp(same)[0])
    assert not torch.allclose(tokens[0], tokens[1])  # only the position differs
    batch = model.processor(random_images(2), PROMPTS, ["Yes", "2"])
    model(batch)["loss"].backward()
    assert bridge.position.grad is not None and bridge.position.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="position table holds 16"):
        bridge(torch.ones(1, 9, model.tower.width))
    perturb_trainable(model)
    model.eval()
    model.save_pretrained(tmp_path / "vlm")
    again = VisionLanguageModel.from_pretrained(tmp_path / "vlm").eval()
    torch.testing.assert_close(again.bridge.position, bridge.position)
    torch.testing.assert_close(probe_logits(model), probe_logits(again))
    with pytest.raises(ExportError, match="position"):
        check_llava_exportable(model)
