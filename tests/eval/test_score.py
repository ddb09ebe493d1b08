"""``vlm score``: outputs made elsewhere, scored against hand-computed numbers; harness outputs re-score
to the same summary."""
from __future__ import annotations

import json

import pytest
from eval_fakes import FakeVLM, write_image

from eval import pope, vsr
from eval.io import RunOptions
from eval.score import score_caption, score_chair, score_pope, score_refcoco, score_vsr
from vlm.cli import main
from vlm.data.formats import (PopeQuestion, RefExpr, VsrItem, write_coco_captions, write_coco_instances, write_pope,
                              write_refcoco, write_vsr)
from vlm.data.prompts import pope_prompt, vsr_prompt


def jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def summary_of(out, task):
    return json.loads((out / task / "summary.json").read_text())


@pytest.fixture
def pope_files(tmp_path):
    qs = [PopeQuestion(1, "a.jpg", "Is there a dog in the image?", "yes"),
          PopeQuestion(2, "a.jpg", "Is there a cat in the image?", "yes"),
          PopeQuestion(3, "b.jpg", "Is there a car in the image?", "no"),
          PopeQuestion(4, "b.jpg", "Is there a bus in the image?", "no")]
    write_pope(tmp_path / "coco_pope_random.json", qs)
    write_pope(tmp_path / "coco_pope_popular.json", qs)
    return tmp_path


def test_pope_generated_answers_hand_computed(pope_files, tmp_path):
    """Answers parsed as POPE's evaluate.py: yes, no, yes, no against gold yes, yes, no, no:
    tp = fp = tn = fn = 1, so accuracy = precision = recall = F1 = yes-ratio = 0.5; a second split,
    all right, F1 1.0; f1_avg 0.75."""
    jsonl(tmp_path / "answers_random.jsonl", [
        {"question_id": 1, "text": "Yes, there is a dog."}, {"question_id": 2, "text": "No. There is a cat."},
        {"question_id": 3, "text": "There is a car"}, {"question_id": 4, "text": "There is not a bus."}])
    jsonl(tmp_path / "answers_popular.jsonl", [
        {"question_id": i, "text": t} for i, t in [(1, "Yes"), (2, "yes"), (3, "no"), (4, "No, none.")]])
    rc = main(["score", "pope", "--questions", str(pope_files / "coco_pope_random.json"),
               str(pope_files / "coco_pope_popular.json"), "--predictions", str(tmp_path / "answers_random.jsonl"),
               str(tmp_path / "answers_popular.jsonl"), "--out", str(tmp_path / "out")])
    assert rc == 0
    s = summary_of(tmp_path / "out", "pope")
    assert s["mode"] == "generate"
    assert {k: s["random"][k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")} == \
        {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "yes_ratio": 0.5}
    assert s["popular"]["f1"] == 1.0 and s["f1_avg"] == 0.75
    assert sum(1 for _ in open(tmp_path / "out" / "pope" / "predictions.jsonl")) == 8


def test_pope_log_probabilities_give_auc(pope_files, tmp_path):
    """Margins 2, -1, 1, -3 for gold yes, yes, no, no: answers yes, no, yes, no; AUC = P(pos > neg)
    = (1 + 1 + 0 + 1) / 4 = 0.75."""
    margins = {1: 2.0, 2: -1.0, 3: 1.0, 4: -3.0}
    preds = jsonl(tmp_path / "p.jsonl", [{"question_id": i, "logp_yes": m, "logp_no": 0.0} for i, m in margins.items()])
    s = score_pope([preds], [pope_files / "coco_pope_random.json"], tmp_path / "out")
    assert s["mode"] == "score" and s["random"]["accuracy"] == 0.5 and s["random"]["auc"] == 0.75


def test_pope_rejects_unknown_and_duplicate_questions(pope_files, tmp_path):
    q = [pope_files / "coco_pope_random.json"]
    with pytest.raises(ValueError, match="name no question"):
        score_pope([jsonl(tmp_path / "a.jsonl", [{"question_id": 9, "text": "yes"}])], q, tmp_path / "o")
    with pytest.raises(ValueError, match="twice"):
        score_pope([jsonl(tmp_path / "b.jsonl", [{"question_id": 1, "text": "yes"}] * 2)], q, tmp_path / "o")


def test_chair_hand_computed(tmp_path):
    """Image 1 holds a dog; image 2 a cat and a person. "A dog and a cat on a bench." mentions dog,
    cat, bench (cat, bench hallucinated); "A woman holding two kittens." mentions person, cat (none).
    CHAIR_i = 2/5, CHAIR_s = 1/2, recall = 3/3, mean length (8 + 5) / 2. With reference captions
    that name a bench, bench is present: CHAIR_i = 1/5."""
    images = {1: {"file_name": "1.jpg", "width": 10, "height": 10}, 2: {"file_name": "2.jpg", "width": 10, "height": 10}}
    write_coco_instances(tmp_path / "inst.json", images, {18: "dog", 17: "cat", 1: "person"},
                         {1: {"image_id": 1, "category_id": 18, "bbox": [0, 0, 5, 5]},
                          2: {"image_id": 2, "category_id": 17, "bbox": [0, 0, 5, 5]},
                          3: {"image_id": 2, "category_id": 1, "bbox": [0, 0, 5, 5]}})
    preds = tmp_path / "caps.json"  # COCO's results format: one JSON list
    preds.write_text(json.dumps([{"image_id": 1, "caption": "A dog and a cat on a bench."},
                                 {"image_id": 2, "caption": "A woman holding two kittens."}]))
    s = score_chair(preds, tmp_path / "inst.json", tmp_path / "out")
    assert (s["chair_i"], s["chair_s"], s["recall"], s["mean_length"]) == (0.4, 0.5, 1.0, 6.5)
    assert set(s) >= {"chair_i", "chair_s", "recall", "mean_length", "n_captions", "prompt"}
    write_coco_captions(tmp_path / "refs.json", {1: "1.jpg", 2: "2.jpg"},
                        {1: ["A dog sits on a bench."], 2: ["A woman and her cat."]})
    s = score_chair(preds, tmp_path / "inst.json", tmp_path / "out2", captions=tmp_path / "refs.json")
    assert s["chair_i"] == pytest.approx(0.2)


def test_refcoco_boxes_in_original_pixels(tmp_path):
    """A 100x50 image, gold xywh [10, 10, 40, 20] = xyxy [10, 10, 50, 30] px. Padded to 100x100 the
    image sits 25 px down, so the box is [0.1, 0.35, 0.5, 0.55] in the square ("square" frame) and
    [0.1, 0.2, 0.5, 0.6] of the image itself ("image" frame, lmms-eval): IoU 1 either way. The
    second sentence's answer has no box (unparseable, wrong): Acc@0.5 = 1/2."""
    ref = RefExpr(ref_id=7, ann_id=70, image_id=3, file_name="3.jpg", sentences=["left dog", "small dog"],
                  bbox_xywh=(10, 10, 40, 20), split="val", width=100, height=50)
    write_refcoco(tmp_path / "refs.json", tmp_path / "inst.json", [ref])
    for frame, box in (("square", "[0.1, 0.35, 0.5, 0.55]"), ("image", "[0.1, 0.2, 0.5, 0.6]")):
        preds = jsonl(tmp_path / "p.jsonl", [{"ref_id": 7, "sentence": "left dog", "text": box},
                                              {"ref_id": 7, "sent_index": 1, "text": "the dog"}])
        s = score_refcoco(preds, tmp_path / "refs.json", tmp_path / "inst.json", tmp_path / frame, box_frame=frame)
        assert (s["acc"], s["unparseable"], s["n"], s["splits"]["val"]["acc"]) == (0.5, 1, 2, 0.5)
        assert s["box_frame"] == frame
        rec = [json.loads(x) for x in open(tmp_path / frame / "refcoco" / "predictions.jsonl")][0]
        assert rec["pred_box_px"] == pytest.approx([10, 10, 50, 30]) and rec["iou"] == pytest.approx(1.0)


def test_refcoco_any_object_from_the_instances_file(tmp_path):
    """Two annotated objects on one 100x100 image: the answer for the first boxes the second, so it is
    wrong (Acc@0.5 0) but boxes an object of the image (any object 1.0), read from instances.json."""
    refs = [RefExpr(ref_id=1, ann_id=10, image_id=5, file_name="5.jpg", sentences=["the cat"],
                    bbox_xywh=(0, 0, 40, 40), split="val", width=100, height=100),
            RefExpr(ref_id=2, ann_id=20, image_id=5, file_name="5.jpg", sentences=["the dog"],
                    bbox_xywh=(60, 60, 40, 40), split="val", width=100, height=100)]
    write_refcoco(tmp_path / "refs.json", tmp_path / "inst.json", refs)
    preds = jsonl(tmp_path / "p.jsonl", [{"ref_id": 1, "text": "[0.6, 0.6, 1.0, 1.0]"}])
    s = score_refcoco(preds, tmp_path / "refs.json", tmp_path / "inst.json", tmp_path / "out")
    assert (s["acc"], s["acc_any_object"], list(s["by_objects"])) == (0.0, 1.0, ["2"])


def test_vsr_hand_computed(tmp_path):
    """Answers True, False, unparseable against gold true, true, false: accuracy 1/3, 1 unparseable;
    per relation: left of 1/2, on 0/1."""
    write_vsr(tmp_path / "vsr.jsonl", [VsrItem("a.jpg", "The cat is left of the dog.", 1, "left of"),
                                       VsrItem("a.jpg", "The dog is left of the cat.", 1, "left of"),
                                       VsrItem("b.jpg", "The cup is on the table.", 0, "on")])
    preds = jsonl(tmp_path / "p.jsonl", [{"id": 0, "text": "True"}, {"id": 1, "text": "false."},
                                         {"id": 2, "text": "maybe"}])
    s = score_vsr(preds, tmp_path / "vsr.jsonl", tmp_path / "out")
    assert s["accuracy"] == pytest.approx(1 / 3) and s["unparseable"] == 1 and s["mode"] == "generate"
    assert s["relations"] == {"left of": {"accuracy": 0.5, "n": 2}, "on": {"accuracy": 0.0, "n": 1}}


def test_caption_identical_prediction(tmp_path):
    """A prediction equal to its single reference: BLEU-1..4 and ROUGE-L are 1."""
    write_coco_captions(tmp_path / "refs.json", {5: "5.jpg"}, {5: ["a red circle left of a blue square"]})
    preds = jsonl(tmp_path / "p.jsonl", [{"image_id": 5, "caption": "a red circle left of a blue square"}])
    s = score_caption(preds, tmp_path / "refs.json", tmp_path / "out")
    assert s["BLEU_1"] == pytest.approx(1.0, abs=1e-6) and s["BLEU_4"] == pytest.approx(1.0, abs=1e-6)
    assert s["ROUGE_L"] == pytest.approx(1.0) and s["prompt"] is None


def test_harness_predictions_rescore_to_the_same_summary(tmp_path):
    """POPE and VSR run by the harness (score and generate modes), then ``vlm score`` on the
    harness's own predictions.jsonl: the same summary."""
    for k in (1, 2):
        write_image(tmp_path / "img" / f"{k}.png", k)
    qs = [PopeQuestion(i, f"{1 + i % 2}.png", f"Is there a thing {i} in the image?", "yes" if i % 3 else "no")
          for i in range(6)]
    items = [VsrItem(f"{1 + i % 2}.png", f"Statement {i}.", i % 2, "near" if i < 3 else "far") for i in range(5)]
    write_pope(tmp_path / "random.jsonl", qs)
    write_vsr(tmp_path / "vsr.jsonl", items)
    scores = {(1 + q.question_id % 2, pope_prompt(q.text)): [0.1 * q.question_id, 0.25] for q in qs}
    scores.update({(1 + i % 2, vsr_prompt(it.caption)): [0.3 * i, 0.5] for i, it in enumerate(items)})
    texts = {(1 + q.question_id % 2, pope_prompt(q.text)): "No." if q.question_id % 2 else "Yes" for q in qs}
    texts.update({(1 + i % 2, vsr_prompt(it.caption)): "True" if i % 3 else "False" for i, it in enumerate(items)})
    model = FakeVLM(texts=texts, scores=scores)
    for mode in ("score", "generate"):
        ran = tmp_path / f"ran_{mode}"
        options = RunOptions(progress=False, answer_mode=mode)
        p = pope.run(model, pope.PopeData({"random": qs}, tmp_path / "img"), ran, options=options)
        v = vsr.run(model, vsr.VsrData(items, tmp_path / "img"), ran, options=options)
        assert score_pope([ran / "pope" / "predictions.jsonl"], [tmp_path / "random.jsonl"], tmp_path / "s",
                          prompt_set="world") == \
            json.loads(json.dumps(p))
        assert score_vsr(ran / "vsr" / "predictions.jsonl", tmp_path / "vsr.jsonl", tmp_path / "s",
                         prompt_set="world") == \
            json.loads(json.dumps(v))
