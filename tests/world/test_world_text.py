"""World texts: referring-expression grammar, captions, LLaVA conversations, the corpus."""
import itertools

import pytest

from vlm.data import prompts
from vlm.config import WorldConfig
from vlm.world.generator import generate_sample
from vlm.world.text import (counting_caption, llava_conversations, position_phrase, referring_expression,
                            resolve_referring, short_caption)
from vlm.world.generator import world_corpus
from vlm.world.types import WorldObject

S = 64


def obj(shape, color, size, x, y, side=10):
    box = (x, y, x + side, y + side)
    return WorldObject(shape, color, size, box, ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2))


def test_minimal_attributes():
    objs = [obj("circle", "red", "small", 0, 0), obj("circle", "blue", "small", 30, 0),
            obj("star", "red", "large", 0, 30), obj("circle", "red", "large", 30, 30)]
    exprs = [referring_expression(objs, i, S) for i in range(4)]
    assert exprs == ["the small red circle", "the blue circle", "the star", "the large circle"]
    assert [resolve_referring(e, objs, S) for e in exprs] == [[0], [1], [2], [3]]


def test_twins_use_a_relation_to_a_unique_anchor():
    objs = [obj("circle", "red", "small", 5, 5), obj("circle", "red", "small", 5, 45), obj("star", "blue", "small", 18, 45)]
    e0, e1 = referring_expression(objs, 0, S), referring_expression(objs, 1, S)
    assert e0 == "the small red circle above the star" and e1 == "the small red circle next to the star"
    assert resolve_referring(e0, objs, S) == [0] and resolve_referring(e1, objs, S) == [1]


def test_twins_without_anchor_use_a_superlative():
    objs = [obj("square", "green", "large", 0, 20), obj("square", "green", "large", 40, 20)]
    assert referring_expression(objs, 0, S) == "the leftmost large green square"
    assert resolve_referring("the rightmost large green square", objs, S) == [1]
    assert resolve_referring("the large green square", objs, S) == [0, 1]  # ambiguous: both


def test_resolver_rejects_text_outside_the_grammar():
    objs = [obj("square", "green", "large", 0, 20)]
    for bad in ("a green square", "the green blob", "the big green square", "the square near the circle"):
        with pytest.raises(ValueError):
            resolve_referring(bad, objs, S)
    assert resolve_referring("the circle", objs, S) == []


def test_captions():
    objs = [obj("circle", "red", "small", 0, 0), obj("star", "blue", "large", 30, 0), obj("star", "blue", "small", 50, 50)]
    assert short_caption(objs) == "A red circle and two blue stars."
    assert counting_caption(objs) == "There are three objects: one circle and two stars."
    assert counting_caption(objs[:1]) == "There is one object: one circle."
    assert position_phrase(objs[0], S) == "in the top left" and position_phrase(objs[2], S) == "in the bottom right"


def test_llava_conversations_are_well_formed_and_deterministic():
    cfg = WorldConfig()
    for index in range(20):
        s = generate_sample(index, 0, cfg)
        convs = llava_conversations(s, 0, cfg.image_size)
        assert convs == llava_conversations(s, 0, cfg.image_size)
        assert len(convs) == 2
        for conv in convs:
            assert [r for r, _ in conv] == ["human", "gpt"] * (len(conv) // 2) and len(conv) >= 4
            assert conv[0][1].startswith(prompts.IMAGE_TOKEN + "\n")
            assert all(prompts.IMAGE_TOKEN not in t for _, t in conv[1:])
        grounding = [(q, a) for q, a in (convs[1][0], convs[1][1])]
        q, a = grounding[0][1], grounding[1][1]
        expr = q.split(": ", 1)[1]
        (k,) = resolve_referring(expr, s.objects, cfg.image_size)
        assert a == prompts.format_box(tuple(v / cfg.image_size for v in s.objects[k].box))


def test_world_corpus_holds_every_kind_of_text():
    cfg = WorldConfig(n_train=4, n_eval=0)
    texts = list(world_corpus(cfg, range(3)))
    assert texts == list(world_corpus(cfg, range(3)))
    s = generate_sample(1, cfg.seed, cfg)
    for t in itertools.chain(s.captions.values(), [s.long_caption], s.referring, [st.text for st in s.statements]):
        assert t in texts
    assert any(t.startswith(prompts.CAPTION_PROMPT) or t.startswith(prompts.DETAIL_PROMPT) for t in texts)
    assert all(prompts.IMAGE_TOKEN not in t for t in texts)
