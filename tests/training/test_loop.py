"""The shared training loop on tiny CPU models: convergence, schedule, accumulation, clipping, NaN guard, logging."""
import itertools
import json
import math

import pytest
import torch
from torch import nn

from training.data import ResumableBatches
from training.loop import NonFiniteLossError, train
from training.optim import lr_factor
from vlm.config import OptimConfig, RunConfig

torch.set_num_threads(1)


def regression_data(n=128, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, 1, generator=g)
    return x, x @ w + 0.01 * torch.randn(n, 1, generator=g)


class Linear(nn.Module):
    def __init__(self, d=6, scale=1.0):
        super().__init__()
        torch.manual_seed(1)
        self.lin = nn.Linear(d, 1)
        self.scale = scale

    def forward(self, batch):
        err = self.lin(batch["x"]) * self.scale - batch["y"] * self.scale
        loss = (err ** 2).mean()
        return {"loss": loss, "abs_err": err.abs().mean().detach(), "num_tokens": batch["x"].shape[0] * 3}


def run_cfg(tmp_path, **kw):
    base = dict(out_dir=str(tmp_path / "run"), log_every=5, ckpt_every=1000, tensorboard=False, progress=False,
                device="cpu")
    base.update(kw)
    return RunConfig(**base)


def test_loss_decreases_and_outputs_written(tmp_path):
    x, y = regression_data()
    batches = ResumableBatches(len(x), 16, lambda ids: {"x": x[ids], "y": y[ids]}, seed=0)
    optim = OptimConfig(lr=0.1, warmup_steps=5, max_steps=60, batch_size=16, weight_decay=0.0)
    exported = {}

    class Exported(Linear):
        def save_pretrained(self, d):
            exported["is_plain"] = type(self) is Exported
            (d / "weights.txt").write_text(str(self.lin.weight.tolist()))

    res = train(Exported(), batches, optim, run_cfg(tmp_path, tensorboard=True), config=optim)
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(5, 61, 5))
    assert rows[-1]["loss"] < 0.05 * rows[0]["loss"]
    assert res.step == 60 and res.loss == pytest.approx(rows[-1]["loss"])
    assert res.history == rows
    for key in ("lr", "loss", "abs_err", "samples_per_s", "tokens_per_s", "grad_norm"):
        assert key in rows[0]
    assert "num_tokens" not in rows[0]
    assert exported["is_plain"] and (res.final_dir / "weights.txt").is_file()
    assert res.final_dir == tmp_path / "run" / "final"
    assert (tmp_path / "run" / "config.yaml").read_text().startswith("lr:")
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    assert (tmp_path / "run" / "checkpoints" / "step_00000060" / "meta.json").is_file()


def test_logged_lr_follows_schedule(tmp_path):
    x, y = regression_data()
    batches = ResumableBatches(len(x), 8, lambda ids: {"x": x[ids], "y": y[ids]})
    optim = OptimConfig(lr=0.01, warmup_steps=4, max_steps=12, min_lr_ratio=0.2)
    res = train(Linear(), batches, optim, run_cfg(tmp_path, log_every=1))
    for row in res.history:  # the row of step s reports the lr used by optimiser step s (0-based s - 1)
        assert row["lr"] == pytest.approx(0.01 * lr_factor(row["step"] - 1, 4, 12, 0.2), rel=1e-9)


def _final_params(tmp_path, name, batch_size, accum, big):
    x, y = big
    if accum == 1:
        make = ResumableBatches(len(x), batch_size, lambda ids: {"x": x[ids], "y": y[ids]}, shuffle=False)
    else:
        whole = ResumableBatches(len(x), batch_size * accum, lambda ids: ids, shuffle=False)

        def make(start):
            def halves():
                for ids in whole(0):
                    for k in range(accum):
                        part = ids[k * batch_size:(k + 1) * batch_size]
                        yield {"x": x[part], "y": y[part]}
            return itertools.islice(halves(), start, None)
    model = Linear()
    optim = OptimConfig(lr=0.02, warmup_steps=2, max_steps=8, grad_accum=accum, grad_clip=0.0, weight_decay=0.1)
    train(model, make, optim, run_cfg(tmp_path / name))
    return [p.detach().clone() for p in model.parameters()]


def test_grad_accumulation_equals_big_batch(tmp_path):
    data = regression_data(n=96)
    big = _final_params(tmp_path, "big", batch_size=16, accum=1, big=data)
    acc = _final_params(tmp_path, "acc", batch_size=8, accum=2, big=data)
    for a, b in zip(big, acc):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert not torch.equal(big[0], Linear().lin.weight.detach())  # it trained


def test_clipping_bounds_the_update_gradient(tmp_path, monkeypatch):
    seen = []
    original = torch.optim.AdamW.step

    def recording_step(self, *a, **kw):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return original(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    x, y = regression_data()
    batches = ResumableBatches(len(x), 16, lambda ids: {"x": x[ids], "y": y[ids]})
    res = train(Linear(scale=30.0), batches, OptimConfig(lr=1e-3, max_steps=3, warmup_steps=0, grad_clip=0.5),
                run_cfg(tmp_path / "clip", log_every=1))
    assert all(n == pytest.approx(0.5, rel=1e-5) for n in seen)
    assert all(r["grad_norm"] > 0.5 for r in res.history)  # the logged norm is the pre-clip one
    seen.clear()
    res = train(Linear(scale=30.0), batches, OptimConfig(lr=1e-3, max_steps=3, warmup_steps=0, grad_clip=0.0),
                run_cfg(tmp_path / "noclip", log_every=1))
    assert all(n > 10 for n in seen)
    assert "grad_norm" not in res.history[0]


class NanAt(nn.Module):
    """Finite loss until its ``bad_call``-th forward, then NaN."""

    def __init__(self, bad_call):
        super().__init__()
        self.lin = nn.Linear(6, 1)
        self.calls, self.bad_call = 0, bad_call

    def forward(self, batch):
        self.calls += 1
        loss = ((self.lin(batch["x"]) - batch["y"]) ** 2).mean()
        aux = loss * 0.5
        if self.calls == self.bad_call:
            loss = loss * float("nan")
        return {"loss": loss, "aux": aux}


def test_nan_guard_names_step_and_terms_and_keeps_good_state(tmp_path):
    x, y = regression_data()
    batches = ResumableBatches(len(x), 8, lambda ids: {"x": x[ids], "y": y[ids]})
    model = NanAt(bad_call=7)  # grad_accum 2: calls 7, 8 form optimiser step 4
    with pytest.raises(NonFiniteLossError, match=r"step 4\b") as err:
        train(model, batches, OptimConfig(max_steps=10, grad_accum=2, warmup_steps=0),
              run_cfg(tmp_path, ckpt_every=1))
    assert "loss=nan" in str(err.value) and "aux=" in str(err.value)
    assert "lower optim.lr or optim.grad_clip" in str(err.value)  # clipping is on by default
    assert err.value.step == 4 and math.isnan(err.value.terms["loss"])
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step_00000002", "step_00000003"]  # keep_last=2; nothing after the bad step
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_hint_suggests_enabling_clipping_when_it_is_off(tmp_path):
    x, y = regression_data()
    batches = ResumableBatches(len(x), 8, lambda ids: {"x": x[ids], "y": y[ids]})
    with pytest.raises(NonFiniteLossError, match="enable optim.grad_clip") as err:
        train(NanAt(bad_call=2), batches, OptimConfig(max_steps=3, warmup_steps=0, grad_clip=0.0),
              run_cfg(tmp_path))
    assert err.value.step == 2


def test_existing_checkpoints_without_resume_is_an_error(tmp_path):
    x, y = regression_data()
    batches = ResumableBatches(len(x), 8, lambda ids: {"x": x[ids], "y": y[ids]})
    optim = OptimConfig(max_steps=3, warmup_steps=0)
    class Saves(Linear):
        text = "1"

        def save_pretrained(self, d):
            (d / "x").write_text(self.text)

    train(Saves(), batches, optim, run_cfg(tmp_path))
    with pytest.raises(FileExistsError, match=r"resume.*new run.out_dir|--resume"):
        train(Linear(), batches, optim, run_cfg(tmp_path))
    # resume of a finished run trains nothing and re-exports
    Saves.text = "2"
    res = train(Saves(), batches, optim, run_cfg(tmp_path, resume=True))
    assert res.step == 3 and (res.final_dir / "x").read_text() == "2"


def test_bad_model_outputs_and_frozen_models_fail_clearly(tmp_path):
    x, y = regression_data()
    batches = ResumableBatches(len(x), 8, lambda ids: {"x": x[ids], "y": y[ids]})

    class NoLoss(Linear):
        def forward(self, batch):
            return {"mse": super().forward(batch)["loss"]}

    with pytest.raises(TypeError, match="'loss'"):
        train(NoLoss(), batches, OptimConfig(max_steps=2, warmup_steps=0), run_cfg(tmp_path / "a"))
    frozen = Linear().requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        train(frozen, batches, OptimConfig(max_steps=2, warmup_steps=0), run_cfg(tmp_path / "b"))


def test_after_optimizer_step_hook_clamps_the_logit_scale(tmp_path):
    """The loop calls model.after_optimizer_step() after each optimizer step: a step that pushes the
    learned logit scale past its bound is followed by the in-place clamp (open_clip's
    ``logit_scale.clamp_(0, math.log(100))`` after ``optimizer.step()``), never a clamp in forward."""
    from encoders.objectives.clip import ClipConfig, ClipObjective

    class ScaleUp(nn.Module):
        def __init__(self):
            super().__init__()
            self.objective = ClipObjective(ClipConfig(max_logit_scale=30.0), embed_dim=2, vision_width=2)
            self.before_clamp = []

        def forward(self, batch):
            scale = self.objective.logit_scale()
            return {"loss": -scale * batch["x"].mean(), "logit_scale": scale.detach()}

        def after_optimizer_step(self):
            self.before_clamp.append(self.objective.logit_scale.log_scale.item())
            self.objective.after_optimizer_step()

    x = torch.ones(16, 1)
    batches = ResumableBatches(len(x), 4, lambda ids: {"x": x[ids]}, seed=0)
    model = ScaleUp()
    res = train(model, batches, OptimConfig(lr=1.0, warmup_steps=0, max_steps=3, weight_decay=0.0, grad_clip=0.0),
                run_cfg(tmp_path, log_every=1))
    bound = math.log(30.0)
    assert len(model.before_clamp) == 3 and all(v > bound + 0.1 for v in model.before_clamp)  # pushed past it
    assert model.objective.logit_scale.log_scale.item() == pytest.approx(bound)               # clamped after
    logged = [row["logit_scale"] for row in res.history]
    assert logged[0] == pytest.approx(1 / 0.07, rel=1e-5)
    assert logged[1:] == pytest.approx([30.0, 30.0], rel=1e-5)  # every forward after a step sees the bound


@pytest.mark.parametrize("cpu_bf16", [False, True])
def test_cpu_bf16_autocasts_the_forward_only_when_asked(tmp_path, cpu_bf16):
    x, y = regression_data(n=32)
    seen = []

    class Probe(Linear):
        def forward(self, batch):
            seen.append((torch.is_autocast_enabled("cpu"), self.lin(batch["x"]).dtype))
            return super().forward(batch)

    batches = ResumableBatches(len(x), 8, lambda ids: {"x": x[ids], "y": y[ids]})
    optim = OptimConfig(lr=0.01, warmup_steps=1, max_steps=2)
    train(Probe(), batches, optim, run_cfg(tmp_path, cpu_bf16=cpu_bf16))
    expected = (True, torch.bfloat16) if cpu_bf16 else (False, torch.float32)
    assert seen and all(s == expected for s in seen)
