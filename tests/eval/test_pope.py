"""POPE metrics against hand-computed values, AUC against a float64 pair loop, and run() end to end."""
import json
import random

import pytest
from eval_fakes import FakeVLM, write_image

from eval.io import RunOptions
from eval.pope import PopeData, binary_metrics, pope_summary, roc_auc, run
from vlm.data.formats import PopeQuestion
from vlm.data.prompts import pope_prompt


def test_binary_metrics_hand_computed():
    pred = [True, True, False, False, True, False]
    gold = [True, False, False, True, True, False]
    m = binary_metrics(pred, gold)  # tp 2, fp 1, fn 1, tn 2
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 6)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 2, 1)


def test_binary_metrics_degenerate():
    m = binary_metrics([False] * 4, [True, False, True, False])  # never says yes
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0 and m["yes_ratio"] == 0.0
    assert m["accuracy"] == 0.5
    with pytest.raises(ValueError):
        binary_metrics([], [])
    with pytest.raises(ValueError):
        binary_metrics([True], [True, False])


def auc_loop(scores, labels):
    pos = [float(s) for s, y in zip(scores, labels) if y]
    neg = [float(s) for s, y in zip(scores, labels) if not y]
    total = 0.0
    for p in pos:
        for n in neg:
            total += 1.0 if p > n else 0.5 if p == n else 0.0
    return total / (len(pos) * len(neg))


def test_auc_matches_pair_loop():
    rng = random.Random(0)
    for n in (2, 5, 17, 60):
        scores = [rng.choice([-1.0, 0.0, 0.5, 2.0]) if rng.random() < 0.4 else rng.gauss(0, 1) for _ in range(n)]
        labels = [i % 2 == 0 for i in range(n)]
        rng.shuffle(labels)
        assert roc_auc(scores, labels) == pytest.approx(auc_loop(scores, labels), abs=1e-12)
    assert roc_auc([0.1, 0.9], [False, True]) == 1.0
    assert roc_auc([3.0, 3.0, 3.0], [True, False, True]) == 0.5
    assert roc_auc([1.0, 2.0], [True, True]) != roc_auc([1.0, 2.0], [True, True])  # NaN: one class


def test_summary_averages_f1_over_splits():
    s = pope_summary({"random": ([True, False], [True, False], None),
                      "popular": ([True, True], [True, False], [1.0, 2.0])})
    assert s["random"]["f1"] == 1.0
    assert s["popular"]["f1"] == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert s["f1_avg"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert s["popular"]["auc"] == 0.0 and "auc" not in s["random"]


@pytest.fixture()
def pope_data(tmp_path):
    for k in range(3):
        write_image(tmp_path / "images" / f"{k}.png", k)
    qs = {"random": [PopeQuestion(0, "0.png", "Is there a circle in the image?", "yes"),
                     PopeQuestion(1, "0.png", "Is there a star in the image?", "no"),
                     PopeQuestion(2, "1.png", "Is there a star in the image?", "yes")],
          "adversarial": [PopeQuestion(3, "2.png", "Is there a heart in the image?", "no"),
                          PopeQuestion(4, "2.png", "Is there a circle in the image?", "yes")]}
    return PopeData(qs, tmp_path / "images")


def test_run_scoring(pope_data, tmp_path):
    p = pope_prompt
    scores = {(0, p("Is there a circle in the image?")): [-0.1, -2.0],  # yes (correct)
              (0, p("Is there a star in the image?")): [-0.5, -1.0],  # yes (wrong)
              (1, p("Is there a star in the image?")): [-3.0, -0.1],  # no (wrong)
              (2, p("Is there a heart in the image?")): [-2.0, -0.2],  # no (correct)
              (2, p("Is there a circle in the image?")): [-0.3, -0.4]}  # yes (correct)
    model = FakeVLM(scores=scores)
    out = tmp_path / "out"
    s = run(model, pope_data, out, batch_size=2, options=RunOptions(progress=False))
    assert s["random"]["accuracy"] == pytest.approx(1 / 3)
    assert s["random"]["precision"] == pytest.approx(1 / 2) and s["random"]["recall"] == pytest.approx(1 / 2)
    assert s["adversarial"]["accuracy"] == 1.0 and s["adversarial"]["auc"] == 1.0
    # margins (yes - no): random 1.9 (pos), 0.5 (neg), -2.9 (pos) -> AUC 1/2
    assert s["random"]["auc"] == pytest.approx(0.5)
    assert s["f1_avg"] == pytest.approx((0.5 + 1.0) / 2)
    lines = [json.loads(x) for x in (out / "pope" / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 5 and {"id", "prompt", "answer", "gold", "correct", "logp_yes"} <= set(lines[0])
    assert json.loads((out / "pope" / "summary.json").read_text())["f1_avg"] == pytest.approx(0.75)
    assert "| random |" in (out / "pope" / "summary.md").read_text()


def test_run_generate_and_limit(pope_data, tmp_path):
    texts = {(0, pope_prompt("Is there a circle in the image?")): "Yes, there is.",
             (0, pope_prompt("Is there a star in the image?")): "No, there is not."}
    model = FakeVLM(texts=texts, default_text="I do not know")
    s = run(model, pope_data, tmp_path / "o", limit=2, options=RunOptions(answer_mode="generate", progress=False))
    assert s["random"]["n"] == 2 and s["random"]["accuracy"] == 1.0
    assert s["adversarial"]["n"] == 2 and s["adversarial"]["yes_ratio"] == 0.0  # "not" -> no
    assert "auc" not in s["random"]
    with pytest.raises(ValueError, match="mode"):
        run(model, pope_data, tmp_path / "o", options=RunOptions(answer_mode="vote"))
