"""The relation probe: its cells' owners agree with the oracle grid, the role bits mark the statement's
two objects, sequences end in the query token, a small set is fitted, and a run writes its files."""
import json

import numpy as np
import pytest
import torch

from eval.relation_probe import (QUERY, RelationProbe, accuracy, cell_owner, encode, relation_examples, run,
                                 train_variant)
from vlm.config import WorldConfig
from vlm.model.oracle import cell_features
from vlm.world.generator import generate_sample
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
    vocab = {w: k + 2 for k, w in enumerate(sorted({w for e in ex for w in e.words} | {QUERY}))}
    grid, tokens, labels = encode(ex, vocab)
    assert grid.shape == (2, 64, ex[0].grid.shape[1])
    assert tokens.shape == (2, max(len(e.words) for e in ex) + 1)
    assert (tokens[:, -1] == vocab[QUERY]).all()
    assert (tokens[1, : tokens.shape[1] - 4] == 0).all() and (tokens[1, -4:] > 0).all()
    assert labels.tolist() == [int(e.label) for e in ex]
    logits = RelationProbe(grid.shape[-1], len(vocab) + 2)(grid, tokens)
    assert logits.shape == (2, 2)


def test_a_small_set_is_fitted():
    ex = [e for s in samples_with_statements(12) for e in relation_examples(s, roles=True)][:16]
    assert len(ex) == 16 and 0 < sum(e.label for e in ex) < len(ex)
    vocab = {w: k + 2 for k, w in enumerate(sorted({w for e in ex for w in e.words} | {QUERY}))}
    curve = train_variant(ex, ex, vocab, steps=200, batch=16, lr=3e-3, layers=2, eval_every=100, seed=0, desc="t")
    assert [r["step"] for r in curve] == [100, 200]
    assert curve[-1]["loss"] < curve[0]["loss"]
    assert curve[-1]["train_acc"] >= 0.75  # most of 16 statements fitted (chance 0.5; 0.88 measured)


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


@pytest.mark.parametrize("kwargs, match", [(dict(variants=["both"]), "variants"), (dict(images=0), "images"),
                                           (dict(images=31), "images")])
def test_run_rejects_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run(CFG, tmp_path, **{"steps": 1, **kwargs})
