"""Local HF vision models as towers, one ``TOWER_CLASSES`` entry each: SigLIP 2 (NaFlex inputs built
for a fixed square grid), timm ViTs through ``TimmWrapperModel``, and stock ``ResNetModel`` /
``ConvNextModel`` dirs (bottleneck ResNet without an ``image_size`` key, a stock image processor).
Each tiny model is saved by the test with stock code, then both bridges train a step on its patch
grid (stage two; saved and reloaded) and stage one's DualEncoder encodes images with it
(``vision.pretrained``) and saves it back as the same stock class."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import (ConvNextConfig, ConvNextImageProcessor, ConvNextModel, ResNetConfig, ResNetModel,
                          Siglip2VisionConfig, Siglip2VisionModel, TimmWrapperConfig, TimmWrapperModel)

from tiny_vlm import perturb_trainable, probe_logits, random_images, vlm_config
from encoders.dual_encoder import DualEncoder
from encoders.towers import (load_vision_tower, num_patches, patch_tokens, siglip2_inputs, tower_width,
                             vision_features)
from vlm.config import EncoderConfig, TextTowerConfig, VisionTowerConfig
from vlm.data.tokenizer import train_bpe_tokenizer
from vlm.extras import MissingExtra
from vlm.model.vision_language_model import VisionLanguageModel

PROMPTS = ["Is there a red circle?", "How many objects are in the image?"]


def save_siglip2(directory: Path) -> Path:
    """A 2-layer SigLIP 2 tower (8-px patches, a 4x4 position grid) and its stock NaFlex processor config."""
    torch.manual_seed(3)
    config = Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 patch_size=8, num_patches=16)
    Siglip2VisionModel(config).save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(dict(
        image_processor_type="Siglip2ImageProcessor", max_num_patches=16, patch_size=8, resample=2,
        image_mean=[0.5] * 3, image_std=[0.5] * 3, do_normalize=True, do_rescale=True, rescale_factor=1 / 255)))
    return directory


def save_timm_vit(directory: Path) -> Path:
    """timm's ``vit_tiny_patch16_224`` shrunk (32 px, 8-px patches, width 32, 2 blocks), random weights."""
    torch.manual_seed(4)
    TimmWrapperModel(TimmWrapperConfig(architecture="vit_tiny_patch16_224", model_args=dict(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2))).save_pretrained(directory)
    return directory


def save_stock_resnet(directory: Path) -> Path:
    """A bottleneck ResNetModel as HF saves it (no image_size key) with a stock ConvNeXt-style processor."""
    torch.manual_seed(5)
    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1],
                             layer_type="bottleneck")).save_pretrained(directory)
    ConvNextImageProcessor(size={"shortest_edge": 32}).save_pretrained(directory)
    return directory


def save_stock_convnext(directory: Path) -> Path:
    torch.manual_seed(6)
    ConvNextModel(ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1],
                                 image_size=32)).save_pretrained(directory)
    ConvNextImageProcessor(size={"shortest_edge": 32}).save_pretrained(directory)
    return directory


def has_timm() -> bool:
    try:
        import timm  # noqa: F401  (imports torchvision)
    except ImportError:
        return False
    return True


NO_TIMM = "timm (the `timm` extra, with a torchvision matching torch) is not importable here"
# name -> (saver, stage-two vision_feature_layer, select strategy)
TOWERS = {"siglip2": (save_siglip2, -2, "full"), "timm": (save_timm_vit, -2, "default"),
          "resnet": (save_stock_resnet, -1, "default"), "convnext": (save_stock_convnext, -1, "default")}


@pytest.fixture(scope="module", params=list(TOWERS))
def tower_case(request, tmp_path_factory):
    if request.param == "timm" and not has_timm():
        pytest.skip(NO_TIMM)
    saver, layer, strategy = TOWERS[request.param]
    return request.param, saver(tmp_path_factory.mktemp(request.param)), layer, strategy


def test_patch_grid(tower_case):
    name, directory, layer, strategy = tower_case
    tower, transform = load_vision_tower(directory)
    assert transform.image_size == 32 and num_patches(tower) == 16
    x = transform.batch(random_images(2))
    with torch.no_grad():
        assert patch_tokens(tower, x).shape == (2, 16, tower_width(tower))
        assert vision_features(tower, x, layer, strategy).shape == (2, 16, tower_width(tower))


def test_siglip2_inputs_follow_its_processor(tmp_path):
    """Our transform then ``siglip2_inputs`` give what the stock (PIL) ``Siglip2ImageProcessor`` gives a
    square image: the same patches in the same order, a full mask and the 4x4 grid."""
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil
    directory = save_siglip2(tmp_path / "siglip2")
    tower, transform = load_vision_tower(directory)
    images = random_images(2, size=48)
    stock = Siglip2ImageProcessorPil(patch_size=8, max_num_patches=16)(images, return_tensors="pt")
    ours = siglip2_inputs(tower, transform.batch(images))
    torch.testing.assert_close(ours["pixel_values"], stock["pixel_values"], atol=1e-5, rtol=0)
    assert ours["spatial_shapes"].tolist() == stock["spatial_shapes"].tolist() == [[4, 4]] * 2
    assert torch.equal(ours["pixel_attention_mask"].bool(), stock["pixel_attention_mask"].bool())


@pytest.mark.parametrize("bridge", ["projector", "flamingo"])
def test_stage_two_trains_a_step(tower_case, tiny_llm_dir, tmp_path, bridge):
    name, directory, layer, strategy = tower_case
    torch.manual_seed(0)
    model = VisionLanguageModel.build(vlm_config(directory, tiny_llm_dir, bridge, vision_feature_layer=layer,
                                                 vision_feature_select_strategy=strategy, freeze_vision=False))
    assert model.tower.num_tokens == 16
    perturb_trainable(model)
    out = model(model.processor(random_images(2), PROMPTS, ["Yes", "2"]))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and bool(torch.isfinite(p.grad).all()), n
    tower_grads = [p.grad for n, p in model.named_parameters() if n.startswith("tower.") and p.requires_grad]
    assert tower_grads and any(g.abs().sum() > 0 for g in tower_grads)
    model.eval()
    model.save_pretrained(tmp_path / "vlm")
    again = VisionLanguageModel.from_pretrained(tmp_path / "vlm").eval()
    torch.testing.assert_close(probe_logits(model), probe_logits(again))


def test_stage_one_encodes_with_it(tower_case, tmp_path):
    name, directory, _, _ = tower_case
    tokenizer = train_bpe_tokenizer(["a red circle.", "a blue square left of a star."] * 20, vocab_size=300,
                                    add_eos=True)
    cfg = EncoderConfig(vision=VisionTowerConfig(pretrained=str(directory)),
                        text=TextTowerConfig(hidden_size=24, num_layers=1, num_heads=2, max_len=16),
                        embed_dim=16, pool="mean", global_mlp=False, local_heads=False)
    enc = DualEncoder(cfg, tokenizer)
    img = enc.encode_image(enc.transform.batch(random_images(2)))
    assert img.patch_emb.shape == (2, 16, 16) and img.global_emb.shape == (2, 16)
    img.global_emb.sum().backward()
    assert any(p.grad is not None for p in enc.vision.parameters())
    enc.save_pretrained(tmp_path / "ckpt")  # a stock class again, with a CLIP-style processor config
    again, transform = load_vision_tower(tmp_path / "ckpt")
    assert type(again) is type(enc.vision) and transform.image_size == 32
    for a, b in zip(again.state_dict().values(), enc.vision.state_dict().values()):
        assert torch.equal(a, b)


def test_unknown_model_type_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ValueError, match="model_type 'vit' is not a supported vision tower"):
        load_vision_tower(tmp_path)


def test_timm_without_the_extra(tmp_path, monkeypatch):
    """The config alone names the wrapper: a dir written elsewhere, read where timm is missing."""
    (tmp_path / "timm").mkdir()
    (tmp_path / "timm" / "config.json").write_text(json.dumps({"model_type": "timm_wrapper",
                                                              "architecture": "vit_tiny_patch16_224"}))
    directory = tmp_path / "timm"
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(MissingExtra, match=r"vlm\[timm\]"):
        load_vision_tower(directory)


@pytest.mark.parametrize("side,hw", [(32, (57, 41)), (32, (32, 80)), (384, (50, 70))])
def test_convnext_processor_crop_pct(tmp_path, side, hw):
    """A stock ConvNeXt / ResNet processor (resize to side / crop_pct, crop; a warp from 384 px) is read
    as what it does, equal to the stock PIL processor."""
    import numpy as np
    from transformers.models.convnext.image_processing_pil_convnext import ConvNextImageProcessorPil
    from encoders.towers import ImageTransform
    ConvNextImageProcessor(size={"shortest_edge": side}).save_pretrained(tmp_path)
    ours = ImageTransform.from_pretrained(tmp_path)
    assert ours.resize_edge == (side if side >= 384 else int(side / 0.875)) and ours.square_resize == (side >= 384)
    array = np.random.default_rng(0).integers(0, 256, (*hw, 3), dtype=np.uint8)
    stock = ConvNextImageProcessorPil(size={"shortest_edge": side})(array, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(ours(array), stock.float(), atol=1e-5, rtol=0)


def test_tower_lora_saves_merged(tower_case, tiny_llm_dir, tmp_path):
    """model.train.tower=lora on each family: LoRA goes into the tower's used linear layers and the
    checkpoint's tower is the stock class again (merged), giving the same logits."""
    from vlm.config import ModuleTraining, TrainingControl
    name, directory, layer, strategy = tower_case
    torch.manual_seed(0)
    train = TrainingControl(tower=ModuleTraining("lora"), bridge=ModuleTraining("full"), llm=ModuleTraining("lora"))
    cfg = vlm_config(directory, tiny_llm_dir, vision_feature_layer=layer, vision_feature_select_strategy=strategy,
                     train=train)
    if name == "resnet":  # convolutions only: refused, naming why
        with pytest.raises(ValueError, match="no linear layer"):
            VisionLanguageModel.build(cfg)
        return
    model = VisionLanguageModel.build(cfg)
    assert model.tower.has_lora
    perturb_trainable(model, seed=4)
    model.eval()
    before = probe_logits(model)
    model.save_pretrained(tmp_path / "ckpt")
    again = VisionLanguageModel.from_pretrained(tmp_path / "ckpt")
    assert type(again.tower.tower) is type(model.tower.tower) and not again.tower.has_lora
    after = probe_logits(again)
    assert (after - before).abs().max().item() < 1e-4
