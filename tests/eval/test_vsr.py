"""VSR: accuracy overall and per relation, AUC, run() in both modes."""
import pytest
from eval_fakes import FakeVLM, write_image

from eval.io import RunOptions
from eval.vsr import VsrData, run, vsr_metrics
from vlm.data.formats import VsrItem
from vlm.data.prompts import vsr_prompt


def test_metrics_per_relation():
    pred = [True, False, True, None, False]
    gold = [True, True, True, False, False]
    rels = ["left of", "left of", "above", "above", "next to"]
    m = vsr_metrics(pred, gold, rels, margins=[1.0, -0.5, 2.0, 0.0, -1.0])
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["relations"]["left of"] == {"accuracy": 0.5, "n": 2}
    assert m["relations"]["above"]["accuracy"] == 0.5  # None counts as wrong
    assert m["relations"]["next to"]["accuracy"] == 1.0
    assert m["unparseable"] == 1
    # positives 1.0, -0.5, 2.0 vs negatives 0.0, -1.0: 5 of 6 pairs ordered
    assert m["auc"] == pytest.approx(5 / 6)
    with pytest.raises(ValueError):
        vsr_metrics([True], [True, False], ["a"])


def test_run_modes(tmp_path):
    for k in range(2):
        write_image(tmp_path / "im" / f"{k}.png", k)
    items = [VsrItem("0.png", "The circle is left of the star.", 1, "left of"),
             VsrItem("0.png", "The star is left of the circle.", 0, "left of"),
             VsrItem("1.png", "The heart is above the cross.", 1, "above")]
    scores = {(0, vsr_prompt(items[0].caption)): [-0.1, -3.0],  # true: correct
              (0, vsr_prompt(items[1].caption)): [-0.2, -1.0],  # true: wrong
              (1, vsr_prompt(items[2].caption)): [-2.0, -0.5]}  # false: wrong
    s = run(FakeVLM(scores=scores), VsrData(items, tmp_path / "im"), tmp_path / "o", batch_size=2,
            options=RunOptions(progress=False))
    assert s["accuracy"] == pytest.approx(1 / 3)
    assert s["relations"]["left of"]["accuracy"] == 0.5 and s["relations"]["above"]["accuracy"] == 0.0
    assert s["auc"] == pytest.approx(0.5)  # margins: pos 2.9, -1.5; neg 0.8
    texts = {(0, vsr_prompt(items[0].caption)): "True.", (0, vsr_prompt(items[1].caption)): "false"}
    g = run(FakeVLM(texts=texts, default_text="maybe"), VsrData(items, tmp_path / "im"), tmp_path / "g",
            options=RunOptions(answer_mode="generate", progress=False))
    assert g["accuracy"] == pytest.approx(2 / 3) and g["unparseable"] == 1 and "auc" not in g
    assert (tmp_path / "g" / "vsr" / "predictions.jsonl").read_text().count("\n") == 3
