"""MaskEmbed: masks, pixel blanking and targets against loop references; the frozen teacher; export."""
from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionModel, SiglipVisionModel

from encoders.maskembed import (MaskEmbedModel, siglip_pooling_head, apply_pixel_mask, expand_views, maskembed_loss,
                                maskembed_targets, sample_patch_masks, teacher_layer_tokens)
from encoders.towers import build_vision_tower, default_transform, load_vision_tower, patch_tokens
from vlm.config import MaskEmbedConfig, VisionTowerConfig


def tiny_tower(arch: str = "clip") -> torch.nn.Module:
    torch.manual_seed(0)
    return build_vision_tower(VisionTowerConfig(arch=arch, image_size=16, patch_size=4, hidden_size=16,
                                                num_layers=2, num_heads=2, mlp_ratio=2)).eval()


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
def test_targets_match_reference(arch):
    tower = tiny_tower(arch)
    x = torch.randn(2, 3, 16, 16)
    mask = sample_patch_masks(2, 16, torch.Generator().manual_seed(3))
    got = maskembed_targets(tower, x, mask, 4, layer=-2, scale=2.0)
    # Reference: blank patch by patch, run the teacher, take block L-1's output, drop CLS.
    blanked = x.clone()
    for i in range(2):
        for p in range(16):
            if not mask[i, p]:
                r, c = divmod(p, 4)
                blanked[i, :, r * 4:(r + 1) * 4, c * 4:(c + 1) * 4] = 0
    with torch.no_grad():
        hidden = tower(pixel_values=blanked, output_hidden_states=True).hidden_states
    assert len(hidden) == 3  # embeddings + 2 blocks: -2 is the penultimate block's output
    ref = hidden[1] if arch == "siglip" else hidden[1][:, 1:]
    torch.testing.assert_close(got, ref / 2.0)
    assert got.shape == (2, 16, 16) and not got.requires_grad
    with pytest.raises(ValueError):
        teacher_layer_tokens(tower, x, 5)


def test_loss_is_mse():
    a, b = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    ref = sum(float(a[i, j, k] - b[i, j, k]) ** 2 for i in range(3) for j in range(4) for k in range(5)) / 60
    assert abs(float(maskembed_loss(a, b)) - ref) < 1e-5
    with pytest.raises(ValueError):
        maskembed_loss(a, b[:, :3])


def make_model(arch: str = "clip") -> MaskEmbedModel:
    model = MaskEmbedModel(tiny_tower(arch), MaskEmbedConfig(decoder_layers=2, decoder_heads=2))
    model.calibrate(torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(9)))
    return model


def test_structure_calibration_and_shapes():
    model = make_model()
    assert all(not p.requires_grad for p in model.teacher.parameters())
    assert all(p.requires_grad for p in model.student.parameters())
    assert not bool(model.student_head.weight.any()) and not bool(model.student_head.bias.any())
    for (n, p), (_, q) in zip(model.student.named_parameters(), model.teacher.named_parameters()):
        assert torch.equal(p, q), n  # student initialised from the teacher
    assert len(model.decoder.blocks) == 2
    x = torch.randn(3, 3, 16, 16)
    full = torch.ones(3, 16, dtype=torch.bool)
    target = model.targets(x, full)
    with torch.no_grad():
        raw = model.teacher(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(target, raw / model.target_scale)  # all-ones mask: the unmasked teacher
    pred = model.predict(x, full)
    assert pred.shape == target.shape == (3, 16, 16)
    # Calibration makes the calibration batch's targets unit-variance.
    cal = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(1234)
    pixels, views = expand_views(cal, sample_patch_masks(4, 16, g))
    assert abs(float(model.targets(pixels, views).std()) - 1.0) < 1e-4
    # The zero head means the prediction does not depend on the student at init.
    torch.testing.assert_close(pred, model.decoder(torch.zeros_like(pred)))


def test_prediction_shares_one_student_pass_across_views():
    """predict(images [B], views [3B]) equals running the student on every view's copy of its image."""
    torch.manual_seed(0)
    model = MaskEmbedModel(tiny_tower(), MaskEmbedConfig(decoder_heads=2))
    torch.nn.init.normal_(model.student_head.weight, std=0.1)  # a non-zero head, so the student matters
    x = torch.randn(2, 3, 16, 16)
    pixels, views = expand_views(x, sample_patch_masks(2, 16, torch.Generator().manual_seed(3)))
    shared = model.predict(x, views)
    per_view = model.decoder(model.student_head(patch_tokens(model.student, pixels)) * views.unsqueeze(-1).float())
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
    assert any(not torch.equal(p, before[n]) for n, p in model.student.named_parameters())
    assert all(torch.isfinite(torch.tensor(losses)))


def test_exported_student_loads_with_stock_transformers(tmp_path):
    model = make_model()
    with torch.no_grad():
        model.student.encoder.layers[0].mlp.fc1.weight.add_(0.1)  # make it differ from the teacher
    transform = default_transform(model.teacher)
    model.transform = transform
    out = model.save_pretrained(tmp_path / "student")
    stock = CLIPVisionModel.from_pretrained(str(out)).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(patch_tokens(stock, x), patch_tokens(model.student.eval(), x))
    tower, loaded_transform = load_vision_tower(out)
    assert loaded_transform.image_size == 16 and loaded_transform.mean == transform.mean


def test_siglip_student_pooling_head_is_frozen():
    model = make_model("siglip")
    assert isinstance(model.student, SiglipVisionModel)
    assert all(not p.requires_grad for p in siglip_pooling_head(model.student).parameters())
