"""VLMProcessor: layout of ids, labels and masks for both text formats, padding sides, errors."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from encoders.towers import ImageTransform
from tiny_vlm import random_images
from vlm.model.processor import IGNORE_INDEX, VLMProcessor

P = 5
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant: {% endif %}")


@pytest.fixture(scope="module")
def tok(tiny_llm_dir):
    return AutoTokenizer.from_pretrained(str(tiny_llm_dir))


def make(tok, n_image=P, max_len=128):
    return VLMProcessor(tok, ImageTransform(32), n_image, max_len)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_plain_format_layout(tok):
    proc = make(tok)
    ids_, labels = proc.encode_conversation([("human", "Is there a red circle?"), ("gpt", "Yes")])
    img = proc.image_token_id
    prompt = [tok.bos_token_id] + [img] * P + ids(tok, "\nIs there a red circle?\n")
    answer = ids(tok, "Yes") + [tok.eos_token_id]
    assert ids_ == prompt + answer
    assert labels == [IGNORE_INDEX] * len(prompt) + answer
    # The inference prompt is exactly the training prefix (what generate and score see).
    assert proc.encode_prompt("Is there a red circle?") == prompt
    # An explicit placeholder anywhere in the first turn is used where it is.
    ids2, _ = proc.encode_conversation([("human", "Question?\n<image>"), ("gpt", "Yes")])
    assert ids2[-len(answer) - P - 1:-len(answer) - 1] == [img] * P


def test_multi_turn_targets_every_gpt_turn(tok):
    proc = make(tok)
    conv = [("human", "<image>\nDescribe the image briefly."), ("gpt", "a red star."),
            ("human", "How many objects?"), ("gpt", "2")]
    ids_, labels = proc.encode_conversation(conv)
    targets = [t for t, l in zip(ids_, labels) if l != IGNORE_INDEX]
    assert targets == ids(tok, "a red star.") + [tok.eos_token_id] + ids(tok, "2") + [tok.eos_token_id]
    assert all(l == IGNORE_INDEX for t, l in zip(ids_, labels) if t == proc.image_token_id)
    second_q = ids(tok, "How many objects?\n")
    start = len(ids_) - len(second_q) - 2
    assert ids_[start:start + len(second_q)] == second_q
    assert all(l == IGNORE_INDEX for l in labels[start:start + len(second_q)])


def test_batch_padding_sides_and_shapes(tok):
    proc = make(tok)
    images = random_images(3)
    prompts = ["Is there a red circle?", "How many objects?", "Describe the image briefly."]
    answers = ["Yes", "2", "There is a small blue square."]
    batch = proc(images, prompts, answers)
    B, T = batch["input_ids"].shape
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert batch["labels"].shape == batch["attention_mask"].shape == (B, T)
    for b in range(3):
        ids_, labels = proc.encode_conversation([("human", prompts[b]), ("gpt", answers[b])])
        n = len(ids_)
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (T - n)  # right padding
        assert batch["input_ids"][b, :n].tolist() == ids_
        assert batch["labels"][b].tolist() == labels + [IGNORE_INDEX] * (T - n)
        assert (batch["input_ids"][b] == proc.image_token_id).sum() == P
    inf = proc(images, prompts)
    assert "labels" not in inf
    for b in range(3):
        p = proc.encode_prompt(prompts[b])
        L = inf["input_ids"].shape[1]
        assert inf["attention_mask"][b].tolist() == [0] * (L - len(p)) + [1] * len(p)  # left padding
        assert inf["input_ids"][b, L - len(p):].tolist() == p
        assert (inf["input_ids"][b, :L - len(p)] == proc.pad_token_id).all()


def test_chat_template_targets_assistant_text(tok):
    tok = AutoTokenizer.from_pretrained(tok.name_or_path)
    tok.chat_template = CHAT_TEMPLATE
    proc = make(tok, max_len=128)
    conv = [("human", "Is there a red circle?"), ("gpt", "Yes"), ("human", "How many?"), ("gpt", "2")]
    ids_, labels = proc.encode_conversation(conv)
    targets = [t for t, l in zip(ids_, labels) if l != IGNORE_INDEX]
    assert targets == ids(tok, "Yes</s>") + ids(tok, "2</s>")
    text = tok.decode([t for t in ids_ if t != proc.image_token_id])
    assert text == "<s>user: \nIs there a red circle?</s><s>assistant: Yes</s><s>user: How many?</s><s>assistant: 2</s>"
    prompt = proc.encode_prompt("Is there a red circle?")
    assert ids_[:len(prompt)] == prompt
    assert tok.decode(prompt[-len(ids(tok, "<s>assistant: ")):]) == "<s>assistant: "


def test_flamingo_keeps_one_image_id(tok):
    """OpenFlamingo keeps ``<image>`` in the text (``media_locations = input_ids == media_token_id``,
    ``open_flamingo/src/flamingo.py`` ``Flamingo._condition_media_locations``): one id, where the placeholder was."""
    proc = make(tok, n_image=1)
    img = proc.image_token_id
    ids_, _ = proc.encode_conversation([("human", "Is there a red circle?"), ("gpt", "Yes")])
    assert ids_[:2] == [tok.bos_token_id, img] and ids_.count(img) == 1
    mid = proc.encode_prompt("Describe the image briefly.\n<image>")
    assert mid.count(img) == 1 and mid.index(img) > 2


def test_zero_image_tokens_removes_placeholder(tok):
    """``num_image_tokens == 0`` (no bridge uses it since flamingo keeps its media location)."""
    proc = make(tok, n_image=0)
    ids_, labels = proc.encode_conversation([("human", "<image>\nIs there a red circle?"), ("gpt", "Yes")])
    assert ids_ == [tok.bos_token_id] + ids(tok, "Is there a red circle?\n") + ids(tok, "Yes") + [tok.eos_token_id]
    assert proc.encode_prompt("Is there a red circle?") == ids_[: len(ids_) - len(ids(tok, "Yes")) - 1]


def test_truncation_and_errors(tok):
    proc = make(tok, max_len=12)
    ids_, labels = proc.encode_conversation([("human", "Is there a red circle?"), ("gpt", "Yes")])
    assert len(ids_) == len(labels) == 12
    with pytest.raises(ValueError, match="max_len"):
        make(tok, max_len=8).encode_conversation([("human", "a long question\n<image>"), ("gpt", "a")])
    with pytest.raises(ValueError, match="one <image>"):
        proc.encode_conversation([("human", "<image> <image>"), ("gpt", "a")])
    with pytest.raises(ValueError, match="role"):
        proc.encode_conversation([("gpt", "a"), ("human", "q")])
    with pytest.raises(ValueError, match="end with a gpt turn"):
        proc.encode_conversation([("human", "q")])
    with pytest.raises(ValueError, match="images for"):
        proc(random_images(2), ["only one prompt"])
    with pytest.raises(ValueError, match="leaves no room"):
        make(tok, n_image=8, max_len=8)


def test_pixel_values_accept_tensors(tok):
    proc = make(tok)
    px = torch.randn(2, 3, 32, 32)
    assert proc.pixel_values(px) is px
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        proc.pixel_values(torch.randn(3, 32, 32))
