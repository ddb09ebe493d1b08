"""SPARC: every step against float64 loop references, with padding and degenerate tokens."""
import math

import pytest
import torch

from encoders.features import ImageFeatures, TextFeatures
from encoders.objectives.clip import clip_loss
from encoders.objectives.sparc import (SparcConfig, SparcObjective, sparc_alignment_weights,
                                       sparc_fine_grained_loss, sparc_grouped_embeddings, sparc_loss,
                                       sparc_similarity)


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def unit(v):
    n = math.sqrt(dot(v, v))
    return [x / max(n, 1e-12) for x in v]  # as F.normalize: a zero vector stays zero


def loop_weights(patches, tokens, mask, sigma):
    """Alignment weights of one pair: patches [P][d], tokens [L][d], mask [L] -> [L][P]."""
    out = []
    for j, t in enumerate(tokens):
        if not mask[j]:
            out.append([0.0] * len(patches))
            continue
        s = [dot(t, v) for v in patches]
        lo, hi = min(s), max(s)
        # The paper's min-max normalisation; a zero range (all patches tie) makes every patch the best.
        norm = [(x - lo) / (hi - lo) for x in s] if hi > lo else [1.0] * len(s)
        sparse = [x if x >= sigma else 0.0 for x in norm]
        total = sum(sparse)
        out.append([x / total for x in sparse])
    return out


def loop_fine_loss(patch_emb, token_emb, token_mask, tau, sigma, directions=("c2t", "t2c")):
    b, p = patch_emb.shape[:2]
    total = 0.0
    for i in range(b):
        patches, mask = patch_emb[i].tolist(), token_mask[i].tolist()
        real = [j for j in range(len(mask)) if mask[j]]
        tokens = token_emb[i].tolist()
        weights = loop_weights(patches, tokens, mask, sigma)
        grouped = {j: unit([sum(weights[j][k] * patches[k][e] for k in range(p)) for e in range(len(patches[0]))])
                   for j in real}
        tnorm = {j: unit(tokens[j]) for j in real}
        logit = {(j, r): dot(grouped[j], tnorm[r]) / tau for j in real for r in real}
        caption = 0.0
        for j in real:
            c2t = logit[j, j] - math.log(sum(math.exp(logit[j, r]) for r in real))
            t2c = logit[j, j] - math.log(sum(math.exp(logit[r, j]) for r in real))
            caption += (c2t if "c2t" in directions else 0.0) + (t2c if "t2c" in directions else 0.0)
        total += caption / len(real)
    return -total / (2 * b)


def random_case(seed, b=3, p=6, l=5, d=4):
    g = torch.Generator().manual_seed(seed)
    patch = torch.randn(b, p, d, generator=g, dtype=torch.float64)
    token = torch.randn(b, l, d, generator=g, dtype=torch.float64)
    lengths = [l, 1, max(2, l - 2)][:b] + [l] * max(0, b - 3)
    mask = torch.zeros(b, l, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    return patch, token, mask


def test_similarity_loop():
    patch, token, _ = random_case(0)
    got = sparc_similarity(patch, token)
    assert got.shape == (3, 5, 6)
    for i in range(3):
        for j in range(5):
            for k in range(6):
                assert got[i, j, k].item() == pytest.approx(dot(token[i, j].tolist(), patch[i, k].tolist()), rel=1e-12)


@pytest.mark.parametrize("threshold", [None, 0.0, 0.3, 0.75, 1.0])
def test_alignment_weights_loop(threshold):
    patch, token, mask = random_case(1)
    got = sparc_alignment_weights(patch, token, mask, threshold)
    sigma = 1 / patch.shape[1] if threshold is None else threshold
    for i in range(patch.shape[0]):
        ref = loop_weights(patch[i].tolist(), token[i].tolist(), mask[i].tolist(), sigma)
        assert torch.allclose(got[i], torch.tensor(ref, dtype=torch.float64), atol=1e-12)
    real_rows = got[mask]
    assert torch.allclose(real_rows.sum(-1), torch.ones(len(real_rows), dtype=torch.float64))
    assert (got[~mask] == 0).all()
    # every real token keeps its best patch
    best = sparc_similarity(patch, token).argmax(-1)
    assert (got.gather(-1, best.unsqueeze(-1)).squeeze(-1)[mask] > 0).all()


def test_threshold_one_is_argmax_and_zero_keeps_all_but_min():
    patch, token, mask = random_case(2)
    sim = sparc_similarity(patch, token)
    one_hot = sparc_alignment_weights(patch, token, mask, threshold=1.0)
    expected = torch.nn.functional.one_hot(sim.argmax(-1), patch.shape[1]).double() * mask.unsqueeze(-1)
    assert torch.equal(one_hot, expected)
    dense = sparc_alignment_weights(patch, token, mask, threshold=0.0)
    # Without the old epsilon shift (s - min + eps) / (max - min + eps) the worst patch normalises to
    # exactly 0: kept by sigma = 0 but with weight 0; every other patch has a positive weight.
    sim_min = sim.argmin(-1, keepdim=True)
    assert (dense.gather(-1, sim_min).squeeze(-1) == 0).all()
    assert ((dense > 0).sum(-1)[mask] == patch.shape[1] - 1).all()


def test_min_max_is_the_papers_without_an_epsilon_shift():
    """sims [0, 1, 2, 3] -> ŝ = [0, 1/3, 2/3, 1] exactly; sigma = 1/4 drops the first -> [0, 1, 2, 3] / 6."""
    patch = torch.tensor([[[0.0], [1.0], [2.0], [3.0]]], dtype=torch.float64)
    token = torch.tensor([[[1.0]]], dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.bool)
    got = sparc_alignment_weights(patch, token, mask)
    assert torch.allclose(got[0, 0], torch.tensor([0.0, 1 / 6, 2 / 6, 3 / 6], dtype=torch.float64), rtol=0, atol=1e-15)
    # sigma = 0.4 drops ŝ = 1/3 as well -> [0, 0, 2/3, 1] / (5/3)
    got = sparc_alignment_weights(patch, token, mask, threshold=0.4)
    assert torch.allclose(got[0, 0], torch.tensor([0.0, 0.0, 0.4, 0.6], dtype=torch.float64), rtol=0, atol=1e-15)


def degenerate_case(seed):
    """B = 3 with padding (lengths 5, 1, 3), pair 0 token 1 a zero vector (all its similarities 0)
    and pair 2 with identical patches (every token's similarities tie): zero min-max ranges."""
    patch, token, mask = random_case(seed)
    token, patch = token.clone(), patch.clone()
    token[0, 1] = 0.0
    patch[2] = patch[2, :1].expand_as(patch[2])
    return patch, token, mask


def test_zero_range_gives_uniform_weights_against_the_loop_reference():
    """Float64 loop reference from the paper's equations (sigma = 1/P, B > 1, padded tokens), with
    tokens whose similarities are all equal: the zero-range guard gives them uniform weights 1/P
    (every patch ties as the best, ŝ = 1), the only defined reading of "every token keeps its best patch"."""
    patch, token, mask = degenerate_case(3)
    p = patch.shape[1]
    weights = sparc_alignment_weights(patch, token, mask)
    for i in range(patch.shape[0]):
        ref = loop_weights(patch[i].tolist(), token[i].tolist(), mask[i].tolist(), 1 / p)
        assert torch.allclose(weights[i], torch.tensor(ref, dtype=torch.float64), rtol=0, atol=1e-12)
    uniform = torch.full((p,), 1 / p, dtype=torch.float64)
    assert torch.allclose(weights[0, 1], uniform, rtol=0, atol=1e-15)
    for j in range(3):  # every real token of pair 2
        assert torch.allclose(weights[2, j], uniform, rtol=0, atol=1e-15)
    assert (weights[~mask] == 0).all() and torch.isfinite(weights).all()
    assert torch.allclose(weights[mask].sum(-1), torch.ones(int(mask.sum()), dtype=torch.float64))


def test_zero_range_loss_matches_loop_and_has_finite_gradients():
    patch, token, mask = degenerate_case(3)
    patch.requires_grad_(True)
    token.requires_grad_(True)
    loss = sparc_fine_grained_loss(patch, token, mask, 0.1)
    ref = loop_fine_loss(patch.detach(), token.detach(), mask, 0.1, 1 / patch.shape[1])
    assert loss.item() == pytest.approx(ref, rel=1e-9)
    loss.backward()
    assert torch.isfinite(token.grad).all() and torch.isfinite(patch.grad).all()


def test_grouped_embeddings_loop():
    patch, token, mask = random_case(4)
    weights = sparc_alignment_weights(patch, token, mask)
    got = sparc_grouped_embeddings(patch, weights)
    for i in range(3):
        for j in range(5):
            ref = [sum(weights[i, j, k].item() * patch[i, k, e].item() for k in range(6)) for e in range(4)]
            assert got[i, j].tolist() == pytest.approx(ref, rel=1e-12, abs=1e-14)


@pytest.mark.parametrize("seed,tau,threshold", [(5, 0.07, None), (6, 1.0, 0.5), (7, 0.2, 0.0)])
def test_fine_grained_loss_loop(seed, tau, threshold):
    patch, token, mask = random_case(seed, b=4, p=5, l=6, d=3)
    got = sparc_fine_grained_loss(patch, token, mask, tau, threshold)
    sigma = 1 / 5 if threshold is None else threshold
    assert got.item() == pytest.approx(loop_fine_loss(patch, token, mask, tau, sigma), rel=1e-9)


def test_each_softmax_direction_matters():
    """The loss is the sum of both directions, which differ: neither alone matches it."""
    patch, token, mask = random_case(8, b=2, p=4, l=4, d=3)
    full = sparc_fine_grained_loss(patch, token, mask, 0.5).item()
    c2t = loop_fine_loss(patch, token, mask, 0.5, 0.25, directions=("c2t",))
    t2c = loop_fine_loss(patch, token, mask, 0.5, 0.25, directions=("t2c",))
    assert abs(c2t - t2c) > 1e-3
    assert full == pytest.approx(c2t + t2c, rel=1e-9)
    # a caption of one real token: both softmaxes are over one element, the loss is exactly zero
    single = torch.zeros(2, 4, dtype=torch.bool)
    single[:, 0] = True
    assert sparc_fine_grained_loss(patch, token, single, 0.5).item() == pytest.approx(0.0, abs=1e-12)


def test_padding_content_is_ignored():
    patch, token, mask = random_case(9)
    other = token.clone()
    other[~mask] = torch.randn(int((~mask).sum()), token.shape[-1], dtype=torch.float64) * 100
    a = sparc_fine_grained_loss(patch, token, mask, 0.1)
    b = sparc_fine_grained_loss(patch, other, mask, 0.1)
    assert a.item() == pytest.approx(b.item(), rel=1e-12)


def test_bad_inputs():
    patch, token, mask = random_case(10)
    empty = mask.clone()
    empty[0] = False
    with pytest.raises(ValueError, match="at least one real token"):
        sparc_fine_grained_loss(patch, token, empty, 0.1)
    with pytest.raises(ValueError, match="threshold"):
        sparc_alignment_weights(patch, token, mask, threshold=1.5)
    with pytest.raises(ValueError, match="token_mask"):
        sparc_alignment_weights(patch, token, mask[:, :2])
    with pytest.raises(ValueError, match="batch size"):
        sparc_alignment_weights(patch[:2], token, mask)


def test_sparc_total_and_objective():
    patch, token, mask = random_case(11)
    g = torch.Generator().manual_seed(11)
    img_g, txt_g = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    out = sparc_loss(img_g, txt_g, patch, token, mask, 20.0, lambda_global=0.5, lambda_fine=2.0)
    glob = clip_loss(img_g, txt_g, 20.0).item()
    fine = loop_fine_loss(patch, token, mask, 1 / 20.0, 1 / 6)
    assert out["loss_global"].item() == pytest.approx(glob, rel=1e-10)
    assert out["loss_fine"].item() == pytest.approx(fine, rel=1e-9)
    assert out["loss"].item() == pytest.approx(0.5 * glob + 2.0 * fine, rel=1e-9)

    cfg = SparcConfig(init_temperature=0.05, lambda_global=0.5, lambda_fine=2.0)
    obj = SparcObjective(cfg, embed_dim=4, vision_width=7).double()
    img = ImageFeatures(img_g, patch, torch.randn(3, 6, 7, dtype=torch.float64))
    txt = TextFeatures(txt_g, token, mask)
    terms = obj(img, txt, {})
    assert set(terms) == {"loss", "loss_global", "loss_fine", "logit_scale"}
    # the scale parameter is stored as float32 log(20), hence the looser tolerance
    assert terms["loss"].item() == pytest.approx(out["loss"].item(), rel=1e-6)
