"""FLAIR: pooling, text-conditioned and multi-positive sigmoid losses against loop references;
sub-caption sampling properties."""
import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from encoders.features import ImageFeatures, TextFeatures
from encoders.objectives.flair import (FlairConfig, FlairObjective, TextConditionedPooling, flair_loss, flair_mps_loss,
                                       flair_tcs_loss, sample_subcaptions, split_sentences)


def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def cosine(a, b):
    a, b = a.tolist(), b.tolist()
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def loop_pool(pool, text, patches):
    """One text [d] pooling one image's patches [P, w], head by head, with the zero attention slot."""
    attn = pool.attn
    d, heads = attn.embed_dim, attn.num_heads
    dh = d // heads
    q = attn.q_proj_weight @ pool.ln_q(text) + attn.in_proj_bias[:d]
    k = pool.ln_k(patches) @ attn.k_proj_weight.T + attn.in_proj_bias[d:2 * d]
    v = pool.ln_v(patches) @ attn.v_proj_weight.T + attn.in_proj_bias[2 * d:]
    out = []
    for h in range(heads):
        sl = slice(h * dh, (h + 1) * dh)
        scores = [float(q[sl] @ k[p, sl]) / math.sqrt(dh) for p in range(len(patches))] + [0.0]  # zero key
        m = max(scores)
        e = [math.exp(s - m) for s in scores]
        w = [x / sum(e) for x in e]
        out.append(sum(w[p] * v[p, sl] for p in range(len(patches))))  # the zero value adds nothing
    return attn.out_proj(torch.cat(out))


def make_pool(d=8, w=6, heads=2, seed=0):
    torch.manual_seed(seed)
    pool = TextConditionedPooling(d, w, heads).double()
    for ln in (pool.ln_q, pool.ln_k, pool.ln_v):  # non-trivial affine parameters
        torch.nn.init.normal_(ln.weight, 1.0, 0.2)
        torch.nn.init.normal_(ln.bias, 0.0, 0.2)
    return pool


def case(seed, b=3, k=2, p=4, d=8, w=6):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    neg = torch.randint(0, k, (b, b), generator=g)
    return r(b, d), r(b, p, w), r(b, k, d), neg


def test_pooling_matches_per_head_loop():
    pool = make_pool()
    _, patches, sub, _ = case(0)
    got = pool(sub, patches)                                # [B, K, d]
    assert got.shape == sub.shape
    with torch.no_grad():
        for i in range(sub.shape[0]):
            for j in range(sub.shape[1]):
                assert torch.allclose(got[i, j], loop_pool(pool, sub[i, j], patches[i]), atol=1e-12)


def loop_tcs(pool, patches, sub, neg, t, bias):
    b, k, _ = sub.shape
    total = 0.0
    with torch.no_grad():
        for i in range(b):
            texts = [(sub[i, m], 1.0) for m in range(k)] + [(sub[j, neg[i, j]], -1.0) for j in range(b) if j != i]
            assert len(texts) == b + k - 1
            row = 0.0
            for text, z in texts:
                pooled = loop_pool(pool, text, patches[i])
                row += log_sigmoid(z * (t * cosine(pooled, text) + bias))
            total += -row / len(texts)
    return total / b


def loop_mps(img, sub, t, bias):
    b, k, _ = sub.shape
    total = 0.0
    for i in range(b):
        for j in range(b):
            for m in range(k):
                z = 1.0 if i == j else -1.0
                total += log_sigmoid(z * (t * cosine(img[i], sub[j, m]) + bias))
    return -total / (b * k)


@pytest.mark.parametrize("b,k", [(1, 3), (3, 2), (4, 3)])
def test_tcs_loop(b, k):
    pool = make_pool(seed=b)
    _, patches, sub, neg = case(b * 10 + k, b=b, k=k)
    got = flair_tcs_loss(patches, sub, pool, 5.0, -2.0, neg_index=neg)
    assert got.item() == pytest.approx(loop_tcs(pool, patches, sub, neg, 5.0, -2.0), rel=1e-10)


def test_tcs_negatives_follow_neg_index():
    pool = make_pool()
    _, patches, sub, neg = case(3, b=3, k=3)
    other = (neg + 1) % 3
    a = flair_tcs_loss(patches, sub, pool, 5.0, -2.0, neg_index=neg)
    c = flair_tcs_loss(patches, sub, pool, 5.0, -2.0, neg_index=other)
    assert abs(a.item() - c.item()) > 1e-6
    # diagonal entries (an image's own column) are never used
    diag_changed = neg.clone()
    diag_changed.fill_diagonal_(2)
    assert flair_tcs_loss(patches, sub, pool, 5.0, -2.0, neg_index=diag_changed).item() == pytest.approx(a.item(), rel=1e-12)
    with pytest.raises(ValueError, match="neg_index"):
        flair_tcs_loss(patches, sub, pool, 5.0, -2.0, neg_index=neg[:, :2])
    with pytest.raises(ValueError, match="neg_index values"):
        flair_tcs_loss(patches, sub, pool, 5.0, -2.0, neg_index=neg + 3)


@pytest.mark.parametrize("b,k,t,bias", [(1, 1, 10.0, -10.0), (3, 2, 14.3, -10.0), (4, 3, 2.0, 0.3)])
def test_mps_loop(b, k, t, bias):
    img, _, sub, _ = case(b + 100 * k, b=b, k=k)
    assert flair_mps_loss(img, sub, t, bias).item() == pytest.approx(loop_mps(img, sub, t, bias), rel=1e-10)


def test_flair_total_and_objective():
    cfg = FlairConfig(num_subcaptions=2, num_heads=2)
    img_g, patches, sub, neg = case(7)
    out = flair_loss(img_g, patches, sub, make_pool(), 8.0, -3.0, neg_index=neg)
    assert out["loss"].item() == pytest.approx((out["loss_tcs"].item() + out["loss_mps"].item()) / 2, rel=1e-12)

    torch.manual_seed(0)
    obj = FlairObjective(cfg, embed_dim=8, vision_width=6).double()
    assert obj.logit_scale().item() == pytest.approx(1 / 0.07, rel=1e-6)
    assert obj.logit_bias.item() == -10.0
    b, k, L = 3, 2, 5
    img = ImageFeatures(img_g, torch.randn(b, 4, 8, dtype=torch.float64), patches)
    txt = TextFeatures(torch.randn(b, 8, dtype=torch.float64), torch.randn(b, L, 8, dtype=torch.float64),
                       torch.ones(b, L, dtype=torch.bool))
    sub_feats = TextFeatures(sub.reshape(b * k, 8), torch.randn(b * k, L, 8, dtype=torch.float64),
                             torch.ones(b * k, L, dtype=torch.bool))
    terms = obj(img, txt, {"sub_text": sub_feats, "flair_neg_index": neg})
    ref = flair_loss(img_g, patches, sub, obj.pooling, obj.logit_scale(), obj.logit_bias, neg_index=neg)
    assert terms["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-12)
    assert {"loss_tcs", "loss_mps", "logit_scale", "logit_bias"} <= set(terms)
    terms["loss"].backward()
    assert all(p.grad is not None for p in obj.parameters())
    with pytest.raises(KeyError, match="sub_text"):
        obj(img, txt, {})
    short = TextFeatures(sub_feats.global_emb[:4], sub_feats.token_emb[:4], sub_feats.token_mask[:4])
    with pytest.raises(ValueError, match="B\\*K"):
        obj(img, txt, {"sub_text": short})


LONG = "A red circle is left of a blue square. The square is large. There are two shapes. " \
       "A green triangle is above the circle. Nothing else is there."


def test_subcaptions_properties():
    sentences = split_sentences(LONG)
    assert len(sentences) == 5
    subs = sample_subcaptions(LONG, 8, 3, random.Random(0))
    assert len(subs) == 8
    for n, sub in enumerate(subs):
        parts = split_sentences(sub)
        idx = [sentences.index(s) for s in parts]
        assert 1 <= len(idx) <= 3 and idx == sorted(set(idx))
        if n % 2 == 0:
            assert idx == list(range(idx[0], idx[0] + len(idx)))   # consecutive sentences
    assert subs == sample_subcaptions(LONG, 8, 3, random.Random(0))
    assert subs != sample_subcaptions(LONG, 8, 3, random.Random(1))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text("abcxyz ", min_size=1, max_size=8).map(str.strip).filter(bool), min_size=1, max_size=6),
       st.integers(1, 9), st.integers(1, 4), st.integers(0, 10_000))
def test_subcaptions_property_based(words, k, max_merge, seed):
    sentences = [f"{w} {i}." for i, w in enumerate(words)]   # distinct sentences
    subs = sample_subcaptions(" ".join(sentences), k, max_merge, random.Random(seed))
    assert len(subs) == k
    for sub in subs:
        parts = split_sentences(sub)
        assert 1 <= len(parts) <= min(max_merge, len(sentences))
        assert all(p in sentences for p in parts)


def test_subcaptions_bad_input_and_captions_for():
    with pytest.raises(ValueError, match="empty"):
        sample_subcaptions("   ", 2, 3, random.Random(0))
    with pytest.raises(ValueError):
        sample_subcaptions(LONG, 0, 3, random.Random(0))
    cfg = FlairConfig(num_subcaptions=4, max_merge=2)
    texts = FlairObjective.captions_for(cfg, "a red circle", LONG, random.Random(3))
    assert texts[0] == "a red circle" and len(texts) == 5
    assert texts[1:] == sample_subcaptions(LONG, 4, 2, random.Random(3))
    # without a long caption the sub-captions come from the caption itself
    assert FlairObjective.captions_for(cfg, "one sentence.", None, random.Random(0)) == ["one sentence."] * 5
    with pytest.raises(ValueError, match="rng"):
        FlairObjective.captions_for(cfg, "a", LONG)
