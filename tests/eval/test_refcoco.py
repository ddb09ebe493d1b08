"""RefCOCO: IoU cases, Acc@0.5 per split with unparseable outputs, run() with a fake model."""
import json

import pytest
from eval_fakes import FakeVLM, write_image

from eval.io import RunOptions
from eval.refcoco import RefcocoData, box_iou, denormalise, grounding_metrics, run, xywh_to_xyxy
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
