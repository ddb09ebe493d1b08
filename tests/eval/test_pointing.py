"""Pointing accuracy: the pure pieces on hand-computed values, and ``point_words`` on a fake encoder
whose token and patch embeddings are built by hand (so the argmax patch of every word is known)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from encoders.features import TextFeatures
from eval.pointing import (patch_centre_classes, point_words, pointing_hits, pointing_records, pointing_summary,
                           shape_words, word_similarity_map, word_tokens)
from vlm.world.vocab import CLASS_NAMES, PLURALS, SHAPES

CIRCLE, SQUARE, TRIANGLE, RING = (CLASS_NAMES.index(s) for s in ("circle", "square", "triangle", "ring"))


def test_shape_words_finds_singulars_plurals_and_whole_words_only():
    caption = "Two green Rings and a circle. The circles are left of the crosses; a starry ringer."
    assert shape_words(caption) == [(10, 15, "ring"), (22, 28, "circle"), (34, 41, "circle"), (58, 65, "cross")]
    assert caption[10:15] == "Rings" and caption[58:65] == "crosses"
    assert shape_words("a plain grey background.") == []
    assert all(shape_words(f"a {PLURALS[s]}.") == [(2, 2 + len(PLURALS[s]), s)] for s in SHAPES)


def test_word_tokens_by_offsets():
    # "<s> a Ġtri angle . </s> <pad>" over "a triangle."
    offsets = torch.tensor([[0, 0], [0, 1], [1, 5], [5, 10], [10, 11], [0, 0], [0, 0]])
    mask = torch.tensor([False, True, True, True, True, False, False])
    assert word_tokens(offsets, mask, 2, 10).tolist() == [2, 3]  # the leading space belongs to "Ġtri"
    assert word_tokens(offsets, mask, 0, 1).tolist() == [1]
    assert word_tokens(offsets, mask, 11, 14).tolist() == []  # truncated away
    cut = mask.clone()
    cut[3] = False  # "angle" truncated: the word is not whole, so it is not pointed
    assert word_tokens(offsets, cut, 2, 10).tolist() == []


def test_word_similarity_map_averages_the_words_tokens():
    token_emb = torch.tensor([[1.0, 0.0], [0.0, 2.0], [4.0, 4.0]])
    patch_emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # P = 3
    got = word_similarity_map(token_emb, patch_emb, torch.tensor([0, 1]))
    assert got.tolist() == pytest.approx([0.5, 1.0, 1.5])  # mean of [1, 0, 1] and [0, 2, 2]
    assert word_similarity_map(token_emb, patch_emb, torch.tensor([2])).tolist() == pytest.approx([4.0, 4.0, 8.0])
    with pytest.raises(ValueError):
        word_similarity_map(token_emb, patch_emb, torch.tensor([], dtype=torch.long))


def test_patch_centre_classes():
    mask = np.zeros((4, 4), dtype=np.int64)
    mask[1, 1], mask[1, 3], mask[3, 1] = 1, 2, 3  # the centre pixels of a 2 x 2 grid (centre 1.0 -> pixel 1)
    mask[0, 0] = 5  # a corner: no centre
    assert patch_centre_classes(mask, 2, 2).tolist() == [1, 2, 3, 0]
    odd = np.arange(36).reshape(6, 6)  # centres at 1.5 and 4.5 -> pixels 1 and 4
    assert patch_centre_classes(odd, 2, 2).tolist() == [odd[1, 1], odd[1, 4], odd[4, 1], odd[4, 4]]
    assert patch_centre_classes(odd, 3, 2).tolist() == [odd[1, 1], odd[1, 4], odd[3, 1], odd[3, 4], odd[5, 1],
                                                        odd[5, 4]]


def test_pointing_hits_and_summary_by_hand():
    sim = torch.tensor([[0.1, 0.9, 0.3, 0.0],    # argmax 1: in mask -> hit
                        [2.0, 2.0, 1.0, 0.0],    # tie: the first (0), not in mask -> miss
                        [-1.0, -3.0, -2.0, -0.5]])  # argmax 3 -> hit
    in_mask = torch.tensor([[False, True, True, False],
                            [False, True, False, False],
                            [False, False, False, True]])
    pointed, hits = pointing_hits(sim, in_mask)
    assert pointed.tolist() == [1, 0, 3] and hits.tolist() == [True, False, True]
    s = pointing_summary(hits, in_mask)
    assert s["acc"] == pytest.approx(2 / 3) and s["words"] == 3
    assert s["chance"] == pytest.approx((2 / 4 + 1 / 4 + 1 / 4) / 3)
    empty = pointing_summary(torch.zeros(0, dtype=torch.bool), torch.zeros(0, 4, dtype=torch.bool))
    assert empty["words"] == 0 and math.isnan(empty["acc"]) and math.isnan(empty["chance"])
    with pytest.raises(ValueError):
        pointing_hits(sim, in_mask[:, :3])


# ----------------------------------------------------------------------------------------------
# point_words on a fake encoder
# ----------------------------------------------------------------------------------------------


def _wordpiece_tokenizer():
    """A fast tokenizer with a fixed vocabulary: "triangle" -> "tri" "##angle", "circles" -> "circle" "##s"."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "[UNK]", "a", "red", "circle", "and", "tri", "##angle", "square", ".",
             "nothing", "here", "two", "##s", "ring"]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A:0 </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="[UNK]")


class FakeEncoder(torch.nn.Module):
    """``encode_text`` looks each token up in a hand-built table [V,P]: the token's similarity to
    patch k of an image whose patch embeddings are the identity."""

    def __init__(self, max_len: int = 32):
        super().__init__()
        self.tokenizer = _wordpiece_tokenizer()
        self.cfg = SimpleNamespace(text=SimpleNamespace(max_len=max_len))
        self.max_text_len = 64
        vocab = self.tokenizer.get_vocab()
        table = torch.zeros(len(vocab), 4)
        for word, row in {"circle": [1, 0, 0, 0], "tri": [0, 0, 1, 0], "##angle": [0, 0, 0, 1.6],
                          "square": [0, 1, 0, 0], "##s": [0, 3, 0, 0], "ring": [1, 0, 0, 0]}.items():
            table[vocab[word]] = torch.tensor(row, dtype=torch.float32)
        self.table = torch.nn.Parameter(table, requires_grad=False)
        self.special = torch.tensor(sorted(self.tokenizer.all_special_ids))

    def encode_text(self, input_ids, attention_mask):
        mask = attention_mask.bool() & ~torch.isin(input_ids, self.special)
        return TextFeatures(global_emb=torch.zeros(len(input_ids), 4), token_emb=self.table[input_ids], token_mask=mask)


def _scene():
    """Two 4 x 4 class masks (2 x 2 patch grid, centres at pixels (1,1), (1,3), (3,1), (3,3))."""
    m0 = np.zeros((4, 4), dtype=np.int64)
    m0[:2, :2] = CIRCLE             # top left: covers patch 0's centre
    m0[3, 3] = TRIANGLE             # one pixel, patch 3's centre
    m0[2, 0] = SQUARE               # present, but on no patch centre
    m1 = np.zeros((4, 4), dtype=np.int64)
    m1[:2, 2:] = CIRCLE             # top right
    m1[2:, :2] = CIRCLE             # bottom left
    m1[:2, :2] = RING               # top left
    masks = [m0, m1]
    centres = torch.stack([patch_centre_classes(m, 2, 2) for m in masks])
    present = torch.stack([torch.as_tensor(m).reshape(-1, 1).eq(torch.arange(len(CLASS_NAMES))).any(0) for m in masks])
    eye = torch.eye(4)
    patch_emb = torch.stack([eye, eye.flip(0)])  # image 1: patch k has the embedding e_{3-k}
    captions = [["a red circle and a triangle .", "a square .", "nothing here ."],
                ["two circles and a ring .", "a triangle ."]]
    return captions, patch_emb, centres, present


def test_point_words_on_hand_built_embeddings():
    captions, patch_emb, centres, present = _scene()
    words, in_mask = point_words(FakeEncoder(), captions, patch_emb, centres, present, batch_size=2)
    got = [(w.image, w.caption, w.word, w.shape, w.patch, w.hit) for w in words]
    assert got == [
        (0, 0, "circle", "circle", 0, True),       # e0 . I -> patch 0, the circle's centre
        (0, 0, "triangle", "triangle", 3, True),   # two tokens: mean of e2 and 1.6 e3 -> patch 3 (e2 alone: 2)
        (0, 1, "square", "square", 1, False),      # present, on no centre: a miss, chance 0
        (1, 0, "circles", "circle", 2, True),      # mean of e0, 3 e1 = [.5, 1.5, 0, 0]; flipped patches -> 2
        (1, 0, "ring", "ring", 3, False),          # e0 -> patch 3 (embedding e0); the ring is at patch 0
    ]  # "nothing here ." names nothing; image 1's "triangle" is absent: skipped
    assert in_mask.tolist() == [[True, False, False, False], [False, False, False, True], [False] * 4,
                                [False, True, True, False], [True, False, False, False]]
    s = pointing_summary(torch.tensor([w.hit for w in words]), in_mask)
    assert s["acc"] == pytest.approx(3 / 5) and s["words"] == 5
    assert s["chance"] == pytest.approx((1 / 4 + 1 / 4 + 0 + 2 / 4 + 1 / 4) / 5)
    records = pointing_records(words, 2)
    assert [len(r) for r in records] == [3, 2]
    assert records[1][0] == {"caption": 0, "word": "circles", "shape": "circle", "patch": 2, "hit": True}


def test_point_words_degenerate_cases():
    captions, patch_emb, centres, present = _scene()
    words, in_mask = point_words(FakeEncoder(), [["nothing here ."], ["a ."]], patch_emb, centres, present)
    assert words == [] and in_mask.shape == (0, 4)
    # Truncation at 4 tokens ("<s> a red </s>") cuts "circle" and "triangle": nothing is pointed.
    words, _ = point_words(FakeEncoder(max_len=4), [captions[0][:1], []], patch_emb, centres, present)
    assert words == []
    # A word cut in the middle ("<s> a tri </s>") is not pointed; one more token and it is, whole.
    words, _ = point_words(FakeEncoder(max_len=4), [["a triangle ."], []], patch_emb, centres, present)
    assert words == []
    words, _ = point_words(FakeEncoder(max_len=5), [["a triangle ."], []], patch_emb, centres, present)
    assert [(w.word, w.patch, w.hit) for w in words] == [("triangle", 3, True)]
