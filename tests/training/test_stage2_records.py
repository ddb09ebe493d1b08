"""Stage two's LLaVA records: text-only ones train without image tokens, multi-image ones train
with flamingo (each token attending to the image before it) and are otherwise counted and skipped
in one warning; nothing is dropped silently."""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vlm"))
from tiny_vlm import perturb_trainable, save_tiny_llm, save_tiny_tower, vlm_config  # noqa: E402

from training.stage2 import LlavaExamples, trainable_records  # noqa: E402
from vlm.data.formats import FormatError, LlavaRecord, read_llava, write_llava  # noqa: E402
from vlm.model.vision_language_model import VisionLanguageModel  # noqa: E402

ASK = "<image>\nDescribe the image briefly."


def records() -> list[LlavaRecord]:
    return [LlavaRecord(id="one", image="a.png", conversations=[("human", ASK), ("gpt", "a red square.")]),
            LlavaRecord(id="text", image=None, conversations=[("human", "Is red a colour?"), ("gpt", "Yes")]),
            LlavaRecord(id="two", image="a.png", more_images=["b.png"],
                        conversations=[("human", "<image> and <image>: same colour?"), ("gpt", "No")])]


def test_multi_image_records_read_and_write(tmp_path):
    write_llava(tmp_path / "l.json", records())
    raw = json.loads((tmp_path / "l.json").read_text())
    assert raw[2]["image"] == ["a.png", "b.png"] and "image" not in raw[1]
    back = read_llava(tmp_path / "l.json")
    assert back == records() and [len(r.images) for r in back] == [1, 0, 2]
    raw[2]["conversations"][0]["value"] = "<image> only one token"
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(FormatError, match="2 images but 1 '<image>'"):
        read_llava(tmp_path / "bad.json")


def test_multi_image_records_counted_and_named_in_one_warning():
    many = records() + [LlavaRecord(id=f"m{i}", image="a.png", more_images=["b.png"],
                                    conversations=[("human", "<image><image>"), ("gpt", "x")]) for i in range(6)]
    with pytest.warns(UserWarning) as caught:
        kept = trainable_records(many, "projector")
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert "skipping 7 multi-image record(s) of 9" in msg and "'two'" in msg and "..." in msg
    assert [r.id for r in kept] == ["one", "text"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(trainable_records(records()[:2], "projector")) == 2  # no warning without multi-image records
        assert trainable_records(many, "flamingo", multi_image=True) == many


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("records")
    Image.fromarray(np.full((40, 40, 3), (220, 30, 30), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(np.full((40, 40, 3), (30, 30, 220), dtype=np.uint8)).save(root / "b.png")
    return {"llm": save_tiny_llm(root / "llm"), "tower": save_tiny_tower(root / "tower"), "root": root}


@pytest.mark.parametrize("bridge", ["projector", "flamingo"])
def test_text_only_record_sees_no_image(parts, bridge):
    torch.manual_seed(0)
    model = VisionLanguageModel.build(vlm_config(parts["tower"], parts["llm"], bridge), max_len=64)
    perturb_trainable(model)  # non-zero gates and LoRA, so the image would show if it were read
    examples = LlavaExamples(trainable_records(records()[:2], bridge), parts["root"], model.processor)
    batch = examples.make_batch([0, 1])
    counts = (batch["input_ids"] == model.image_token_id).sum(1).tolist()
    assert counts[0] > 0 and counts[1] == 0
    assert (batch["labels"][1] != -100).sum() > 0  # the text-only answer is a target
    logits = model.logits(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    other = model.logits(torch.randn_like(batch["pixel_values"]), batch["input_ids"], batch["attention_mask"])
    assert torch.allclose(logits[1], other[1], atol=1e-6)  # the text-only row never reads the pixels
    assert not torch.allclose(logits[0], other[0], atol=1e-4)
    loss = model(batch)["loss"]
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.bridge.parameters() if p.requires_grad)


def test_flamingo_trains_multi_image_records(parts):
    torch.manual_seed(0)
    model = VisionLanguageModel.build(vlm_config(parts["tower"], parts["llm"], "flamingo"), max_len=64)
    perturb_trainable(model)
    assert model.bridge.multi_image and not VisionLanguageModel.build(
        vlm_config(parts["tower"], parts["llm"], "projector"), max_len=64).bridge.multi_image
    recs = trainable_records(records(), "flamingo", model.bridge.multi_image)
    batch = LlavaExamples(recs, parts["root"], model.processor).make_batch([2, 0, 1])  # two images, one, none
    assert batch["pixel_values"].shape == (3, 2, 3, 32, 32)
    assert (batch["input_ids"] == model.image_token_id).sum(1).tolist() == [2, 1, 0]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = model.logits(batch["pixel_values"], ids, mask)
    changed = batch["pixel_values"].clone()
    changed[0, 1] = torch.randn_like(changed[0, 1])  # the second image of the two-image record
    other = model.logits(changed, ids, mask)
    second = int((ids[0] == model.image_token_id).nonzero()[1])
    assert torch.allclose(logits[0, :second], other[0, :second], atol=1e-6)  # before it: image one only
    assert not torch.allclose(logits[0, second:], other[0, second:], atol=1e-4)  # from it on: image two
    assert torch.allclose(logits[1:], other[1:], atol=1e-6)  # other rows never read it
    loss = model(batch)["loss"]
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.bridge.parameters() if p.requires_grad)
