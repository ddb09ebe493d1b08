"""FLAIR: pooling, text-conditioned and multi-positive sigmoid losses and sub-caption sampling,
each against a plain float64 loop written from the reference code (ExplainableML/flair).

Updated for the fidelity fixes: the pooling now reads D-wide patch embeddings (was: the tower's
w-wide tokens), L_tcs is summed over images (was: averaged), ``neg_index`` is the reference's
[B, B-1] ``random_offsets`` (was: [B, N*B]), and sub-captions follow ``sample_dict`` (was:
alternating consecutive / ordered random, joined with spaces).
"""
import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from encoders.features import ImageFeatures, TextFeatures
from encoders.objectives.flair import (FlairConfig, FlairObjective, TextConditionedPooling, conditioned_similarity,
                                       caption_pool, flair_loss, flair_mps_loss, flair_tcs_loss,
                                       sample_subcaptions, split_sentences)


def log_sigmoid(x):
    return -torch.nn.functional.softplus(-x)


def layer_norm(ln, x):
    """torch LayerNorm written out: (x - mean) / sqrt(var + eps) * weight + bias, per vector."""
    mean = sum(x[c] for c in range(len(x))) / len(x)
    var = sum((x[c] - mean) ** 2 for c in range(len(x))) / len(x)
    return (x - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def loop_pool(pool, text, patches):
    """src/flair/transformer.py ``PureAttentionPoolingBlock.forward``: q, k, v each LayerNorm-ed,
    then ``nn.MultiheadAttention(D, n_head, add_zero_attn=True)``, written head by head: a zero key
    (score 0) and a zero value appended after the input projections. text [D], patches [P, D]."""
    attn = pool.attn
    d, heads = attn.embed_dim, attn.num_heads
    dh = d // heads
    w_in, b_in = attn.in_proj_weight, attn.in_proj_bias  # kdim == vdim == D: one packed projection
    q = w_in[:d] @ layer_norm(pool.ln_q, text) + b_in[:d]
    ks = [w_in[d:2 * d] @ layer_norm(pool.ln_k, p) + b_in[d:2 * d] for p in patches]
    vs = [w_in[2 * d:] @ layer_norm(pool.ln_v, p) + b_in[2 * d:] for p in patches]
    out = []
    for h in range(heads):
        sl = slice(h * dh, (h + 1) * dh)
        scores = torch.stack([q[sl] @ k[sl] / math.sqrt(dh) for k in ks] + [q.new_zeros(())])  # zero key
        w = torch.exp(scores - scores.max())
        w = w / w.sum()
        out.append(sum(w[p] * vs[p][sl] for p in range(len(vs))))  # the zero value adds nothing
    return attn.out_proj.weight @ torch.cat(out) + attn.out_proj.bias


def cosine(a, b):
    return (a @ b) / torch.sqrt((a @ a) * (b @ b))


def make_pool(d=8, heads=2, seed=0):
    torch.manual_seed(seed)
    pool = TextConditionedPooling(d, heads).double()
    for ln in (pool.ln_q, pool.ln_k, pool.ln_v):  # non-trivial affine parameters
        torch.nn.init.normal_(ln.weight, 1.0, 0.2)
        torch.nn.init.normal_(ln.bias, 0.0, 0.2)
    return pool


def case(seed, b=3, k=2, p=4, d=8):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    neg = torch.randint(0, k, (b, b - 1), generator=g)
    return r(b, d), r(b, p, d), r(b, k, d), neg


def test_pooling_matches_per_head_loop():
    pool = make_pool()
    _, patches, sub, _ = case(0)
    got = pool(sub, patches)                                # [B, K, D]
    assert got.shape == sub.shape
    with torch.no_grad():
        for i in range(sub.shape[0]):
            for j in range(sub.shape[1]):
                assert torch.allclose(got[i, j], loop_pool(pool, sub[i, j], patches[i]), atol=1e-12)
    assert pool.attn.num_heads == 2 and pool.attn.add_zero_attn
    assert FlairObjective(FlairConfig(), 64, 32).pooling.attn.num_heads == 8          # the reference's 8 heads
    assert FlairObjective(FlairConfig(), 64, 32).pooling.ln_k.normalized_shape == (64,)  # joint space D, not w
    with pytest.raises(ValueError, match="divisible"):
        TextConditionedPooling(10, 4)


def reference_texts(sub, neg):
    """src/flair/loss.py ``downsample_text_features``: image i's own K captions and, for each other
    image j (increasing), caption ``random_offsets[i, m]``; then ``get_multi_positive_tcs`` labels.
    The reference sorts the columns; the sum is order-free. -> list over i of [(text, label)]."""
    b, k, _ = sub.shape
    rows = []
    for i in range(b):
        others = [j for j in range(b) if j != i]
        rows.append([(sub[i, m], 1.0) for m in range(k)] + [(sub[j, neg[i, m]], -1.0) for m, j in enumerate(others)])
    return rows


def loop_tcs_ranks(pool, patches, sub, negs, t, bias, world):
    """src/flair/loss.py ``FlairLoss.forward`` / ``_loss_with_attn_pool`` on ``world`` ranks of
    B = len/world images each: per rank ``-logsigmoid(labels * logits).sum() / text_features.shape[1]``
    on its own [B, B+K-1] texts, plus, per other rank, that rank's rows with ``negative_only=True``
    (row i pooled with this rank's image i). -> list of the per-rank losses."""
    n = patches.shape[0]
    b = n // world
    rows = [reference_texts(sub[r * b:(r + 1) * b], negs[r * b:(r + 1) * b]) for r in range(world)]
    losses = []
    for r in range(world):
        total = 0.0
        for rr in range(world):
            for i in range(b):
                for text, z in rows[rr][i]:
                    z = z if rr == r else -1.0
                    pooled = loop_pool(pool, text, patches[r * b + i])
                    total = total - log_sigmoid(z * (t * cosine(pooled, text) + bias))
        losses.append(total / len(rows[r][0]))
    return losses


def loop_mps(img, sub, t, bias):
    """src/flair/loss.py ``_loss_with_attn_pool`` (added_mps_loss): ``get_mps_logits`` with
    ``get_multi_positive_mps`` labels, ``.sum() / g_text_features.shape[0]`` (= B*K)."""
    b, k, _ = sub.shape
    total = 0.0
    for i in range(b):
        for j in range(b):
            for m in range(k):
                z = 1.0 if i == j else -1.0
                total = total - log_sigmoid(z * (t * cosine(img[i], sub[j, m]) + bias))
    return total / (b * k)


@pytest.mark.parametrize("b,k", [(1, 1), (1, 3), (3, 1), (3, 2), (4, 3)])
def test_tcs_loop_loss_and_gradients(b, k):
    pool = make_pool(seed=b)
    _, patches, sub, neg = case(b * 10 + k, b=b, k=k)
    patches.requires_grad_(True), sub.requires_grad_(True)
    got = flair_tcs_loss(patches, sub, pool, 5.0, -2.0, neg_index=neg)
    grads = torch.autograd.grad(got, [patches, sub, *pool.parameters()])
    ref = loop_tcs_ranks(pool, patches, sub, neg, 5.0, -2.0, world=1)[0]
    ref_grads = torch.autograd.grad(ref, [patches, sub, *pool.parameters()])
    assert got.item() == pytest.approx(ref.item(), rel=1e-10)
    for g, rg in zip(grads, ref_grads):
        assert torch.allclose(g, rg, rtol=1e-9, atol=1e-12)


def test_tcs_single_image_closed_form():
    """B = 1: no negatives, T = K texts, the loss is the sum over them divided by K."""
    pool = make_pool()
    _, patches, sub, _ = case(5, b=1, k=3)
    one = flair_tcs_loss(patches, sub, pool, 5.0, -2.0, neg_index=torch.zeros(1, 0, dtype=torch.long))
    with torch.no_grad():
        pooled = pool(sub, patches)
        cos = torch.nn.functional.cosine_similarity(pooled, sub, dim=-1)
        assert one.item() == pytest.approx(float(-log_sigmoid(5.0 * cos + -2.0).sum() / 3), rel=1e-12)


def test_tcs_negatives_follow_neg_index():
    pool = make_pool()
    _, patches, sub, neg = case(3, b=3, k=3)
    a = flair_tcs_loss(patches, sub, pool, 5.0, -2.0, neg_index=neg)
    c = flair_tcs_loss(patches, sub, pool, 5.0, -2.0, neg_index=(neg + 1) % 3)
    assert abs(a.item() - c.item()) > 1e-6
    with pytest.raises(ValueError, match="neg_index"):
        flair_tcs_loss(patches, sub, pool, 5.0, -2.0, neg_index=torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="neg_index values"):
        flair_tcs_loss(patches, sub, pool, 5.0, -2.0, neg_index=neg + 3)
    # drawn when not given: a valid loss
    assert torch.isfinite(flair_tcs_loss(patches, sub, pool, 5.0, -2.0))


@pytest.mark.parametrize("b,k,t,bias", [(1, 1, 10.0, -10.0), (3, 2, 14.3, -10.0), (4, 3, 2.0, 0.3)])
def test_mps_loop(b, k, t, bias):
    img, _, sub, _ = case(b + 100 * k, b=b, k=k)
    assert flair_mps_loss(img, sub, t, bias).item() == pytest.approx(loop_mps(img, sub, t, bias).item(), rel=1e-10)


def test_conditioned_similarity_loop():
    pool = make_pool()
    _, patches, sub, _ = case(11, b=3, k=2)
    texts = sub.reshape(6, -1)
    got = conditioned_similarity(pool, patches, texts, chunk=4)
    assert got.shape == (3, 6)
    with torch.no_grad():
        for i in range(3):
            for j in range(6):
                assert got[i, j].item() == pytest.approx(cosine(loop_pool(pool, texts[j], patches[i]), texts[j]).item(),
                                                         rel=1e-10)


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
    img = ImageFeatures(img_g, patches, torch.randn(b, 4, 6, dtype=torch.float64))
    sub_feats = TextFeatures(sub.reshape(b * k, 8), torch.randn(b * k, L, 8, dtype=torch.float64),
                             torch.ones(b * k, L, dtype=torch.bool))
    ref = flair_loss(img_g, patches, sub, obj.pooling, obj.logit_scale(), obj.logit_bias, neg_index=neg)
    # the collate's layout: txt holds the B*K sub-captions (the caption is not encoded)
    terms = obj(img, sub_feats, {"flair_neg_index": neg})
    assert terms["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-12)
    # a batch["sub_text"] (Stage1Model's sub_input_ids) takes precedence over txt
    txt = TextFeatures(torch.randn(b, 8, dtype=torch.float64), torch.randn(b, L, 8, dtype=torch.float64),
                       torch.ones(b, L, dtype=torch.bool))
    terms = obj(img, txt, {"sub_text": sub_feats, "flair_neg_index": neg})
    assert terms["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-12)
    assert {"loss_tcs", "loss_mps", "logit_scale", "logit_bias"} <= set(terms)
    terms["loss"].backward()
    assert all(p.grad is not None for p in obj.parameters())
    with pytest.raises(ValueError, match="B\\*K"):
        obj(img, txt, {})
    with pytest.raises(KeyError, match="sub_text"):
        obj(img, txt, {"sub_text": "not features"})


# ----------------------------------------------------------------------------------------------
# Sub-caption sampling
# ----------------------------------------------------------------------------------------------

LONG = "A red circle is left of a blue square. The square is large. There are two shapes. " \
       "A green triangle is above the circle. Nothing else is there."


def reference_sample_dict(raw_caption, k, max_merged_num, rng):
    """src/flair/data.py ``sample_dict`` (sampling_mode='diverse_sampling') with ``split_caption``,
    ``random_sample_from_list`` and ``draw_numbers``, ``random`` replaced by rng. ``raw_caption``: a
    string (pixelprose=True: its sentences) or a dict of caption lists (pixelprose=False: their sum)."""
    if isinstance(raw_caption, dict):
        captions_list = sum((raw_caption[key] for key in raw_caption), [])
    else:
        captions_list = [cap.strip() for cap in __import__("re").split(r'\n|</s>|[.]', raw_caption) if cap.strip()]
    n_captions = len(captions_list)
    sampled = []
    for _ in range(k):
        merged_num = rng.randint(1, max_merged_num)
        if merged_num == 1:
            sampled.append(rng.choice(captions_list))
        elif rng.random() < 0.5:
            n = len(captions_list)
            if merged_num >= n:
                sampled.append('. '.join(captions_list))
            else:
                population = list(range(0, n - merged_num))
                idx = rng.sample(population, 1) if n - merged_num >= 1 else rng.choices(population, k=1)
                sampled.append('. '.join(captions_list[idx[0]:idx[0] + merged_num]))
        else:
            if n_captions >= merged_num:
                to_merge = rng.sample(captions_list, merged_num)
            else:
                to_merge = [rng.choice(captions_list) for _ in range(merged_num)]
            sampled.append('. '.join(to_merge))
    return sampled


@pytest.mark.parametrize("text,k,max_merge", [(LONG, 8, 3), (LONG, 1, 3), (LONG, 5, 1), ("One sentence.", 6, 3),
                                              ("A. B\nC</s>D.", 8, 4)])
@pytest.mark.parametrize("seed", range(5))
def test_subcaptions_equal_reference_sample_dict(text, k, max_merge, seed):
    assert sample_subcaptions(text, k, max_merge, random.Random(seed)) == \
        reference_sample_dict(text, k, max_merge, random.Random(seed))


@pytest.mark.parametrize("seed", range(5))
def test_caption_pool_equals_reference_non_pixelprose(seed):
    """captions_for draws from the caption's sentences plus the long caption's, as the reference's
    sample_dict on DreamLIP data draws from raw_caption + the short and long captions (each already a
    list of sentences)."""
    caption = "A red circle and two blue stars."
    pool = caption_pool(caption, LONG)
    assert pool[0] == "A red circle and two blue stars" and pool[1:] == split_sentences(LONG)
    fields = {"raw_caption": split_sentences(caption), "longIB_captions": split_sentences(LONG)}
    texts = FlairObjective.captions_for(FlairConfig(num_subcaptions=8), caption, LONG, random.Random(seed))
    assert texts[0] == caption
    assert texts[1:] == reference_sample_dict(fields, 8, 3, random.Random(seed))
    assert caption_pool(caption) == ["A red circle and two blue stars"]


def test_subcaptions_properties():
    sentences = split_sentences(LONG)
    assert len(sentences) == 5 and sentences[0] == "A red circle is left of a blue square"
    kinds = set()
    for seed in range(40):
        for sub in sample_subcaptions(LONG, 8, 3, random.Random(seed)):
            idx = [sentences.index(s) for s in sub.split(". ")]
            assert 1 <= len(idx) <= 3 and len(set(idx)) == len(idx)
            if len(idx) > 1:
                consecutive = idx == list(range(idx[0], idx[0] + len(idx)))
                kinds.add("consecutive" if consecutive else ("unordered" if idx != sorted(idx) else "ordered"))
    assert kinds == {"consecutive", "unordered", "ordered"}  # both coin outcomes; random picks keep no order
    subs = sample_subcaptions(LONG, 8, 3, random.Random(0))
    assert subs == sample_subcaptions(LONG, 8, 3, random.Random(0))
    assert subs != sample_subcaptions(LONG, 8, 3, random.Random(1))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text("abcxyz ", min_size=1, max_size=8).map(str.strip).filter(bool), min_size=1, max_size=6),
       st.integers(1, 9), st.integers(1, 4), st.integers(0, 10_000))
def test_subcaptions_property_based(words, k, max_merge, seed):
    sentences = [f"{w} {i}" for i, w in enumerate(words)]   # distinct sentences
    subs = sample_subcaptions(". ".join(sentences) + ".", k, max_merge, random.Random(seed))
    assert len(subs) == k
    for sub in subs:
        parts = sub.split(". ")
        assert 1 <= len(parts) <= max_merge
        assert all(p in sentences for p in parts)


def test_subcaptions_bad_input_and_captions_for():
    with pytest.raises(ValueError, match="empty"):
        sample_subcaptions("  . ", 2, 3, random.Random(0))
    with pytest.raises(ValueError):
        sample_subcaptions(LONG, 0, 3, random.Random(0))
    cfg = FlairConfig(num_subcaptions=4, max_merge=2)
    texts = FlairObjective.captions_for(cfg, "a red circle", LONG, random.Random(3))
    assert texts[0] == "a red circle" and len(texts) == 5
    assert texts[1:] == sample_subcaptions(["a red circle", *split_sentences(LONG)], 4, 2, random.Random(3))
    # without a long caption the sub-captions come from the caption itself (one sentence: repeats)
    assert set(FlairObjective.captions_for(cfg, "one sentence.", None, random.Random(0))[1:]) <= \
        {"one sentence", "one sentence. one sentence"}
    with pytest.raises(ValueError, match="rng"):
        FlairObjective.captions_for(cfg, "a", LONG)
