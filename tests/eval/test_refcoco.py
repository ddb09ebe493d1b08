"""RefCOCO: IoU cases, Acc@0.5 per split with unparseable outputs, run() with a fake model."""
import json

import pytest
from eval_fakes import FakeVLM, write_image

from eval.io import RunOptions
from eval.refcoco import RefcocoData, box_iou, denormalise, ground, grounding_metrics, run, xywh_to_xyxy
from vlm.data.formats import RefExpr
from vlm.data.prompts import grounding_prompt


def test_iou_cases():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0  # identical
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0  # disjoint
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching edges
    assert box_iou((0, 0, 10, 10), (2, 2, 7, 7)) == pytest.approx(25 / 100)  # contained
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)  # half overlap
    assert box_iou((5, 5, 5, 5), (5, 5, 5, 5)) == 0.0  # two zero-area boxes
    assert box_iou((3, 3, 3, 8), (0, 0, 10, 10)) == 0.0  # zero width
    assert box_iou((8, 8, 2, 2), (0, 0, 10, 10)) == 0.0  # flipped corners count as empty


def test_conversions():
    assert xywh_to_xyxy([10, 20, 30, 40]) == (10.0, 20.0, 40.0, 60.0)
    assert denormalise((0.5, 0.25, 1.0, 1.0), 64, 32) == (32.0, 8.0, 64.0, 32.0)


def test_acc_with_unparseable():
    m = grounding_metrics([0.9, 0.5, 0.49, None, None, 0.7], ["val", "val", "val", "val", "testA", "testA"])
    assert m["acc"] == pytest.approx(3 / 6)
    assert m["unparseable"] == 2 and m["unparseable_rate"] == pytest.approx(2 / 6)
    assert m["splits"]["val"]["acc"] == pytest.approx(2 / 4) and m["splits"]["val"]["unparseable"] == 1
    assert m["splits"]["testA"]["acc"] == pytest.approx(1 / 2)
    assert m["mean_iou"] == pytest.approx((0.9 + 0.5 + 0.49 + 0.7) / 6)  # unparseable counts as IoU 0
    with pytest.raises(ValueError):
        grounding_metrics([], [])


def test_run(tmp_path):
    write_image(tmp_path / "im" / "a.png", 1)
    write_image(tmp_path / "im" / "b.png", 2)
    refs = [RefExpr(1, 11, 1, "a.png", ["the red circle", "left thing"], (0.0, 0.0, 32.0, 32.0), "val", 64, 64),
            RefExpr(2, 12, 2, "b.png", ["the star"], (10.0, 20.0, 20.0, 20.0), "test", 40, 80)]
    texts = {(1, grounding_prompt("the red circle")): "[0.0, 0.0, 0.5, 0.5]",  # exact
             (1, grounding_prompt("left thing")): "It is at [0.5, 0.5, 1.0, 1.0].",  # disjoint
             (2, grounding_prompt("the star")): "somewhere"}  # unparseable
    s = run(FakeVLM(texts=texts), RefcocoData(refs, tmp_path / "im"), tmp_path / "out", batch_size=2,
            options=RunOptions(progress=False))
    assert s["acc"] == pytest.approx(1 / 3) and s["unparseable"] == 1
    assert s["splits"]["val"]["acc"] == 0.5 and s["splits"]["test"]["unparseable"] == 1
    lines = [json.loads(x) for x in (tmp_path / "out" / "refcoco" / "predictions.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in lines] == [True, False, False]
    assert lines[2]["parse_failed"] and lines[2]["iou"] is None
    assert lines[0]["gold_box_px"] == [0.0, 0.0, 32.0, 32.0]
    assert "unparseable" in (tmp_path / "out" / "refcoco" / "summary.md").read_text()
    s2 = run(FakeVLM(texts=texts), RefcocoData(refs, tmp_path / "im"), tmp_path / "o2", limit=1,
             options=RunOptions(progress=False))
    assert s2["n"] == 1 and s2["acc"] == 1.0


def test_non_square_image_padded_and_box_scored_in_pixels(tmp_path):
    """A 640x480 image with its object at the bottom-right border, [600, 440, 640, 480] px. The model
    sees the image padded to 640x640 and answers in that square ([0.9375, 0.8125, 1.0, 0.875]);
    mapped back, the box is the object's exactly (IoU 1). Read as a fraction of the image itself
    (no padding) it would miss (IoU < 0.5)."""
    import numpy as np
    from PIL import Image

    arr = np.full((480, 640, 3), 30, dtype=np.uint8)
    arr[440:, 600:] = (255, 0, 0)
    Image.fromarray(arr).save(tmp_path / "wide.png")
    ref = RefExpr(1, 11, 1, "wide.png", ["the red block"], (600.0, 440.0, 40.0, 40.0), "val", 640, 480)
    seen = []

    class Model(FakeVLM):
        def generate(self, pixel_values, prompts, max_new_tokens=32, **kwargs):
            seen.append(pixel_values)
            return ["[0.9375, 0.8125, 1.0, 0.875]"] * len(prompts)

    s = run(Model(), RefcocoData([ref], tmp_path), tmp_path / "out", options=RunOptions(progress=False))
    assert s["acc"] == 1.0 and s["box_frame"] == "square"
    rec = json.loads((tmp_path / "out" / "refcoco" / "predictions.jsonl").read_text())
    assert rec["pred_box_px"] == pytest.approx([600, 440, 640, 480]) and rec["iou"] == pytest.approx(1.0)
    assert tuple(seen[0].shape[-2:]) == (640, 640)  # FakeVLM's transform keeps the size: the padded square
    assert Image.open(tmp_path / "wide.png").size == (640, 480)
    assert box_iou(denormalise((0.9375, 0.8125, 1.0, 0.875), 640, 480), (600, 440, 640, 480)) < 0.5


def _reference_metrics(ious, any_ious, n_objects, threshold=0.5):
    """Plain float64 loop: Acc@threshold, any-object hits and mean IoU overall and per object count."""
    def block(idx):
        acc = any_hit = iou_sum = 0.0
        for i in idx:
            if ious[i] is not None:
                iou_sum += float(ious[i])
                acc += float(ious[i]) >= threshold
            if any_ious[i] is not None:
                any_hit += float(any_ious[i]) >= threshold
        return acc / len(idx), any_hit / len(idx), iou_sum / len(idx)
    groups = {}
    for i, n in enumerate(n_objects):
        groups.setdefault(n, []).append(i)
    return block(range(len(ious))), {str(n): block(groups[n]) for n in groups}


def test_any_object_and_by_objects_against_loop_reference():
    """B = 7 over 1-, 2- and 3-object images: a box on the wrong object (iou < 0.5, iou_any >= 0.5)
    counts for acc_any_object only; unparseable counts for neither."""
    ious = [0.9, 0.1, None, 0.0, 0.6, 0.3, 0.5]
    any_ious = [0.9, 0.8, None, 0.7, 0.6, 0.3, 0.5]
    n_objects = [1, 2, 2, 3, 3, 3, 1]
    m = grounding_metrics(ious, ["val"] * 7, any_ious=any_ious, n_objects=n_objects)
    (acc, any_hit, miou), per_n = _reference_metrics(ious, any_ious, n_objects)
    assert (m["acc"], m["acc_any_object"], m["mean_iou"]) == pytest.approx((acc, any_hit, miou))
    assert (acc, any_hit) == pytest.approx((3 / 7, 5 / 7))
    assert list(m["by_objects"]) == ["1", "2", "3"]
    for n, (a, h, i) in per_n.items():
        got = m["by_objects"][n]
        assert (got["acc"], got["acc_any_object"], got["mean_iou"]) == pytest.approx((a, h, i))
    assert m["by_objects"]["2"]["unparseable"] == 1 and m["by_objects"]["1"]["acc"] == 1.0
    assert m["splits"]["val"]["acc_any_object"] == pytest.approx(5 / 7)


def test_any_object_degenerate_cases():
    none = grounding_metrics([None, None], ["a", "b"], any_ious=[None, None], n_objects=[1, 4])
    assert none["acc"] == none["acc_any_object"] == none["mean_iou"] == 0.0 and none["unparseable"] == 2
    alone = grounding_metrics([0.7, 0.2], ["a", "a"])  # no other objects known: any object = the referred one
    assert alone["acc_any_object"] == alone["acc"] == 0.5 and "by_objects" not in alone
    with pytest.raises(ValueError):
        grounding_metrics([0.7], ["a"], any_ious=[0.7, 0.1])
    with pytest.raises(ValueError):
        grounding_metrics([0.7], ["a"], n_objects=[1, 2])


def test_ground_scores_every_object_of_the_image():
    """Gold [0, 0, 10, 10] among two annotated boxes (listed again in ``objects``: counted once);
    a box on the other object is wrong but hits an object."""
    ref = RefExpr(1, 11, 1, "a.png", ["the left one"], (0.0, 0.0, 10.0, 10.0), "val", 20, 20)
    others = [(0.0, 0.0, 10.0, 10.0), (10.0, 10.0, 20.0, 20.0)]
    wrong = ground(ref, "the left one", "p", "[0.5, 0.5, 1.0, 1.0]", 0, objects=others)
    assert wrong["iou"] == 0.0 and wrong["iou_any"] == pytest.approx(1.0) and wrong["n_objects"] == 2
    assert not wrong["correct"]
    right = ground(ref, "the left one", "p", "[0.0, 0.0, 0.5, 0.5]", 1, objects=others)
    assert right["iou"] == right["iou_any"] == pytest.approx(1.0)
    missing = ground(ref, "the left one", "p", "no box", 2, objects=others)
    assert missing["iou"] is None and missing["iou_any"] is None
    assert ground(ref, "the left one", "p", "[0.0, 0.0, 0.5, 0.5]", 3)["n_objects"] == 1


def test_run_reports_wrong_object_boxes(tmp_path):
    """Two objects in one image, two expressions: one boxed right, one boxed on the other object."""
    write_image(tmp_path / "im" / "a.png", 1)
    refs = [RefExpr(1, 11, 1, "a.png", ["the left one"], (0.0, 0.0, 32.0, 32.0), "val", 64, 64),
            RefExpr(2, 12, 1, "a.png", ["the right one"], (32.0, 32.0, 32.0, 32.0), "val", 64, 64)]
    texts = {(1, grounding_prompt("the left one")): "[0.0, 0.0, 0.5, 0.5]",
             (1, grounding_prompt("the right one")): "[0.0, 0.0, 0.5, 0.5]"}
    boxes = {1: [(0.0, 0.0, 32.0, 32.0), (32.0, 32.0, 64.0, 64.0)]}
    s = run(FakeVLM(texts=texts), RefcocoData(refs, tmp_path / "im", boxes), tmp_path / "out",
            options=RunOptions(progress=False))
    assert s["acc"] == 0.5 and s["acc_any_object"] == 1.0 and s["by_objects"]["2"]["n"] == 2
    md = (tmp_path / "out" / "refcoco" / "summary.md").read_text()
    assert "By objects in the image" in md and "any object" in md
