"""AdamW parameter groups and the warmup + cosine schedule."""
import math

import pytest
import torch
from torch import nn

from training.optim import build_optimizer, is_norm_layer, lr_factor, param_groups
from vlm.config import OptimConfig


@pytest.mark.parametrize("warmup,max_steps,ratio", [(0, 10, 0.1), (3, 10, 0.0), (5, 20, 0.25), (10, 10, 0.5)])
def test_lr_factor_matches_reference(warmup, max_steps, ratio):
    for s in range(max_steps + 1):
        if s < warmup:
            ref = (s + 1) / warmup
        else:
            t = (s - warmup) / max(1, max_steps - warmup)
            ref = ratio + (1 - ratio) * (1 + math.cos(math.pi * min(t, 1.0))) / 2
        assert lr_factor(s, warmup, max_steps, ratio) == pytest.approx(ref, abs=1e-12)
    if warmup < max_steps:
        assert lr_factor(max_steps, warmup, max_steps, ratio) == pytest.approx(ratio)
    if 0 < warmup < max_steps:
        assert lr_factor(0, warmup, max_steps, ratio) == pytest.approx(1 / warmup)
        assert lr_factor(warmup, warmup, max_steps, ratio) == pytest.approx(1.0)


def test_param_groups_skip_decay_for_bias_norm_and_scalars():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)
            self.emb = nn.Embedding(10, 4)
            self.logit_scale = nn.Parameter(torch.tensor(2.0))
            self.frozen = nn.Linear(4, 4).requires_grad_(False)

    groups = {g["weight_decay"]: set(g["names"]) for g in param_groups(M(), 0.1)}
    assert groups[0.1] == {"proj.weight", "emb.weight"}
    assert groups[0.0] == {"proj.bias", "norm.weight", "norm.bias", "logit_scale"}


def test_norm_detection_covers_torch_and_foreign_norms():
    class RMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4, 4))  # 2-d on purpose: only the class name exempts it

    assert is_norm_layer(nn.LayerNorm(4)) and is_norm_layer(nn.BatchNorm2d(4)) and is_norm_layer(RMSNorm())
    assert not is_norm_layer(nn.Linear(4, 4))
    model = nn.Sequential(nn.Linear(4, 4), RMSNorm())
    groups = {g["weight_decay"]: g["names"] for g in param_groups(model, 0.1)}
    assert groups == {0.1: ["0.weight"], 0.0: ["0.bias", "1.weight"]}


def test_build_optimizer_applies_config_and_schedule():
    model = nn.Linear(3, 2)
    cfg = OptimConfig(lr=0.5, warmup_steps=2, max_steps=6, min_lr_ratio=0.1, weight_decay=0.2, beta1=0.8,
                      beta2=0.9, eps=1e-6)
    opt, sched = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]
    assert opt.defaults["betas"] == (0.8, 0.9) and opt.defaults["eps"] == 1e-6
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5 * lr_factor(s, 2, 6, 0.1) for s in range(7)])


@pytest.mark.parametrize("name", ["siglip", "flair", "clip", "sparc"])
def test_logit_lr_mult_gives_the_logit_scale_and_bias_their_own_lr(name):
    """objective.logit_lr_mult: the objective's logit scale (and SigLIP / FLAIR's bias) train at
    optim.lr times it, every other parameter at optim.lr; at 1 there is no extra group."""
    from encoders.registry import build_objective, objective_config_class
    cfg = objective_config_class(name)(logit_lr_mult=10.0)
    model = nn.Module()
    model.objective = build_objective(cfg, 16, 16)
    model.proj = nn.Linear(4, 4)
    overrides = {f"objective.{k}": v for k, v in model.objective.optimizer_overrides().items()}
    opt, _ = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.1, warmup_steps=1, max_steps=10), overrides)
    fast = {n for g in opt.param_groups if g["initial_lr"] == pytest.approx(1e-2) for n in g["names"]}
    scalars = {n for n, _ in model.objective.named_parameters() if n.endswith(("log_scale", "logit_bias"))}
    assert fast == {f"objective.{n}" for n in scalars} and any("log_scale" in n for n in fast)
    assert ("objective.logit_bias" in fast) == (name in ("siglip", "flair"))
    assert all(g["initial_lr"] == pytest.approx(1e-3) for g in opt.param_groups if not set(g["names"]) & fast)
    assert objective_config_class(name)().logit_lr_mult == 1.0 and not build_objective(
        objective_config_class(name)(), 16, 16).optimizer_overrides()
