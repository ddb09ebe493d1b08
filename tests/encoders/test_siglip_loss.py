"""SigLIP loss: against a float64 loop reference and open_clip's SigLipLoss."""
import importlib.util
import math

import pytest
import torch

from encoders.features import ImageFeatures, TextFeatures
from encoders.objectives.siglip import SiglipConfig, SiglipObjective, siglip_loss


def open_clip_loss_module():
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open_clip is not installed")
    path = spec.submodule_search_locations[0] + "/loss.py"
    mod_spec = importlib.util.spec_from_file_location("open_clip_loss_ref", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def loop_siglip(img, txt, t, bias):
    b = len(img)

    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    img = [unit(v) for v in img.tolist()]
    txt = [unit(v) for v in txt.tolist()]
    total = 0.0
    for i in range(b):
        for j in range(b):
            z = 1.0 if i == j else -1.0
            logit = t * sum(a * c for a, c in zip(img[i], txt[j])) + bias
            total += log_sigmoid(z * logit)
    return -total / b


@pytest.mark.parametrize("b,d,t,bias", [(1, 3, 10.0, -10.0), (4, 6, 10.0, -10.0), (6, 5, 3.0, 0.5)])
def test_siglip_matches_loop_reference(b, d, t, bias):
    g = torch.Generator().manual_seed(b * 7 + d)
    img, txt = torch.randn(b, d, generator=g, dtype=torch.float64), torch.randn(b, d, generator=g, dtype=torch.float64)
    assert siglip_loss(img, txt, t, bias).item() == pytest.approx(loop_siglip(img, txt, t, bias), rel=1e-10)


def test_siglip_single_pair():
    """B = 1: only the positive term, -log sigmoid(t <v, t> + b)."""
    img = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    txt = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    got = siglip_loss(img, txt, 10.0, -10.0)
    assert got.item() == pytest.approx(math.log(2.0), rel=1e-12)  # logit 0


def test_siglip_equals_open_clip():
    ref = open_clip_loss_module().SigLipLoss()
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(8, 12, generator=g), torch.randn(8, 12, generator=g)
    t, bias = torch.tensor(10.0), torch.tensor(-10.0)
    n = torch.nn.functional.normalize
    expected = ref(n(img, dim=-1), n(txt, dim=-1), t, bias)
    assert siglip_loss(img, txt, t, bias).item() == pytest.approx(expected.item(), abs=1e-6)


def test_siglip_objective_init_and_grads():
    obj = SiglipObjective(SiglipConfig(), embed_dim=4, vision_width=4)
    b, d = 3, 4
    img = ImageFeatures(torch.randn(b, d), torch.randn(b, 2, d), torch.randn(b, 2, 3))
    txt = TextFeatures(torch.randn(b, d), torch.randn(b, 2, d), torch.ones(b, 2, dtype=torch.bool))
    out = obj(img, txt, {})
    assert out["logit_scale"].item() == pytest.approx(10.0, rel=1e-6)
    assert out["logit_bias"].item() == -10.0
    assert out["loss"].item() == pytest.approx(siglip_loss(img.global_emb, txt.global_emb, 10.0, -10.0).item(), rel=1e-5)
    out["loss"].backward()
    assert obj.logit_bias.grad is not None and obj.logit_scale.log_scale.grad is not None


def test_siglip_scale_clamped_after_the_step_not_in_forward():
    """t' is clamped in place to [0, ln max_logit_scale] by after_optimizer_step (open_clip), never in forward."""
    obj = SiglipObjective(SiglipConfig(), embed_dim=4, vision_width=4)
    img = ImageFeatures(torch.randn(3, 4), torch.randn(3, 2, 4), torch.randn(3, 2, 3))
    txt = TextFeatures(torch.randn(3, 4), torch.randn(3, 2, 4), torch.ones(3, 2, dtype=torch.bool))
    with torch.no_grad():
        obj.logit_scale.log_scale.fill_(math.log(500.0))
    out = obj(img, txt, {})
    assert out["logit_scale"].item() == pytest.approx(500.0, rel=1e-5)
    out["loss"].backward()
    assert obj.logit_scale.log_scale.grad.item() != 0.0
    obj.after_optimizer_step()
    assert obj.logit_scale.log_scale.item() == pytest.approx(math.log(100.0))
    assert obj.logit_bias.item() == -10.0  # the bias is not bounded
