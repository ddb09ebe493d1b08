"""The relation probe: its cells' owners agree with the oracle grid, the role bits mark the statement's
two objects (the referred one for refcoco), sequences end in the query token, boxes are scored as
RefCOCO is, a small set is fitted, and a run writes its files."""
import json

import numpy as np
import pytest
import torch

from eval.refcoco import box_iou
from eval.relation_probe import (BINS, QUERY, RelationProbe, accuracy, encode, relation_examples, run, train_variant,
                                 word_vocab)
from vlm.config import WorldConfig
from vlm.model.oracle import cell_features, cell_owner
from vlm.world.generator import generate_sample
from vlm.world.text import normalized_box
from vlm.world.vocab import COLORS, SHAPES

CFG = WorldConfig(n_train=30, n_eval=4, seed=2, min_objects=2, max_objects=4)


def samples_with_statements(n=12):
    out = [generate_sample(i, CFG.seed, CFG) for i in range(CFG.n_train)]
    return [s for s in out if s.statements][:n]


def test_cell_owner_is_the_object_the_oracle_grid_describes():
    for s in samples_with_statements(5):
        owner, grid = cell_owner(s), cell_features(s)
        fg = grid[:, len(SHAPES) + len(COLORS) + 1].numpy() > 0
        assert ((owner >= 0) == fg).all()
        for cell in np.flatnonzero(owner >= 0):
            obj = s.objects[owner[cell]]
            assert grid[cell, SHAPES.index(obj.shape)] == 1
            assert grid[cell, len(SHAPES) + list(COLORS).index(obj.color)] == 1


def test_role_bits_mark_subject_and_object_cells_only():
    s = samples_with_statements(1)[0]
    plain, roles = relation_examples(s, roles=False), relation_examples(s, roles=True)
    assert len(plain) == len(roles) == len(s.statements)
    owner = cell_owner(s)
    for st, p, r in zip(s.statements, plain, roles):
        assert r.grid.shape[1] == p.grid.shape[1] + 2
        assert torch.equal(r.grid[:, :-2], p.grid)
        assert r.grid[:, -2].numpy().astype(bool).tolist() == (owner == st.subject).tolist()
        assert r.grid[:, -1].numpy().astype(bool).tolist() == (owner == st.object).tolist()
        assert r.grid[:, -2].sum() > 0 and r.grid[:, -1].sum() > 0
        assert p.label == st.label and p.relation == st.relation
        assert " ".join(p.words) in st.text.lower().replace(".", "")


def test_encode_left_pads_and_ends_in_the_query():
    ex = relation_examples(samples_with_statements(1)[0], roles=False)[:2]
    ex[1].words = ex[1].words[:3]
    vocab = word_vocab(ex)
    grid, tokens, targets = encode(ex, vocab)
    assert grid.shape == (2, 64, ex[0].grid.shape[1])
    assert tokens.shape == (2, max(len(e.words) for e in ex) + 1)
    assert (tokens[:, -1] == vocab[QUERY]).all()
    assert (tokens[1, : tokens.shape[1] - 4] == 0).all() and (tokens[1, -4:] > 0).all()
    assert targets.tolist() == [[int(e.label)] for e in ex]
    logits = RelationProbe(grid.shape[-1], len(vocab) + 2)(grid, tokens)
    assert logits.shape == (2, 1, 2)


def test_refcoco_examples_mark_the_referred_object_and_bin_its_box():
    s = samples_with_statements(1)[0]
    ex = relation_examples(s, roles=True, task="refcoco")
    owner = cell_owner(s)
    assert len(ex) == len(s.objects) == len(s.referring)
    for i, e in enumerate(ex):
        assert e.box == normalized_box(s.objects[i], s.image.shape[0])
        assert e.grid[:, -2].numpy().astype(bool).tolist() == (owner == i).tolist() and e.grid[:, -1].sum() == 0
        assert e.target() == [round(v * (BINS - 1)) for v in e.box] and all(0 <= b < BINS for b in e.target())
        assert e.words == s.referring[i].lower().replace(",", "").split()


class BoxOracle(torch.nn.Module):
    """Logits peaked at each example's true bins, shifted by ``shift`` bins."""

    def __init__(self, examples, shift):
        super().__init__()
        self.examples, self.shift = examples, shift

    def forward(self, grid, tokens):
        out = torch.zeros(len(self.examples), 4, BINS)
        for b, e in enumerate(self.examples):
            for k, t in enumerate(e.target()):
                out[b, k, min(BINS - 1, t + self.shift)] = 1.0
        return out

    def decode(self, grid, tokens):
        return self(grid, tokens).argmax(-1)


@pytest.mark.parametrize("shift", [0, 2, 6])
def test_refcoco_accuracy_is_acc_at_half_iou_of_the_binned_box(shift):
    ex = [e for s in samples_with_statements(4) for e in relation_examples(s, roles=False, task="refcoco")]
    vocab = word_vocab(ex)
    expected = np.mean([box_iou([min(BINS - 1, t + shift) / (BINS - 1) for t in e.target()], e.box) >= 0.5 for e in ex])
    assert accuracy(BoxOracle(ex, shift), ex, vocab, batch=len(ex)) == pytest.approx(expected)
    if shift == 0:
        assert expected == 1.0  # 0.02 bins: the rounded box keeps IoU >= 0.5


def test_a_small_set_is_fitted():
    ex = [e for s in samples_with_statements(12) for e in relation_examples(s, roles=True)][:16]
    assert len(ex) == 16 and 0 < sum(e.label for e in ex) < len(ex)
    vocab = word_vocab(ex)
    curve = train_variant(ex, ex, vocab, steps=200, batch=16, lr=3e-3, layers=2, eval_every=100, seed=0, desc="t")
    assert [r["step"] for r in curve] == [100, 200]
    assert curve[-1]["loss"] < curve[0]["loss"]
    assert curve[-1]["train_acc"] >= 0.75  # most of 16 statements fitted (chance 0.5; 0.88 measured)


def refcoco_batch(n=6):
    ex = [e for s in samples_with_statements(4) for e in relation_examples(s, roles=False, task="refcoco")][:n]
    vocab = word_vocab(ex)
    return ex, vocab, *encode(ex, vocab)


@pytest.mark.parametrize("block", ["encoder", "llama"])
def test_token_answers_read_only_the_answers_before_them(block):
    ex, vocab, grid, tokens, targets = refcoco_batch()
    torch.manual_seed(0)
    model = RelationProbe(grid.shape[-1], len(vocab) + 2, answers=4, classes=BINS, block=block, answer="tokens").eval()
    prev = targets[:, :3]
    logits = model(grid, tokens, prev)
    assert logits.shape == (len(ex), 4, BINS)
    for j in range(3):  # answer k is read at answer k-1's position: prev[:, j] reaches answers j+1.. only
        changed = prev.clone()
        changed[:, j] = (changed[:, j] + 7) % BINS
        other = model(grid, tokens, changed)
        torch.testing.assert_close(other[:, : j + 1], logits[:, : j + 1])
        assert not torch.allclose(other[:, j + 1], logits[:, j + 1])
    with pytest.raises(ValueError, match="prev"):
        model(grid, tokens)


@pytest.mark.parametrize("block", ["encoder", "llama"])
def test_decode_writes_each_answer_after_its_own_earlier_ones(block):
    ex, vocab, grid, tokens, _ = refcoco_batch()
    torch.manual_seed(1)
    model = RelationProbe(grid.shape[-1], len(vocab) + 2, answers=4, classes=BINS, block=block, answer="tokens").eval()
    out = model.decode(grid, tokens)
    assert out.shape == (len(ex), 4)
    with torch.no_grad():  # a loop reference: answer k is the argmax given the decoded answers before it
        for k in range(4):
            prefix = torch.cat([out[:, :k], torch.zeros(len(ex), 3 - k, dtype=torch.long)], 1)
            assert torch.equal(model(grid, tokens, prefix)[:, k].argmax(-1), out[:, k])
    heads = RelationProbe(grid.shape[-1], len(vocab) + 2, answers=4, classes=BINS, block=block).eval()
    assert torch.equal(heads.decode(grid, tokens), heads(grid, tokens).argmax(-1))


def test_the_llama_block_is_the_world_lms_kind_and_fits_a_small_set():
    ex, vocab, grid, tokens, _ = refcoco_batch(16)
    model = RelationProbe(grid.shape[-1], len(vocab) + 2, answers=4, classes=BINS, block="llama")
    assert type(model.blocks).__name__ == "LlamaModel" and model.blocks.config.num_hidden_layers == 2
    curve = train_variant(ex, ex, vocab, steps=150, batch=16, lr=3e-3, layers=2, eval_every=75, seed=0, desc="t",
                          block="llama", answer="tokens")
    assert curve[-1]["loss"] < 0.5 * curve[0]["loss"]  # teacher-forced coordinates of 16 boxes fitted


def test_run_writes_summary_table_and_curve(tmp_path):
    summary = run(CFG, tmp_path, images=10, steps=4, batch=8, eval_every=2)
    folder = tmp_path / "relation_probe"
    saved = json.loads((folder / "summary.json").read_text())
    assert set(saved["curves"]) == {"plain", "roles"} and len(saved["curves"]["plain"]) == 2
    assert saved["held_out_statements"] == sum(len(generate_sample(CFG.n_train + i, CFG.seed, CFG).statements)
                                               for i in range(CFG.n_eval))
    assert 0 <= summary["plain_held_out_acc"] <= 1 and 0 <= summary["roles_held_out_acc"] <= 1
    assert "| plain | 4 |" in (folder / "summary.md").read_text()
    assert (folder / "curve.png").stat().st_size > 0


def test_refcoco_run_writes_its_own_folder(tmp_path):
    summary = run(CFG, tmp_path, images=6, steps=2, batch=4, eval_every=2, variants=["roles"], task="refcoco")
    assert summary["task"] == "refcoco" and 0 <= summary["roles_held_out_acc"] <= 1
    assert summary["held_out_statements"] == sum(len(generate_sample(CFG.n_train + i, CFG.seed, CFG).objects)
                                                 for i in range(CFG.n_eval))
    assert (tmp_path / "relation_probe_refcoco" / "summary.md").is_file()


def test_a_llama_token_run_writes_its_own_folder(tmp_path):
    summary = run(CFG, tmp_path, images=6, steps=2, batch=4, eval_every=2, variants=["plain"], task="refcoco",
                  block="llama", answer="tokens")
    assert (summary["block"], summary["answer"]) == ("llama", "tokens") and 0 <= summary["plain_held_out_acc"] <= 1
    md = (tmp_path / "relation_probe_refcoco_llama_tokens" / "summary.md").read_text()
    assert "2-layer llama transformer" in md and "answers as tokens" in md


@pytest.mark.parametrize("kwargs, match", [(dict(variants=["both"]), "variants"), (dict(images=0), "images"),
                                           (dict(images=31), "images"), (dict(task="gqa"), "task"),
                                           (dict(block="gpt2"), "block"), (dict(answer="tokens"), "tokens only")])
def test_run_rejects_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run(CFG, tmp_path, **{"steps": 1, **kwargs})
