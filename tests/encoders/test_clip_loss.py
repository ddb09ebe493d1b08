"""CLIP loss: against a float64 loop reference and open_clip's ClipLoss."""
import importlib.util
import math

import pytest
import torch

from encoders.features import ImageFeatures, TextFeatures
from encoders.objectives.base import LogScale
from encoders.objectives.clip import ClipConfig, ClipObjective, clip_loss
from vlm.config import ConfigError


def open_clip_loss_module():
    """open_clip's loss.py alone (its package __init__ needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open_clip is not installed")
    path = spec.submodule_search_locations[0] + "/loss.py"
    mod_spec = importlib.util.spec_from_file_location("open_clip_loss_ref", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def loop_clip(img, txt, scale):
    """Symmetric InfoNCE with explicit loops, float64 Python arithmetic."""
    b = len(img)

    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    img = [unit(v) for v in img.tolist()]
    txt = [unit(v) for v in txt.tolist()]
    logits = [[scale * sum(a * c for a, c in zip(img[i], txt[j])) for j in range(b)] for i in range(b)]
    i2t = t2i = 0.0
    for i in range(b):
        i2t += -logits[i][i] + math.log(sum(math.exp(logits[i][j]) for j in range(b)))
        t2i += -logits[i][i] + math.log(sum(math.exp(logits[j][i]) for j in range(b)))
    return (i2t / b + t2i / b) / 2


@pytest.mark.parametrize("b,d,scale", [(1, 4, 10.0), (3, 5, 14.3), (7, 8, 100.0)])
def test_clip_matches_loop_reference(b, d, scale):
    g = torch.Generator().manual_seed(b * 31 + d)
    img, txt = torch.randn(b, d, generator=g, dtype=torch.float64), torch.randn(b, d, generator=g, dtype=torch.float64)
    got = clip_loss(img, txt, scale)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(loop_clip(img, txt, scale), rel=1e-10, abs=1e-12)


def test_clip_single_pair_is_zero():
    img, txt = torch.randn(1, 6, dtype=torch.float64), torch.randn(1, 6, dtype=torch.float64)
    assert clip_loss(img, txt, 20.0).item() == pytest.approx(0.0, abs=1e-12)


def test_clip_equals_open_clip():
    ref = open_clip_loss_module().ClipLoss()
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(9, 16, generator=g), torch.randn(9, 16, generator=g)
    scale = torch.tensor(13.7)
    expected = ref(torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1), scale)
    assert clip_loss(img, txt, scale).item() == pytest.approx(expected.item(), abs=1e-6)


def test_clip_objective_scale_and_terms():
    cfg = ClipConfig(init_temperature=0.05, max_logit_scale=30.0)
    obj = ClipObjective(cfg, embed_dim=8, vision_width=5)
    b, d = 4, 8
    img = ImageFeatures(torch.randn(b, d, requires_grad=True), torch.randn(b, 3, d), torch.randn(b, 3, 5))
    txt = TextFeatures(torch.randn(b, d, requires_grad=True), torch.randn(b, 2, d), torch.ones(b, 2, dtype=torch.bool))
    out = obj(img, txt, {})
    assert out["logit_scale"].item() == pytest.approx(20.0, rel=1e-6)
    assert out["loss"].item() == pytest.approx(clip_loss(img.global_emb, txt.global_emb, 20.0).item(), rel=1e-6)
    out["loss"].backward()
    assert obj.logit_scale.log_scale.grad is not None and img.global_emb.grad is not None
    # The scale is no longer clamped in forward (the old code returned exp().clamp(max), which zeroed
    # its gradient at the bound); as open_clip, after_optimizer_step clamps log_scale in place to
    # [0, ln max_logit_scale] after the optimizer step.
    with torch.no_grad():
        obj.logit_scale.log_scale.fill_(math.log(1000.0))
    obj.zero_grad()
    out = obj(img, txt, {})
    assert out["logit_scale"].item() == pytest.approx(1000.0, rel=1e-5)
    out["loss"].backward()
    assert obj.logit_scale.log_scale.grad.item() != 0.0
    obj.after_optimizer_step()
    assert obj.logit_scale.log_scale.item() == pytest.approx(math.log(30.0))
    assert obj(img, txt, {})["logit_scale"].item() == pytest.approx(30.0, rel=1e-6)
    with torch.no_grad():
        obj.logit_scale.log_scale.fill_(-2.0)
    obj.after_optimizer_step()
    assert obj.logit_scale.log_scale.item() == 0.0  # the floor: ln 1


def test_logit_scale_gradient_at_the_bound_float64():
    """At log_scale = ln 100 (the bound) the gradient is d loss / d log_scale, not zero."""
    scale = LogScale(100.0, 100.0).double()
    with torch.no_grad():
        scale.log_scale.fill_(math.log(100.0))  # exactly, in float64 (the init is stored in float32)
    g = torch.Generator().manual_seed(3)
    img, txt = torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randn(5, 6, generator=g, dtype=torch.float64)
    clip_loss(img, txt, scale()).backward()
    h = 1e-6
    numeric = (clip_loss(img, txt, math.exp(math.log(100.0) + h)) - clip_loss(img, txt, math.exp(math.log(100.0) - h))) / (2 * h)
    assert scale.log_scale.grad.item() != 0.0
    assert scale.log_scale.grad.item() == pytest.approx(numeric.item(), rel=1e-6)
    scale.clamp_()  # at the bound: unchanged
    assert scale.log_scale.item() == math.log(100.0)


def test_log_scale_bounds():
    with pytest.raises(ValueError, match="init scale"):
        LogScale(0.5, 100.0)  # below the floor exp(0) = 1
    with pytest.raises(ValueError, match="init scale"):
        LogScale(200.0, 100.0)
    with pytest.raises(ConfigError, match="init_temperature"):
        ClipConfig(init_temperature=2.0)
    with pytest.raises(ConfigError, match="max_logit_scale"):
        ClipConfig(max_logit_scale=0.5)


def test_clip_bad_shapes():
    with pytest.raises(ValueError, match=r"\[B, d\]"):
        clip_loss(torch.randn(3, 4), torch.randn(2, 4), 1.0)
    with pytest.raises(ValueError):
        clip_loss(torch.randn(3, 4, 2), torch.randn(3, 4, 2), 1.0)
