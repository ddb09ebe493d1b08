"""grounding_attention: patch masks, the scores against a float64 loop, run() with a fake attention."""
import json

import numpy as np
import pytest
import torch
from eval_fakes import FakeVLM, image_number, write_image

from eval.grounding_attention import attention_scores, patch_mask, run, summarise
from eval.io import RunOptions
from eval.refcoco import RefcocoData
from vlm.data.formats import RefExpr


def test_patch_mask_uses_patch_centres():
    assert patch_mask((0.0, 0.0, 1.0, 1.0), 4).all()
    assert patch_mask((0.0, 0.0, 0.5, 0.5), 2).tolist() == [True, False, False, False]
    assert patch_mask((0.4, 0.4, 0.6, 0.6), 4).sum() == 0  # between the centres 0.375 and 0.625
    assert patch_mask((0.375, 0.625, 0.375, 0.625), 4).reshape(4, 4)[2, 1]  # a centre on the edge counts
    assert patch_mask((0.5, 0.0, 1.0, 0.5), 2).tolist() == [False, True, False, False]  # row-major


def _reference(attention, target, objects):
    """Plain float64 loop over the patches (module docstring's definitions)."""
    total = sum(float(v) for v in attention)
    a = [float(v) / total for v in attention]
    objects = [o or t for o, t in zip(objects, target)]
    on_target = sum(v for v, t in zip(a, target) if t) / sum(target)
    on_objects = sum(v for v, o in zip(a, objects) if o) / sum(objects)
    best = max(range(len(a)), key=lambda k: (a[k], -k))
    return {"target_enrichment": on_target * len(a), "objects_enrichment": on_objects * len(a),
            "selection": on_target / on_objects if sum(objects) > sum(target) else None,
            "pointing": float(target[best]), "pointing_chance": sum(target) / len(a)}


def test_scores_against_loop_reference():
    rng = np.random.default_rng(0)
    for _ in range(20):  # B = 20 random maps and masks over 16 patches
        attention = rng.random(16) * (rng.random(16) > 0.3) + 1e-3
        target = rng.random(16) > 0.7
        target[rng.integers(16)] = True
        objects = rng.random(16) > 0.5
        got, want = attention_scores(attention, target, objects), _reference(attention, target, objects)
        for key, value in want.items():
            assert got[key] == (None if value is None else pytest.approx(value)), key


def test_scores_degenerate_cases():
    target = np.array([True, False, False, False])
    uniform = attention_scores(np.ones(4), target, target)
    assert uniform["target_enrichment"] == pytest.approx(1.0) and uniform["selection"] is None  # no other object
    assert uniform["pointing"] == 1.0  # a tie goes to the first patch
    focused = attention_scores(np.array([0.0, 0.0, 5.0, 0.0]), target, np.array([False, False, True, False]))
    assert focused["target_enrichment"] == 0.0 and focused["selection"] == 0.0 and focused["pointing"] == 0.0
    assert focused["objects_enrichment"] == pytest.approx(4 / 2)  # half its weight per patch of the 2 object patches
    everywhere = attention_scores(np.ones(4), np.ones(4, bool), np.zeros(4, bool))
    assert everywhere["target_enrichment"] == pytest.approx(1.0) and everywhere["pointing_chance"] == 1.0
    with pytest.raises(ValueError, match="without weight"):
        attention_scores(np.zeros(4), target, target)


def test_summarise_means_and_selection_subset():
    rows = [{"target_enrichment": 2.0, "objects_enrichment": 1.0, "selection": None, "pointing": 1.0,
             "pointing_chance": 0.25},
            {"target_enrichment": 4.0, "objects_enrichment": 3.0, "selection": 1.5, "pointing": 0.0,
             "pointing_chance": 0.5}]
    records = [dict(r, layers=[r, r]) for r in rows]
    s = summarise(records, skipped=3)
    assert (s["target_enrichment"], s["selection"], s["pointing"], s["n"], s["skipped"]) == (3.0, 1.5, 0.5, 2, 3)
    assert s["n_selection"] == 1 and len(s["layers"]) == 2 and s["layers"][1]["pointing_chance"] == 0.375
    with pytest.raises(ValueError):
        summarise([], skipped=0)


class AttendingVLM(FakeVLM):
    """Image k's attention, 2 layers over a 2 x 2 grid: layer 0 on patch k % 4, layer 1 uniform."""

    def image_attention(self, pixel_values, prompts, answer_prefix=""):
        assert answer_prefix == "[" and pixel_values.shape[0] == len(prompts) == 1  # one prompt a forward
        out = torch.full((len(prompts), 2, 4), 0.25)
        for b, k in enumerate(image_number(pixel_values)):
            out[b, 0] = torch.nn.functional.one_hot(torch.tensor(k % 4), 4).float()
        return out


def test_run_scores_the_fake_attention(tmp_path):
    """Image 1 (two objects, top-right and bottom-left quadrants of 16 x 16): layer 0 looks at patch 1,
    the top right. The first expression names that object: pointing 1; the second names the other:
    pointing 0, selection 1/3 on the mean map; a third box holds no patch centre: skipped."""
    write_image(tmp_path / "im" / "a.png", 1)
    refs = [RefExpr(1, 11, 1, "a.png", ["the right one"], (8.0, 0.0, 8.0, 8.0), "val", 16, 16),
            RefExpr(2, 12, 1, "a.png", ["the left one"], (0.0, 8.0, 8.0, 8.0), "val", 16, 16),
            RefExpr(3, 13, 1, "a.png", ["a speck"], (0.0, 0.0, 1.0, 1.0), "val", 16, 16)]
    boxes = {1: [(8.0, 0.0, 16.0, 8.0), (0.0, 8.0, 8.0, 16.0), (0.0, 0.0, 1.0, 1.0)]}
    s = run(AttendingVLM(), RefcocoData(refs, tmp_path / "im", boxes), tmp_path / "out",
            options=RunOptions(progress=False))
    assert (s["n"], s["skipped"]) == (2, 1)
    assert s["layers"][0]["pointing"] == 0.5 and s["layers"][1]["target_enrichment"] == pytest.approx(1.0)
    # mean map [0.125, 0.625, 0.125, 0.125]: right one 0.625 * 4, left one 0.125 * 4; objects (2 patches) 0.375 * 4
    assert s["target_enrichment"] == pytest.approx((2.5 + 0.5) / 2)
    assert s["selection"] == pytest.approx((0.625 / 0.375 + 0.125 / 0.375) / 2)
    folder = tmp_path / "out" / "grounding_attention"
    lines = [json.loads(x) for x in (folder / "predictions.jsonl").read_text().splitlines()]
    assert [r["pointing"] for r in lines] == [1.0, 0.0] and lines[0]["grid"] == 2
    assert (tmp_path / "out" / "grounding_attention" / "attention.png").stat().st_size > 0
    assert "selection" in (tmp_path / "out" / "grounding_attention" / "summary.md").read_text()


def test_run_needs_attention(tmp_path):
    write_image(tmp_path / "im" / "a.png", 1)
    refs = [RefExpr(1, 11, 1, "a.png", ["x"], (0.0, 0.0, 8.0, 8.0), "val", 16, 16)]
    with pytest.raises(ValueError, match="no attention over its image tokens"):
        run(FakeVLM(), RefcocoData(refs, tmp_path / "im"), tmp_path / "out", options=RunOptions(progress=False))
