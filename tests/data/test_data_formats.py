"""Real-format readers and writers: round trips, and malformed files naming file and line."""
import json

import pytest

from vlm.data.formats import (FormatError, LlavaRecord, PopeQuestion, RefExpr, VsrItem, read_coco_captions,
                              read_coco_instances, read_llava, read_pope, read_refcoco, read_vsr, write_coco_captions,
                              write_coco_instances, write_llava, write_pope, write_refcoco, write_vsr)


def test_coco_captions_round_trip(tmp_path):
    images = {1: "a.jpg", 7: "b.jpg", 9: "c.jpg"}
    caps = {1: ["a cat.", "one cat"], 7: ["a dog."], 9: []}
    write_coco_captions(tmp_path / "c.json", images, caps, sizes={1: (64, 48)})
    got = read_coco_captions(tmp_path / "c.json")
    assert got.images == images and got.captions == caps
    raw = json.loads((tmp_path / "c.json").read_text())
    assert raw["images"][0]["width"] == 64 and len({a["id"] for a in raw["annotations"]}) == 3


def test_coco_instances_round_trip(tmp_path):
    images = {3: {"file_name": "x.jpg", "width": 64, "height": 64}}
    cats = {1: "circle", 2: "star"}
    anns = {10: {"image_id": 3, "category_id": 2, "bbox": [1, 2, 3, 4]},
            11: {"image_id": 3, "category_id": 1, "bbox": [5.5, 0, 0, 2], "area": 1.0, "iscrowd": 0}}
    write_coco_instances(tmp_path / "i.json", images, cats, anns)
    got = read_coco_instances(tmp_path / "i.json")
    assert got.images == images and got.categories == cats
    assert got.annotations[10] == {"image_id": 3, "category_id": 2, "bbox": [1.0, 2.0, 3.0, 4.0], "area": 12.0, "iscrowd": 0}
    assert got.annotations[11]["area"] == 1.0


def test_llava_round_trip(tmp_path):
    recs = [LlavaRecord("0", "a.jpg", [("human", "<image>\nWhat?"), ("gpt", "A cat."), ("human", "Sure?"), ("gpt", "Yes")]),
            LlavaRecord("t", None, [("human", "Hi"), ("gpt", "Hello")])]
    write_llava(tmp_path / "l.json", recs)
    assert read_llava(tmp_path / "l.json") == recs


def test_pope_round_trip(tmp_path):
    qs = [PopeQuestion(1, "a.jpg", "Is there a cat in the image?", "yes"), PopeQuestion(2, "a.jpg", "Is there a dog?", "no")]
    write_pope(tmp_path / "p.jsonl", qs)
    assert read_pope(tmp_path / "p.jsonl") == qs


def test_refcoco_round_trip(tmp_path):
    refs = [RefExpr(1, 100, 5, "i5.jpg", ["the man", "left guy"], (1.0, 2.0, 10.0, 20.0), "testA", 640, 480, 1),
            RefExpr(2, 101, 6, "i6.jpg", ["red car"], (0.0, 0.0, 5.0, 5.0), "val", 320, 240, 2)]
    write_refcoco(tmp_path / "refs.json", tmp_path / "inst.json", refs, {1: "person", 2: "car"})
    assert read_refcoco(tmp_path / "refs.json", tmp_path / "inst.json") == refs
    raw = json.loads((tmp_path / "refs.json").read_text())
    assert raw[0]["sentences"][1] == {"raw": "left guy", "sent": "left guy", "tokens": ["left", "guy"], "sent_id": 1}


def test_vsr_round_trip_and_extra_fields(tmp_path):
    items = [VsrItem("a.jpg", "The cat is left of the dog.", 1, "left of", "cat", "dog"),
             VsrItem("b.jpg", "The cup is on the table.", 0, "on", extra={"image_link": "http://x", "annotator_id": 3})]
    write_vsr(tmp_path / "v.jsonl", items)
    assert read_vsr(tmp_path / "v.jsonl") == items
    line = {"image": "c.jpg", "image_link": "http://y", "caption": "x", "label": True, "relation": "near",
            "annotator_id": 7, "vote_true_validator": 2, "reference_frame": "relative"}
    (tmp_path / "w.jsonl").write_text(json.dumps(line) + "\n\n")
    (item,) = read_vsr(tmp_path / "w.jsonl")
    assert item.label == 1 and item.extra["reference_frame"] == "relative"


# ------------------------------------------------------------------------------------------------
# Malformed files: the error names the file, the line and what was wrong
# ------------------------------------------------------------------------------------------------


def _raises(fn, path, line, what):
    with pytest.raises(FormatError) as info:
        fn(path)
    err = info.value
    assert err.path == str(path) and err.line == line, (err.line, str(err))
    assert what in str(err) and str(path) in str(err)
    if line is not None:
        assert f":{line}:" in str(err)


def _pretty(tmp_path, name, obj):
    p = tmp_path / name
    p.write_text(json.dumps(obj, indent=1))
    return p, p.read_text().splitlines()


def _line_of(lines, needle, occurrence=0):
    hits = [i + 1 for i, l in enumerate(lines) if needle in l]
    return hits[occurrence]


def test_json_syntax_error_reports_its_line(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{"images": [\n {"id": 1, "file_name": "a.jpg"},\n {"id": 2 "file_name": "b.jpg"}\n]}')
    _raises(read_coco_captions, p, 3, "invalid JSON")


def test_coco_captions_errors(tmp_path):
    data = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
            "annotations": [{"image_id": 1, "caption": "ok"}, {"image_id": 2, "caption": "ok"},
                            {"image_id": 3, "caption": "orphan"}]}
    p, lines = _pretty(tmp_path, "c.json", data)
    _raises(read_coco_captions, p, _line_of(lines, '"image_id": 3') - 1, "image_id 3 is not in images")
    data["annotations"][2] = {"image_id": 2}
    p, lines = _pretty(tmp_path, "c.json", data)
    _raises(read_coco_captions, p, _line_of(lines, '"image_id": 2', 1) - 1, "missing key 'caption'")
    _raises(read_coco_captions, _pretty(tmp_path, "d.json", {"images": []})[0], None, "'annotations'")
    data["images"][1]["id"] = "2"
    p, lines = _pretty(tmp_path, "e.json", data)
    _raises(read_coco_captions, p, _line_of(lines, '"id": "2"') - 1, "'id' should be int")


def test_coco_instances_negative_box(tmp_path):
    data = {"images": [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 8}], "categories": [{"id": 1, "name": "c"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2]},
                            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, -2, 2]}]}
    p, lines = _pretty(tmp_path, "i.json", data)
    _raises(read_coco_instances, p, _line_of(lines, '"id": 2') - 1, "negative size")
    data["annotations"][1]["bbox"] = [0, 0, 2]
    p, lines = _pretty(tmp_path, "i.json", data)
    _raises(read_coco_instances, p, _line_of(lines, '"id": 2') - 1, "4 numbers")
    data["annotations"][1]["bbox"], data["annotations"][1]["category_id"] = [0, 0, 2, 2], 5
    p, lines = _pretty(tmp_path, "i.json", data)
    _raises(read_coco_instances, p, _line_of(lines, '"id": 2') - 1, "category_id 5")


def test_llava_errors(tmp_path):
    good = {"id": "a", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]}
    no_token = {"id": "b", "image": "b.jpg", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    p, lines = _pretty(tmp_path, "l.json", [good, no_token])
    _raises(read_llava, p, _line_of(lines, '"id": "b"') - 1, "lacks '<image>'")
    bad_role = {"id": "c", "conversations": [{"from": "human", "value": "Q"}, {"from": "human", "value": "A"}]}
    p, lines = _pretty(tmp_path, "l.json", [good, good, bad_role])
    _raises(read_llava, p, _line_of(lines, '"id": "c"') - 1, "expected 'gpt'")
    _raises(read_llava, _pretty(tmp_path, "m.json", {"a": 1})[0], None, "list of records")


def test_pope_errors(tmp_path):
    ok = json.dumps({"question_id": 1, "image": "a.jpg", "text": "Is there a cat?", "label": "yes"})
    p = tmp_path / "p.jsonl"
    p.write_text(ok + "\n" + ok.replace('"yes"', '"maybe"') + "\n")
    _raises(read_pope, p, 2, "label should be 'yes' or 'no'")
    p.write_text(ok + "\n\n" + '{"question_id": 2, "image": "a.jpg", "label": "no"}\n')
    _raises(read_pope, p, 3, "missing key 'text'")
    p.write_text(ok + "\n" + '{"question_id": 2, "image": \n')
    _raises(read_pope, p, 2, "invalid JSON")
    p.write_text("[1, 2]\n")
    _raises(read_pope, p, 1, "JSON object per line")


def test_refcoco_errors(tmp_path):
    ref = RefExpr(1, 100, 5, "i5.jpg", ["the man"], (1.0, 2.0, 10.0, 20.0), "val", 64, 64, 1)
    write_refcoco(tmp_path / "refs.json", tmp_path / "inst.json", [ref])
    data = json.loads((tmp_path / "refs.json").read_text())
    data.append({**data[0], "ref_id": 2, "ann_id": 999})
    p, lines = _pretty(tmp_path, "refs.json", data)
    _raises(lambda q: read_refcoco(q, tmp_path / "inst.json"), p, _line_of(lines, '"ref_id": 2') - 1, "ann_id 999")
    data[1] = {**data[0], "ref_id": 2, "sentences": [{"tokens": []}]}
    p, lines = _pretty(tmp_path, "refs.json", data)
    _raises(lambda q: read_refcoco(q, tmp_path / "inst.json"), p, _line_of(lines, '"ref_id": 2') - 1, "'sent'/'raw'")
    with pytest.raises(FormatError, match="pickled refs"):
        read_refcoco(tmp_path / "refs(unc).p", tmp_path / "inst.json")


def test_vsr_errors(tmp_path):
    p = tmp_path / "v.jsonl"
    ok = {"image": "a.jpg", "caption": "x", "label": 1, "relation": "near"}
    p.write_text(json.dumps(ok) + "\n" + json.dumps({**ok, "label": 2}) + "\n")
    _raises(read_vsr, p, 2, "label should be 0 or 1")
    p.write_text(json.dumps({**ok, "label": "1"}) + "\n")
    _raises(read_vsr, p, 1, "'label' should be int/bool")
    p.write_text(json.dumps(ok) + "\n" + json.dumps({"image": "a.jpg", "caption": "x", "label": 0}) + "\n")
    _raises(read_vsr, p, 2, "missing key 'relation'")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_pope(tmp_path / "nope.jsonl")


def test_coco_bad_area_iscrowd_and_duplicate_images(tmp_path):
    data = {"images": [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 8}], "categories": [{"id": 1, "name": "c"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2], "iscrowd": 0},
                            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2], "area": "big"}]}
    p, lines = _pretty(tmp_path, "i.json", data)
    _raises(read_coco_instances, p, _line_of(lines, '"id": 2') - 1, "'area' should be int/float")
    data["annotations"][1] = {**data["annotations"][1], "area": 3, "iscrowd": None}
    p, lines = _pretty(tmp_path, "i.json", data)
    _raises(read_coco_instances, p, _line_of(lines, '"id": 2') - 1, "'iscrowd' should be int/bool")
    data["images"].append(dict(data["images"][0], file_name="b.jpg"))
    p, lines = _pretty(tmp_path, "i.json", data)
    _raises(read_coco_instances, p, _line_of(lines, '"id": 1', 1) - 1, "duplicate image id 1")
    caps = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}], "annotations": []}
    p, lines = _pretty(tmp_path, "c.json", caps)
    _raises(read_coco_captions, p, _line_of(lines, '"id": 1', 1) - 1, "duplicate image id 1")


def test_jsonl_lines_end_at_newline_only(tmp_path):
    """U+2028 / U+0085 are legal inside JSON strings (json.dumps(ensure_ascii=False) writes them raw)."""
    q = {"question_id": 1, "image": "a.jpg", "text": "Is there a cat\u2028here\u0085?", "label": "yes"}
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps(q, ensure_ascii=False) + "\r\n" + json.dumps({**q, "question_id": 2}) + "\n", encoding="utf-8")
    assert [x.text for x in read_pope(p)] == [q["text"]] * 2
    p.write_text(json.dumps(q, ensure_ascii=False) + "\n" + json.dumps({**q, "label": "maybe"}, ensure_ascii=False) + "\n")
    _raises(read_pope, p, 2, "label should be")
