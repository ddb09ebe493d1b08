"""Encoder eval metrics against float64 loop references, degenerate cases, and the run end to end."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from eval import encoder as enc_eval
from eval.encoder import (dominant_shape, first_relevant_rank, majority_downsample, mean_iou, multilabel_prf,
                          patch_presence, recall_at_k, top1_accuracy)

# ----------------------------------------------------------------------------------------------
# Pure metrics
# ----------------------------------------------------------------------------------------------


def test_top1_accuracy():
    pred, target = [1, 2, 3, 0], [1, 0, 3, 0]
    assert top1_accuracy(pred, target) == sum(p == t for p, t in zip(pred, target)) / 4
    assert top1_accuracy([5], [5]) == 1.0
    with pytest.raises(ValueError):
        top1_accuracy([], [])
    with pytest.raises(ValueError):
        top1_accuracy([1, 2], [1])


def _ref_recall(sim: np.ndarray, relevant: np.ndarray, k: int) -> float:
    hits = 0
    for q in range(sim.shape[0]):
        best = max(sim[q, j] for j in range(sim.shape[1]) if relevant[q, j])
        rank = sum(1 for j in range(sim.shape[1]) if not relevant[q, j] and sim[q, j] >= best)
        hits += rank < k
    return hits / sim.shape[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_at_k_matches_loop(seed):
    g = torch.Generator().manual_seed(seed)
    q, n = 13, 29
    sim = torch.randn(q, n, generator=g, dtype=torch.float64)
    sim = torch.round(sim * 4) / 4  # create ties on purpose
    relevant = torch.rand(q, n, generator=g) < 0.1
    relevant[torch.arange(q), torch.randint(0, n, (q,), generator=g)] = True
    got = recall_at_k(sim, relevant, ks=(1, 5, 10))
    for k in (1, 5, 10):
        assert got[k] == pytest.approx(_ref_recall(sim.numpy(), relevant.numpy(), k))


def test_recall_degenerate_cases():
    n = 8
    eye = torch.eye(n, dtype=torch.bool)
    assert recall_at_k(torch.eye(n), eye, ks=(1,))[1] == 1.0  # perfect scores
    # Constant scores: ties count against the query, so every rank is n - 1 (chance, not perfect).
    assert torch.equal(first_relevant_rank(torch.zeros(n, n), eye), torch.full((n,), n - 1))
    assert recall_at_k(torch.zeros(n, n), eye, ks=(1, n))[1] == 0.0
    assert recall_at_k(torch.zeros(n, n), eye, ks=(1, n))[n] == 1.0
    with pytest.raises(ValueError, match="relevant"):
        recall_at_k(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool))


def _ref_miou(pred: np.ndarray, target: np.ndarray, c: int) -> float:
    ious = []
    for k in range(c):
        inter = sum(1 for p, t in zip(pred, target) if p == k and t == k)
        union = sum(1 for p, t in zip(pred, target) if p == k or t == k)
        if union:
            ious.append(inter / union)
    return sum(ious) / len(ious)


@pytest.mark.parametrize("seed", [0, 1])
def test_mean_iou_matches_loop(seed):
    rng = np.random.default_rng(seed)
    c = 6
    target = rng.integers(0, 4, size=(5, 7))  # classes 4 and 5 absent from the target
    pred = np.where(rng.random((5, 7)) < 0.6, target, rng.integers(0, 5, size=(5, 7)))  # 5 absent from both
    miou, per_class = mean_iou(torch.tensor(pred), torch.tensor(target), c)
    assert miou == pytest.approx(_ref_miou(pred.ravel(), target.ravel(), c))
    assert math.isnan(per_class[5])


def test_mean_iou_degenerate_cases():
    t = torch.tensor([0, 1, 1, 2])
    assert mean_iou(t, t, 5)[0] == 1.0  # absent classes 3, 4 do not drag the mean
    miou, per = mean_iou(torch.zeros(4, dtype=torch.long), t, 3)  # predict background everywhere
    assert per[1] == 0.0 and per[2] == 0.0 and per[0] == pytest.approx(1 / 4)
    assert miou == pytest.approx((1 / 4) / 3)
    assert math.isnan(mean_iou(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long), 3)[0])
    with pytest.raises(ValueError):
        mean_iou(torch.tensor([3]), torch.tensor([0]), 3)


def _ref_prf(pred: np.ndarray, target: np.ndarray) -> tuple[float, float, float]:
    ps, rs, fs = [], [], []
    for c in range(pred.shape[1]):
        tp = fp = fn = 0
        for i in range(pred.shape[0]):
            tp += pred[i, c] and target[i, c]
            fp += pred[i, c] and not target[i, c]
            fn += (not pred[i, c]) and target[i, c]
        if tp + fp + fn == 0:
            continue
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        ps.append(p)
        rs.append(r)
        fs.append(2 * p * r / (p + r) if p + r else 0.0)
    return sum(ps) / len(ps), sum(rs) / len(rs), sum(fs) / len(fs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multilabel_prf_matches_loop(seed):
    rng = np.random.default_rng(seed)
    target = rng.random((40, 5)) < 0.3
    target[:, 4] = False
    pred = np.where(rng.random((40, 5)) < 0.7, target, rng.random((40, 5)) < 0.3)
    pred[:, 4] = False  # class 4 absent from both: excluded
    pred[:, 3] = False  # class 3 never predicted: P = R = F1 = 0 (and it counts)
    got = multilabel_prf(torch.tensor(pred), torch.tensor(target))
    p, r, f = _ref_prf(pred, target)
    assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((p, r, f))
    assert got["per_class"][4] is None and got["per_class"][3] == (0.0, 0.0, 0.0)


def test_multilabel_prf_degenerate_cases():
    t = torch.tensor([[True, False], [False, True]])
    assert multilabel_prf(t, t)["f1"] == 1.0
    empty = multilabel_prf(torch.zeros(3, 2, dtype=torch.bool), torch.zeros(3, 2, dtype=torch.bool))
    assert math.isnan(empty["f1"]) and empty["per_class"] == [None, None]
    with pytest.raises(ValueError):
        multilabel_prf(torch.zeros(3, 2, dtype=torch.bool), torch.zeros(3, 3, dtype=torch.bool))


def test_majority_downsample_and_presence_match_loop():
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 4, size=(8, 12))
    mask[0:4, 0:4] = np.array([[1, 1, 2, 2]] * 4)  # a tie in patch 0: the smaller id wins
    got = majority_downsample(mask, 4, 5)
    pres = patch_presence(mask, 4, 5)
    assert got.shape == (6,) and pres.shape == (6, 5)
    for p in range(6):
        r, c = divmod(p, 3)
        block = mask[r * 4:(r + 1) * 4, c * 4:(c + 1) * 4].ravel().tolist()
        counts = [block.count(k) for k in range(5)]
        assert int(got[p]) == counts.index(max(counts))
        assert pres[p].tolist() == [n > 0 for n in counts]
    assert int(got[0]) == 1
    with pytest.raises(ValueError):
        majority_downsample(mask, 5, 5)


def test_dominant_shape():
    mask = np.zeros((6, 6), dtype=np.int64)
    assert dominant_shape(mask, 3) is None
    mask[:2, :2] = 1
    mask[3:, 3:] = 3
    assert dominant_shape(mask, 3) == 2  # class 3 = SHAPES[2], 9 pixels vs 4
    mask[:3, :3] = 1
    assert dominant_shape(mask, 3) == 0  # a 9-9 tie: the earlier shape


def test_metrics_on_hand_computed_values():
    # Retrieval: 2 images, 4 captions (captions 0, 1 belong to image 0; 2, 3 to image 1).
    sim = torch.tensor([[0.9, 0.1, 0.5, 0.2],
                        [0.3, 0.8, 0.7, 0.6]])
    relevant = torch.tensor([[True, True, False, False], [False, False, True, True]])
    # image 1: its best caption (0.7) is beaten by caption 1 (0.8) -> rank 1
    assert first_relevant_rank(sim, relevant).tolist() == [0, 1]
    assert recall_at_k(sim, relevant, ks=(1, 5)) == {1: 0.5, 5: 1.0}
    # caption 1 scores image 1 (0.8) above its own image (0.1) -> rank 1; the others rank 0
    assert first_relevant_rank(sim.T, relevant.T).tolist() == [0, 1, 0, 0]
    assert recall_at_k(sim.T, relevant.T, ks=(1,)) == {1: 0.75}
    # mIoU: class 0 IoU 1/3, class 1 2/3, class 2 1/2; class 3 absent from both
    miou, per = mean_iou(torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 1, 1, 1, 2, 0]), 4)
    assert per[:3] == pytest.approx([1 / 3, 2 / 3, 1 / 2]) and math.isnan(per[3])
    assert miou == pytest.approx(0.5)
    # Multi-label: class 0 P = R = F1 = 1/2, class 1 perfect, class 2 absent (excluded)
    pred = torch.tensor([[1, 0, 0], [0, 0, 0], [1, 1, 0], [0, 1, 0]], dtype=torch.bool)
    target = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0]], dtype=torch.bool)
    prf = multilabel_prf(pred, target)
    assert (prf["precision"], prf["recall"], prf["f1"]) == pytest.approx((0.75, 0.75, 0.75))
    assert prf["per_class"][2] is None
    # Majority vote on a 4x4 mask with 2x2 patches; presence keeps every class seen in a patch
    mask = np.array([[0, 0, 1, 1], [0, 1, 1, 1], [2, 2, 0, 0], [2, 0, 0, 3]])
    assert majority_downsample(mask, 2, 4).tolist() == [0, 1, 2, 0]
    assert patch_presence(mask, 2, 4)[3].tolist() == [True, False, False, True]
    assert top1_accuracy([2, 0, 1], [2, 1, 1]) == pytest.approx(2 / 3)


def test_zero_shot_helpers_by_hand():
    from vlm.config import WorldConfig
    from vlm.world.generator import generate_sample, world_split
    from vlm.world.vocab import COLORS, SHAPES

    present = torch.tensor([[True, False, False], [True, True, False], [True, True, True], [False, True, False]])
    assert enc_eval.presence_ceiling(present) == pytest.approx((1 + 1 / 2 + 1 / 3 + 1) / 4)
    with pytest.raises(ValueError):
        enc_eval.presence_ceiling(torch.tensor([[True, False], [False, False]]))
    # 2 shapes x 3 colours, shape-major: image 0 wins on shape 1 by its mean, though its best pair is (0, 0).
    scores = torch.tensor([[0.9, 0.0, 0.0, 0.5, 0.5, 0.5],
                           [0.1, 0.2, 0.0, 0.0, 0.3, 0.0]])
    shape, color = enc_eval.marginal_predictions(scores, 2, 3)
    assert shape.tolist() == [1, 0] and color.tolist() == [0, 1]
    prompts = enc_eval.pair_prompts()
    assert len(prompts) == len(SHAPES) * len(COLORS) == 64
    assert prompts[len(COLORS) + 2] == enc_eval.PROMPT.format(f"{list(COLORS)[2]} {SHAPES[1]}")
    world = WorldConfig(image_size=32, n_train=24, n_eval=12, seed=3)
    single, indices = enc_eval.single_object_world(world, 5)
    train, evals = world_split(world)
    assert set(indices).isdisjoint(train) and set(indices).isdisjoint(evals) and len(indices) == 5
    assert (single.min_objects, single.max_objects, single.seed, single.image_size) == (1, 1, 3, 32)
    assert all(len(generate_sample(i, single.seed, single).objects) == 1 for i in indices)


# ----------------------------------------------------------------------------------------------
# The run, end to end on a tiny untrained encoder and a tiny world
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world():
    from vlm.config import WorldConfig

    return WorldConfig(image_size=32, n_train=24, n_eval=12, seed=3)


@pytest.fixture(scope="module")
def dual_dir(tmp_path_factory, world):
    from encoders.dual_encoder import DualEncoder
    from vlm.config import EncoderConfig, TextTowerConfig, VisionTowerConfig
    from vlm.data.tokenizer import train_bpe_tokenizer
    from vlm.world.generator import generate_sample
    from vlm.world.vocab import CLASS_NAMES

    corpus = [t for i in range(24) for t in generate_sample(i, world.seed, world).captions.values()]
    corpus += [f"a photo of a {n}." for n in CLASS_NAMES]
    tok = train_bpe_tokenizer(corpus * 3, vocab_size=300, add_eos=True)
    torch.manual_seed(0)
    cfg = EncoderConfig(vision=VisionTowerConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=1,
                                                 num_heads=2, mlp_ratio=2),
                        text=TextTowerConfig(hidden_size=32, num_layers=1, num_heads=2, max_len=48),
                        embed_dim=16, pool="mean", global_mlp=True, local_heads=True)
    out = tmp_path_factory.mktemp("enc") / "dual"
    DualEncoder(cfg, tok).save_pretrained(out)
    return out


def _check_outputs(out_dir, summary, n_eval):
    on_disk = json.loads((out_dir / "summary.json").read_text())
    assert on_disk == summary
    md = (out_dir / "summary.md").read_text()
    assert md.startswith("# ") and "| segmentation/probe_miou |" in md
    preds = [json.loads(line) for line in (out_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == n_eval
    for key in ("segmentation/probe_miou", "multilabel/precision", "multilabel/recall", "multilabel/f1"):
        assert 0.0 <= get(summary, key) <= 1.0, key
    return preds, md


def get(summary: dict, key: str):
    group, name = key.split("/")
    return summary[group][name]


def test_run_dual_encoder_end_to_end(dual_dir, world, tmp_path):
    summary = enc_eval.run(dual_dir, tmp_path / "out", world, world_dir=None, probe_steps=20, limit=10,
                           probe_images=12, progress=False)
    preds, _ = _check_outputs(tmp_path / "out", summary, 10)
    assert summary["mode"] == "dual_encoder" and summary["n_eval"] == 10 and summary["image_source"] == "generator"
    for key in ("zero_shot/top1", "retrieval/i2t_r1", "retrieval/i2t_r10", "retrieval/t2i_r5",
                "segmentation/zero_shot_miou"):
        assert 0.0 <= get(summary, key) <= 1.0, key
    r = summary["retrieval"]
    assert r["i2t_r1"] <= r["i2t_r5"] <= r["i2t_r10"] and r["t2i_r1"] <= r["t2i_r5"] <= r["t2i_r10"]
    # The summary is traceable to the predictions.
    ranks = [p["i2t_rank"] for p in preds]
    assert r["i2t_r5"] == pytest.approx(np.mean([rank < 5 for rank in ranks]))
    t2i = [rank for p in preds for rank in p["t2i_ranks"]]
    assert r["t2i_r1"] == pytest.approx(np.mean([rank < 1 for rank in t2i]))
    labelled = [p for p in preds if p["zero_shot_label"] is not None]
    assert summary["zero_shot"]["top1"] == pytest.approx(
        np.mean([p["zero_shot_pred"] == p["zero_shot_label"] for p in labelled]))
    assert all(len(p["t2i_ranks"]) == len(p["captions"]) for p in preds)
    # Pointing and the single-object zero-shot, traceable to their per-example predictions.
    pointed = [w for p in preds for w in p["pointing"]]
    assert summary["pointing_words"] == len(pointed) > 0
    assert summary["pointing_acc"] == pytest.approx(np.mean([w["hit"] for w in pointed]))
    assert 0.0 < summary["pointing_chance"] < 1.0
    assert all(w["shape"] in w["word"].lower() and w["caption"] < len(p["captions"]) for p in preds for w in p["pointing"])
    assert summary["patch_miou"] == summary["segmentation"]["zero_shot_miou"]
    single = [json.loads(line) for line in (tmp_path / "out" / "predictions_single.jsonl").read_text().splitlines()]
    assert len(single) == summary["zero_shot_single_n"] == enc_eval.SINGLE_IMAGES
    assert summary["zero_shot_single_top1"] == pytest.approx(np.mean([r["shape_pred"] == r["shape"] for r in single]))
    assert summary["zero_shot_single_color_top1"] == pytest.approx(
        np.mean([r["color_pred"] == r["color"] for r in single]))
    assert 0.0 < summary["zero_shot_multi_ceiling"] <= 1.0 and 0.0 <= summary["zero_shot_multi_any_present"] <= 1.0
    assert summary["zero_shot_multi_any_present"] >= summary["zero_shot"]["top1"]
    # The alignment heatmaps of the first eval images are drawn next to the summary.
    from PIL import Image

    assert summary["heatmaps"] == "heatmaps.png"
    with Image.open(tmp_path / "out" / "heatmaps.png") as im:
        assert im.format == "PNG" and im.size[0] > 100


def test_run_plain_tower_and_text_from(dual_dir, world, tmp_path):
    from encoders.towers import load_vision_tower

    tower, transform = load_vision_tower(dual_dir)
    tower.save_pretrained(str(tmp_path / "tower"))
    transform.save_pretrained(tmp_path / "tower")
    summary = enc_eval.run(tmp_path / "tower", tmp_path / "plain", world, probe_steps=10, limit=6,
                           probe_images=8, progress=False)
    _, md = _check_outputs(tmp_path / "plain", summary, 6)
    assert summary["mode"] == "vision_tower"
    assert summary["zero_shot"]["top1"] is None and summary["retrieval"]["i2t_r1"] is None
    assert summary["segmentation"]["zero_shot_miou"] is None
    assert summary["pointing_acc"] is None and summary["zero_shot_single_top1"] is None
    assert "| zero_shot/top1 | n/a |" in md and "| pointing_acc | n/a |" in md
    assert summary["heatmaps"] is None and not (tmp_path / "plain" / "heatmaps.png").exists()  # no text side
    # The same tower scored with the DualEncoder's own heads (text_from) gives the DualEncoder's numbers.
    a = enc_eval.run(tmp_path / "tower", tmp_path / "tf", world, probe_steps=10, limit=6, probe_images=8,
                     text_from=dual_dir, progress=False)
    b = enc_eval.run(dual_dir, tmp_path / "de", world, probe_steps=10, limit=6, probe_images=8, progress=False)
    assert a["mode"] == "text_from"
    for key in ("zero_shot/top1", "retrieval/i2t_r1", "retrieval/t2i_r10", "segmentation/zero_shot_miou",
                "segmentation/probe_miou", "multilabel/f1"):
        assert get(a, key) == pytest.approx(get(b, key)), key
    for key in ("pointing_acc", "pointing_words", "pointing_chance", "zero_shot_single_top1",
                "zero_shot_single_color_top1"):
        assert a[key] == pytest.approx(b[key]), key
    # Probe metrics agree with the plain-tower run (same frozen features, same seed).
    for key in ("segmentation/probe_miou", "multilabel/precision", "multilabel/recall", "multilabel/f1"):
        assert get(summary, key) == pytest.approx(get(b, key)), key
    with pytest.raises(ValueError, match="text_from"):
        enc_eval.run(dual_dir, tmp_path / "x", world, text_from=dual_dir, progress=False)


def test_class_embeddings_local_uses_the_name_tokens(dual_dir):
    from encoders.dual_encoder import DualEncoder

    dual = DualEncoder.from_pretrained(dual_dir).eval()
    names = ["circle", "background"]
    emb = enc_eval.class_embeddings(dual, names, local=True)
    glob = enc_eval.class_embeddings(dual, names, local=False)
    assert emb.shape == glob.shape == (2, 16)
    with torch.no_grad():
        feats = dual.encode_texts([enc_eval.PROMPT.format(n) for n in names])
    ids, _ = dual.tokenize([enc_eval.PROMPT.format(n) for n in names])
    tok = dual.tokenizer
    n_prefix = len(tok("a photo of a", add_special_tokens=False)["input_ids"])
    for i, name in enumerate(names):
        # Reference: byte-level BPE encodes each word on its own, so the name's tokens are those of
        # " name", right after <s> and the prefix.
        n_name = len(tok(" " + name, add_special_tokens=False)["input_ids"])
        assert int(ids[i, 0]) == tok.bos_token_id
        sel = list(range(1 + n_prefix, 1 + n_prefix + n_name))
        torch.testing.assert_close(emb[i], feats.token_emb[i, sel].mean(0))
    torch.testing.assert_close(glob, feats.global_emb)


@pytest.fixture(scope="module")
def flair_dir(tmp_path_factory, world):
    """An untrained FLAIR stage-one checkpoint: the DualEncoder plus objective.yaml / .safetensors."""
    from encoders.dual_encoder import DualEncoder
    from encoders.objectives.flair import FlairConfig
    from encoders.stage1_model import Stage1Model
    from vlm.config import EncoderConfig, TextTowerConfig, VisionTowerConfig
    from vlm.data.tokenizer import train_bpe_tokenizer
    from vlm.world.generator import generate_sample
    from vlm.world.vocab import CLASS_NAMES

    corpus = [t for i in range(24) for t in generate_sample(i, world.seed, world).captions.values()]
    corpus += [f"a photo of a {n}." for n in CLASS_NAMES]
    tok = train_bpe_tokenizer(corpus * 3, vocab_size=300, add_eos=True)
    torch.manual_seed(1)
    cfg = EncoderConfig(vision=VisionTowerConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=1,
                                                 num_heads=2, mlp_ratio=2),
                        text=TextTowerConfig(hidden_size=32, num_layers=1, num_heads=2, max_len=48),
                        embed_dim=16, pool="cls", global_mlp=False, local_heads=False)
    model = Stage1Model.build(DualEncoder(cfg, tok), FlairConfig(num_subcaptions=2, num_heads=8))
    for ln in (model.objective.pooling.ln_q, model.objective.pooling.ln_k, model.objective.pooling.ln_v):
        torch.nn.init.normal_(ln.weight, 1.0, 0.3)  # a pooling that is not the identity-ish init
    out = tmp_path_factory.mktemp("flair") / "ckpt"
    model.save_pretrained(out)
    return out


def test_flair_scores_with_the_text_conditioned_embedding(flair_dir, world, tmp_path):
    """Default: zero-shot and retrieval score each pair by cos(v_{i|t}, t), as the reference's
    ``--inference-with-flair`` (src/flair/train.py ``compute_similarity_scores_attn_pool``:
    ``visual_proj(text_tokens, image_post(tokens), ...)``, normalised, dot with the text);
    ``flair_scoring="global"`` gives the global matching of a checkpoint without its objective."""
    import shutil

    from encoders.stage1_model import Stage1Model
    from encoders.towers import num_patches
    import torch.nn.functional as F

    from vlm.world.vocab import CLASS_NAMES, SHAPES

    cond = enc_eval.run(flair_dir, tmp_path / "cond", world, probe_steps=5, limit=8, probe_images=8,
                        progress=False, heatmap_images=0, single_images=6)
    glob_ = enc_eval.run(flair_dir, tmp_path / "glob", world, probe_steps=5, limit=8, probe_images=8,
                         progress=False, heatmap_images=0, flair_scoring="global")
    assert cond["scoring"] == "flair_conditioned" and glob_["scoring"] == "global"
    bare = tmp_path / "bare"
    shutil.copytree(flair_dir, bare)
    (bare / "objective.yaml").unlink()
    plain = enc_eval.run(bare, tmp_path / "plain", world, probe_steps=5, limit=8, probe_images=8, progress=False,
                         heatmap_images=0)
    assert plain["scoring"] == "global"
    for key in ("zero_shot/top1", "retrieval/i2t_r1", "retrieval/t2i_r5"):
        assert get(glob_, key) == get(plain, key), key
    # The conditioned ranks and predictions against a per-pair loop over the pooling.
    model = Stage1Model.from_pretrained(flair_dir).eval()
    enc, pool = model.encoder, model.objective.pooling
    import io

    from PIL import Image

    from vlm.world.export import jpeg_bytes
    from vlm.world.generator import generate_sample, world_split

    ev, _ = enc_eval._load_split(list(world_split(world)[1])[:8], world, None, enc.transform, 8, len(CLASS_NAMES), True,
                                False, "")
    with torch.no_grad():
        feats = enc.encode_image(ev.pixels)
        assert feats.patch_emb.shape == (8, num_patches(enc.vision), 16)
        texts = [c for caps in ev.captions for c in caps] + [enc_eval.PROMPT.format(s) for s in SHAPES]
        t = enc.encode_texts(texts).global_emb
        sim = torch.tensor([[float(F.cosine_similarity(pool(t[j][None, None], feats.patch_emb[i:i + 1])[0, 0], t[j],
                                                       dim=0)) for j in range(len(texts))] for i in range(8)])
    n_cap = sum(len(c) for c in ev.captions)
    owner = torch.tensor([i for i, caps in enumerate(ev.captions) for _ in caps])
    relevant = owner[None, :] == torch.arange(8)[:, None]
    preds = [json.loads(line) for line in (tmp_path / "cond" / "predictions.jsonl").read_text().splitlines()]
    assert [p["i2t_rank"] for p in preds] == first_relevant_rank(sim[:, :n_cap], relevant).tolist()
    assert [p["zero_shot_pred"] for p in preds] == [SHAPES[int(k)] for k in sim[:, n_cap:].argmax(1)]
    # The single-object zero-shot scores its 64 pair prompts the same conditioned way.
    single, indices = enc_eval.single_object_world(world, 6)
    samples = [generate_sample(i, single.seed, single) for i in indices]
    with torch.no_grad():
        images = [Image.open(io.BytesIO(jpeg_bytes(s_.image))) for s_ in samples]  # as the export stores them
        patches = enc.encode_image(torch.stack([enc.transform(im.convert("RGB")) for im in images])).patch_emb
        pair = enc.encode_texts(enc_eval.pair_prompts()).global_emb
        pair_sim = torch.tensor([[float(F.cosine_similarity(pool(pair[j][None, None], patches[i:i + 1])[0, 0], pair[j],
                                                            dim=0)) for j in range(len(pair))] for i in range(6)])
    single_preds = [json.loads(line) for line in (tmp_path / "cond" / "predictions_single.jsonl").read_text().splitlines()]
    assert [r["shape_pred"] for r in single_preds] == [SHAPES[int(k)] for k in pair_sim.view(6, 8, 8).mean(2).argmax(1)]
    global_preds = [json.loads(line) for line in (tmp_path / "glob" / "predictions.jsonl").read_text().splitlines()]
    assert [p["i2t_rank"] for p in preds] != [p["i2t_rank"] for p in global_preds]  # not vacuous
    with pytest.raises(ValueError, match="flair_scoring"):
        enc_eval.run(flair_dir, tmp_path / "x", world, flair_scoring="pooled", progress=False)
