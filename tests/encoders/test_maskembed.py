"""MaskEmbed against plain loop references and the reference code (iancovert/locality-alignment):
masks, pixel blanking, targets (teacher minus its last block, then its final norm, CLS kept), the
decoder (CLS input zeroed, LayerScale 1e-6, zero-init head), the loss over all rows, the population
std calibration, the student's re-initialised final norm, the frozen teacher, export."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from encoders.maskembed import (CALIBRATION_SEED, LAYER_SCALE_INIT, MaskEmbedModel, apply_pixel_mask,
                                drop_last_blocks, expand_views, final_tokens, maskembed_loss, maskembed_targets,
                                sample_patch_masks, siglip_pooling_head)
from encoders.towers import build_vision_tower, default_transform, load_vision_tower, patch_tokens
from vlm.config import ConfigError, MaskEmbedConfig, VisionTowerConfig


def tiny_tower(arch: str = "clip") -> torch.nn.Module:
    torch.manual_seed(0)
    return build_vision_tower(VisionTowerConfig(arch=arch, image_size=16, patch_size=4, hidden_size=16,
                                                num_layers=2, num_heads=2, mlp_ratio=2)).eval()


def config_tower(arch: str, num_layers: int = 3) -> torch.nn.Module:
    """A tiny stock HF tower built straight from its config (not through encoders.towers), with its
    final norm perturbed away from (1, 0) so that applying it, or re-initialising it, is visible."""
    torch.manual_seed(1)
    common = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=num_layers, num_attention_heads=2,
                  image_size=16, patch_size=4, num_channels=3, attn_implementation="eager")
    tower = CLIPVisionModel(CLIPVisionConfig(**common)) if arch == "clip" else SiglipVisionModel(
        SiglipVisionConfig(**common))
    with torch.no_grad():
        tower.post_layernorm.weight.copy_(1 + 0.5 * torch.randn(16))
        tower.post_layernorm.bias.copy_(0.5 * torch.randn(16))
    return tower.eval()


def loop_blank(x: torch.Tensor, mask: torch.Tensor, ps: int) -> torch.Tensor:
    """Blank dropped patches one at a time (grid row-major, grid width W/ps)."""
    out = x.clone()
    gw = x.shape[3] // ps
    for i in range(x.shape[0]):
        for p in range(mask.shape[1]):
            if not mask[i, p]:
                r, c = divmod(p, gw)
                out[i, :, r * ps:(r + 1) * ps, c * ps:(c + 1) * ps] = 0
    return out


def loop_targets(tower: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor, ps: int,
                 final_norm: bool = True) -> torch.Tensor:
    """float64 reference of reference teacher_utils.convert_to_teacher_model(skip_blocks=1) + timm
    forward_features: blank in pixels, embeddings (+ CLIP pre_layrnorm), blocks 0..L-2 one by one,
    then the final norm on every token (CLS row included)."""
    tower = copy.deepcopy(tower).double()
    core = getattr(tower, "vision_model", tower)
    with torch.no_grad():
        h = core.embeddings(loop_blank(x.double(), mask, ps))
        if hasattr(core, "pre_layrnorm"):
            h = core.pre_layrnorm(h)
        layers = list(core.encoder.layers)
        for block in layers[:len(layers) - 1]:
            h = block(h, None)
            h = h[0] if isinstance(h, tuple) else h
        return core.post_layernorm(h) if final_norm else h


def test_mask_counts_cover_zero_to_p_uniformly():
    g = torch.Generator().manual_seed(0)
    masks = sample_patch_masks(6000, 5, g)
    assert masks.dtype == torch.bool and masks.shape == (6000, 5)
    counts = torch.bincount(masks.sum(1), minlength=6)
    assert counts.numel() == 6 and bool((counts > 0).all())  # 0 and P both occur
    freq = counts.double() / 6000
    assert torch.allclose(freq, torch.full((6,), 1 / 6, dtype=torch.double), atol=0.025)
    # Given the count, positions are uniform: each position kept about half the time overall.
    assert torch.allclose(masks.double().mean(0), torch.full((5,), 0.5, dtype=torch.double), atol=0.03)
    again = sample_patch_masks(6000, 5, torch.Generator().manual_seed(0))
    assert torch.equal(masks, again)


def test_expand_views_are_mask_complement_full():
    mask = sample_patch_masks(3, 4, torch.Generator().manual_seed(1))
    x = torch.randn(3, 3, 8, 8)
    pixels, views = expand_views(x, mask)
    assert pixels.shape == (9, 3, 8, 8) and views.shape == (9, 4)
    assert torch.equal(views[:3], mask) and torch.equal(views[3:6], ~mask) and bool(views[6:].all())
    assert torch.equal(views[:3] ^ views[3:6], torch.ones_like(mask))
    for v in range(3):
        assert torch.equal(pixels[v * 3:(v + 1) * 3], x)
    with pytest.raises(ValueError):
        expand_views(x, mask.float())


def test_apply_pixel_mask_matches_loop():
    torch.manual_seed(0)
    b, ps, h, w = 2, 4, 8, 12
    x = torch.randn(b, 3, h, w, dtype=torch.float64)
    mask = sample_patch_masks(b, (h // ps) * (w // ps), torch.Generator().manual_seed(2))
    got = apply_pixel_mask(x, mask, ps)
    ref = x.clone()
    for i in range(b):
        for p in range(mask.shape[1]):
            r, c = divmod(p, w // ps)
            if not mask[i, p]:
                for ch in range(3):
                    for y in range(r * ps, (r + 1) * ps):
                        for xx in range(c * ps, (c + 1) * ps):
                            ref[i, ch, y, xx] = 0.0
    assert torch.equal(got, ref)
    assert torch.equal(apply_pixel_mask(x, torch.ones_like(mask), ps), x)
    assert not apply_pixel_mask(x, torch.zeros_like(mask), ps).any()
    with pytest.raises(ValueError):
        apply_pixel_mask(x, mask[:, :-1], ps)
    with pytest.raises(ValueError):
        apply_pixel_mask(x, mask, 5)


@pytest.mark.parametrize("arch", ["clip", "siglip"])
def test_targets_match_float64_loop_reference(arch):
    """Reference: teacher_utils.convert_to_teacher_model(skip_blocks=1) -> MaskLayer (pixels times the
    mask), forward_features (blocks[:-1], then norm), every token kept (scripts/train.py uses them all)."""
    tower = config_tower(arch)
    b, p = 3, 16
    x = torch.randn(b, 3, 16, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    mask = sample_patch_masks(b, p, torch.Generator().manual_seed(3))
    ref = loop_targets(tower, x, mask, 4)
    assert ref.shape == (b, p + (1 if arch == "clip" else 0), 16)  # CLIP keeps its CLS row; SigLIP has none
    teacher = drop_last_blocks(copy.deepcopy(tower), 1).double()
    assert len(getattr(teacher, "vision_model", teacher).encoder.layers) == 2
    got = maskembed_targets(teacher, x, mask, 4, scale=2.0)
    torch.testing.assert_close(got, ref / 2.0, rtol=1e-12, atol=1e-12)
    assert not got.requires_grad
    # The model's own (float32) teacher gives the same targets.
    model = MaskEmbedModel(copy.deepcopy(tower), MaskEmbedConfig(decoder_heads=2))
    torch.testing.assert_close(model.raw_targets(x.float(), mask).double(), ref, rtol=1e-4, atol=1e-5)
    # The final norm is part of the target: without it the targets differ.
    rel = (loop_targets(tower, x, mask, 4, final_norm=False) - ref).norm() / ref.norm()
    assert rel > 0.1, float(rel)
    with pytest.raises(ValueError):
        drop_last_blocks(copy.deepcopy(tower), 3)


def test_teacher_layer_sets_skip_blocks():
    """Reference scripts/train.py --skip-blocks (default 1) == maskembed.teacher_layer -2."""
    tower = config_tower("clip", num_layers=4)
    x = torch.randn(2, 3, 16, 16)
    full = torch.ones(2, 16, dtype=torch.bool)
    for layer, depth in ((-1, 4), (-2, 3), (-3, 2)):
        model = MaskEmbedModel(copy.deepcopy(tower), MaskEmbedConfig(decoder_heads=2, teacher_layer=layer))
        assert model.skip_blocks == -1 - layer and len(model.teacher.encoder.layers) == depth
        assert len(model.student.encoder.layers) == 4 and model.student.config.num_hidden_layers == 4
        with torch.no_grad():
            hidden = tower(pixel_values=x, output_hidden_states=True).hidden_states[depth]
            torch.testing.assert_close(model.raw_targets(x, full), tower.post_layernorm(hidden))
    with pytest.raises(ConfigError, match="teacher_layer"):
        MaskEmbedConfig(teacher_layer=0)
    with pytest.raises(ConfigError, match="calibration_batches"):
        MaskEmbedConfig(calibration_batches=0)


@pytest.mark.parametrize("arch", ["clip", "siglip"])
def test_degenerate_masks_all_kept_and_none_kept(arch):
    """Reference model_utils.MaskEmbedDecoder.forward / MaskLayer: all kept = the unmasked teacher and
    the decoder sees every patch token (CLS still zeroed); none kept = the teacher on a blank image and
    a prediction that does not depend on the student."""
    tower = config_tower(arch)
    model = MaskEmbedModel(copy.deepcopy(tower), MaskEmbedConfig(decoder_heads=2))
    torch.nn.init.normal_(model.decoder.head.weight, std=0.1)
    torch.nn.init.normal_(model.student_head.weight, std=0.1)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    ones, zeros = torch.ones(2, 16, dtype=torch.bool), torch.zeros(2, 16, dtype=torch.bool)
    torch.testing.assert_close(model.raw_targets(x.float(), ones).double(), loop_targets(tower, x, ones, 4),
                               rtol=1e-4, atol=1e-5)
    blank = loop_targets(tower, torch.zeros_like(x), ones, 4)
    torch.testing.assert_close(model.raw_targets(x.float(), zeros).double(), blank, rtol=1e-4, atol=1e-5)
    assert torch.allclose(blank[0], blank[1])  # the same blank image for both
    with torch.no_grad():
        none = model.predict(x.float(), zeros)
        tokens = model.student_tokens(x.float())
        prefix = tokens.shape[1] - 16
        torch.testing.assert_close(none, model.decoder.head(model.decoder.norm(
            _blocks(model, model.decoder.pos_emb.expand(2, -1, -1)))))
        allk = model.predict(x.float(), ones)
        inp = tokens.clone()
        inp[:, :prefix] = 0
        torch.testing.assert_close(allk, model.decoder.head(model.decoder.norm(_blocks(model, inp + model.decoder.pos_emb))))
        for param in model.student.parameters():
            param.add_(0.1)
        torch.testing.assert_close(model.predict(x.float(), zeros), none)
        assert not torch.allclose(model.predict(x.float(), ones), allk)


def _blocks(model, h):
    for block in model.decoder.blocks:
        h = block(h)
    return h


def test_cls_position_enters_decoder_zeroed():
    """Reference model_utils.MaskEmbedDecoder.forward: mask padded with value=0 for prefix tokens."""
    model = MaskEmbedModel(tiny_tower("clip"), MaskEmbedConfig(decoder_heads=2))
    torch.nn.init.normal_(model.decoder.head.weight, std=0.1)
    assert model.decoder.num_prefix == 1 and model.decoder.pos_emb.shape == (1, 17, 16)
    x = torch.randn(3, 17, 16)
    keep = sample_patch_masks(3, 16, torch.Generator().manual_seed(5))
    y = x.clone()
    y[:, 0] += 100.0  # only the CLS input changes
    with torch.no_grad():
        torch.testing.assert_close(model.decoder(x, keep), model.decoder(y, keep))
        y[:, 1:] += 1.0  # patch inputs matter where kept
        assert not torch.allclose(model.decoder(x, keep | True), model.decoder(y, keep | True))
    assert model.decoder(x, keep).shape == (3, 17, 16)  # the CLS row is predicted too
    siglip = MaskEmbedModel(tiny_tower("siglip"), MaskEmbedConfig(decoder_heads=2))
    assert siglip.decoder.num_prefix == 0 and siglip.decoder.pos_emb.shape == (1, 16, 16)
    with pytest.raises(ValueError, match="prefix"):
        model.decoder(x[:, 1:], keep)


def test_decoder_layerscale_and_zero_head_predict_zero_at_init():
    """Reference scripts/train.py --decoder-init-values 1e-6 (timm Block LayerScale); METHODS.md: the
    linear head is zero-initialised, so the prediction is exactly 0 at init and loss = mean(target^2)."""
    model = make_model()
    assert len(model.decoder.blocks) == 2
    gammas = [m.gamma for blk in model.decoder.blocks for m in (blk.ls1, blk.ls2)]
    assert len(gammas) == 4 and LAYER_SCALE_INIT == 1e-6
    for gamma in gammas:
        assert gamma.shape == (16,) and torch.equal(gamma, torch.full((16,), 1e-6))
    assert not model.decoder.head.weight.any() and not model.decoder.head.bias.any()
    assert not model.student_head.weight.any() and not model.student_head.bias.any()
    x = torch.randn(2, 3, 16, 16)
    mask = sample_patch_masks(2, 16, torch.Generator().manual_seed(0))
    pixels, views = expand_views(x, mask)
    pred = model.predict(x, views)
    assert pred.shape == (6, 17, 16) and not pred.any()
    out = model({"pixel_values": x, "patch_mask": mask})
    torch.testing.assert_close(out["loss"], model.targets(pixels, views).pow(2).mean())


@pytest.mark.parametrize("arch", ["clip", "siglip"])
def test_loss_over_all_rows_matches_loop(arch):
    """Reference scripts/train.py train_one_epoch: mse_loss(reconstruction, masked_preds) over every
    element, the CLS/prefix row included."""
    model = MaskEmbedModel(tiny_tower(arch), MaskEmbedConfig(decoder_heads=2))
    model.calibrate(torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(9)))
    torch.nn.init.normal_(model.decoder.head.weight, std=0.3)
    torch.nn.init.normal_(model.student_head.weight, std=0.3)
    x = torch.randn(2, 3, 16, 16)
    mask = sample_patch_masks(2, 16, torch.Generator().manual_seed(6))
    out = model({"pixel_values": x, "patch_mask": mask})
    pixels, views = expand_views(x, mask)
    with torch.no_grad():
        pred = model.predict(x, views).double()
        target = loop_targets(tiny_tower(arch), pixels.double(), views, 4) / float(model.target_scale)
    n, t, w = target.shape
    assert t == 16 + (1 if arch == "clip" else 0)
    total = 0.0
    for i in range(n):
        for j in range(t):
            for k in range(w):
                total += (float(pred[i, j, k]) - float(target[i, j, k])) ** 2
    assert abs(float(out["loss"].detach()) - total / (n * t * w)) < 1e-4
    if arch == "clip":  # the CLS row counts
        rows = ((pred - target) ** 2).mean(dim=(0, 2))
        assert abs(total / (n * t * w) - float(rows[1:].mean())) > 1e-6
    a, b = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    with pytest.raises(ValueError):
        maskembed_loss(a, b[:, :3])


def test_calibration_is_population_std_over_batches():
    """Reference scripts/train.py get_baseline_loss: running mean and sum of squares over a pass of
    batches, variance = sum_squares / n (ddof 0), scale = 1 / sqrt; here over the first
    maskembed.calibration_batches micro-batches."""
    model = MaskEmbedModel(config_tower("clip"), MaskEmbedConfig(decoder_heads=2, calibration_batches=3))
    g = torch.Generator().manual_seed(11)
    batches = [torch.randn(n, 3, 16, 16, generator=g) * s + s for n, s in ((2, 1.0), (3, 3.0), (1, 0.5), (2, 9.0))]
    consumed = []

    def stream():
        for batch in batches:
            consumed.append(1)
            yield {"pixel_values": batch} if len(consumed) == 2 else batch

    scale = model.calibrate(stream())
    assert len(consumed) == 3  # only calibration_batches are read
    mg = torch.Generator().manual_seed(CALIBRATION_SEED)
    raws = []
    for batch in batches[:3]:
        pixels, views = expand_views(batch, sample_patch_masks(batch.shape[0], 16, mg))
        raws.append(loop_targets(config_tower("clip"), pixels.double(), views, 4).numpy().ravel())
    flat = np.concatenate(raws)
    assert abs(scale - float(np.std(flat, ddof=0))) < 2e-6 * scale
    assert abs(scale - float(np.std(flat, ddof=1))) > 1e-5 * scale  # population, not unbiased
    assert float(model.target_scale) == pytest.approx(scale)
    assert abs(float(np.std(raws[0], ddof=0)) - scale) > 1e-4 * scale  # not the first batch alone
    # One tensor is one batch; an empty stream is an error.
    one = MaskEmbedModel(config_tower("clip"), MaskEmbedConfig(decoder_heads=2))
    s1 = one.calibrate(batches[0])
    pixels, views = expand_views(batches[0], sample_patch_masks(2, 16, torch.Generator().manual_seed(CALIBRATION_SEED)))
    assert s1 == pytest.approx(float(np.std(loop_targets(config_tower("clip"), pixels.double(), views, 4).numpy(),
                                            ddof=0)), rel=2e-6)
    with pytest.raises(ValueError, match="no batches"):
        one.calibrate(iter([]))
    # Scaled calibration targets then have unit population variance.
    mg = torch.Generator().manual_seed(CALIBRATION_SEED)
    scaled = [model.targets(*expand_views(b, sample_patch_masks(b.shape[0], 16, mg))).flatten() for b in batches[:3]]
    assert abs(float(torch.cat(scaled).double().std(correction=0)) - 1.0) < 1e-5


def make_model(arch: str = "clip") -> MaskEmbedModel:
    model = MaskEmbedModel(tiny_tower(arch), MaskEmbedConfig(decoder_layers=2, decoder_heads=2))
    model.calibrate(torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(9)))
    return model


@pytest.mark.parametrize("arch", ["clip", "siglip"])
def test_student_final_norm_reinitialised_rest_equals_teacher(arch):
    """Reference student_utils.convert_to_student_model: model.norm = type(model.norm)(embed_dim);
    every other weight is the teacher's; the teacher keeps its own final norm."""
    tower = config_tower(arch)
    original = copy.deepcopy(tower)
    model = MaskEmbedModel(tower, MaskEmbedConfig(decoder_heads=2))
    assert torch.equal(model.student.post_layernorm.weight, torch.ones(16))
    assert torch.equal(model.student.post_layernorm.bias, torch.zeros(16))
    teacher_params = dict(original.named_parameters())
    for name, p in model.student.named_parameters():
        if name.startswith("post_layernorm."):
            assert not torch.equal(p, teacher_params[name])
        else:
            assert torch.equal(p, teacher_params[name]), name
    for name, p in model.teacher.named_parameters():  # the teacher: original weights, last block gone
        assert torch.equal(p, teacher_params[name]), name
    assert "encoder.layers.2.mlp.fc1.weight" in teacher_params
    assert not any(n.startswith("encoder.layers.2.") for n, _ in model.teacher.named_parameters())
    assert all(p.requires_grad for n, p in model.student.named_parameters() if not n.startswith("head."))
    assert all(not p.requires_grad for p in model.teacher.parameters())


def test_prediction_shares_one_student_pass_across_views():
    """predict(images [B], views [3B]) equals running the student on every view's copy of its image
    (reference MaskEmbedStudent.forward repeats the encoder's output per mask)."""
    torch.manual_seed(0)
    model = MaskEmbedModel(tiny_tower(), MaskEmbedConfig(decoder_heads=2))
    torch.nn.init.normal_(model.student_head.weight, std=0.1)  # non-zero heads, so the student matters
    torch.nn.init.normal_(model.decoder.head.weight, std=0.1)
    x = torch.randn(2, 3, 16, 16)
    pixels, views = expand_views(x, sample_patch_masks(2, 16, torch.Generator().manual_seed(3)))
    shared = model.predict(x, views)
    per_view = model.decoder(model.student_head(final_tokens(model.student, pixels)), views)
    torch.testing.assert_close(shared, per_view)
    with pytest.raises(ValueError, match="whole number"):
        model.predict(x, views[:5])


def test_forward_requires_calibration():
    model = MaskEmbedModel(tiny_tower(), MaskEmbedConfig(decoder_heads=2))
    with pytest.raises(RuntimeError, match="calibrate"):
        model({"pixel_values": torch.randn(2, 3, 16, 16)})
    with pytest.raises(ValueError, match="divisible"):
        MaskEmbedModel(tiny_tower(), MaskEmbedConfig(decoder_heads=3))


@pytest.mark.parametrize("arch", ["clip", "siglip"])
def test_teacher_gets_no_gradient_and_never_changes(arch):
    model = make_model(arch)
    model.train()
    assert not model.teacher.training and model.student.training
    before = {n: p.detach().clone() for n, p in model.teacher.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    losses = []
    x = torch.randn(4, 3, 16, 16, generator=g)
    for _ in range(4):
        batch = {"pixel_values": x, "patch_mask": sample_patch_masks(4, 16, g)}
        out = model(batch)
        out["loss"].backward()
        assert all(p.grad is None for p in model.teacher.parameters())
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out["loss"].detach()))
    for n, p in model.teacher.named_parameters():
        assert torch.equal(p, before[n]), n
    assert any(not torch.equal(p, before[n]) for n, p in model.student.named_parameters() if n in before)
    assert all(torch.isfinite(torch.tensor(losses)))


def test_exported_student_loads_with_stock_transformers(tmp_path):
    model = make_model()
    with torch.no_grad():
        model.student.encoder.layers[0].mlp.fc1.weight.add_(0.1)  # make it differ from the teacher
    transform = default_transform(model.teacher)
    model.transform = transform
    out = model.save_pretrained(tmp_path / "student")
    stock = CLIPVisionModel.from_pretrained(str(out)).eval()
    assert stock.config.num_hidden_layers == 2 and len(stock.encoder.layers) == 2  # the full student
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(patch_tokens(stock, x), patch_tokens(model.student.eval(), x))
        torch.testing.assert_close(final_tokens(stock, x), final_tokens(model.student, x))
    tower, loaded_transform = load_vision_tower(out)
    assert loaded_transform.image_size == 16 and loaded_transform.mean == transform.mean


def test_siglip_student_pooling_head_is_frozen():
    model = make_model("siglip")
    assert isinstance(model.student, SiglipVisionModel)
    assert all(not p.requires_grad for p in siglip_pooling_head(model.student).parameters())
