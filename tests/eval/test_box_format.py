"""A box answer goes through the world's tokenizer and comes back to the REC eval unchanged."""
import pytest

from eval.parsing import parse_box
from eval.refcoco import ground
from vlm.config import WorldConfig
from vlm.data.formats import RefExpr
from vlm.data.prompts import format_box, grounding_prompt
from vlm.data.tokenizer import train_bpe_tokenizer
from vlm.world.generator import generate_sample, world_corpus
from vlm.world.text import normalized_box

CFG = WorldConfig(n_train=400, n_eval=0, seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(world_corpus(CFG, range(400)), vocab_size=1024, add_bos=True, add_eos=True)


def test_box_text_is_compact_and_round_trips_to_the_rec_parser(tokenizer):
    lengths = []
    for i in range(60):
        sample = generate_sample(i, CFG.seed, CFG)
        for k, obj in enumerate(sample.objects):
            box = normalized_box(obj, CFG.image_size)
            text = format_box(box)
            assert text == "[" + ", ".join(f"{v:.2f}" for v in box) + "]"
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            lengths.append(len(ids))
            decoded = tokenizer.decode(ids)
            assert decoded == text and parse_box(decoded) == tuple(round(v, 2) for v in box)
            ref = RefExpr(ref_id=k, ann_id=k, image_id=i, file_name="x.jpg", sentences=[sample.referring[k]],
                          bbox_xywh=(obj.box[0], obj.box[1], obj.box[2] - obj.box[0], obj.box[3] - obj.box[1]),
                          split="val", width=CFG.image_size, height=CFG.image_size)
            rec = ground(ref, sample.referring[k], grounding_prompt(sample.referring[k]), f"{decoded}</s>", 0)
            assert rec["correct"] and rec["iou"] > 0.8  # 2 decimals: <= 0.32 px off per edge on 64 px
    # '[', 4 numbers (a leading space kept inside each), 3 commas, ']': 9 tokens for nearly every box
    assert sum(n == 9 for n in lengths) / len(lengths) > 0.95 and max(lengths) <= 13


def test_a_decimal_stays_one_pretokenizer_piece(tokenizer):
    pieces = [p for p, _ in tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str("[0.53, 0.07] is 3.")]
    assert pieces == ["[", "0.53", ",", "Ġ0.07", "]", "Ġis", "Ġ3", "."]
