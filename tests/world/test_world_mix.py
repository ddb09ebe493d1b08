"""The turn mix of the LLaVA export and the world LM's per-image documents."""
import dataclasses
import re
from collections import Counter

import pytest

from vlm.config import DEFAULT_LLAVA_MIX, LLAVA_TURN_KINDS, SHORT_ANSWER_KINDS, ConfigError, WorldConfig, load_config
from vlm.data import prompts
from vlm.data.formats import read_llava
from vlm.data.tokenizer import train_bpe_tokenizer
from vlm.world.export import export_world, llava_records
from vlm.world.generator import generate_sample, world_corpus, world_documents
from vlm.world.mix import context_statements, existence_questions, image_objects, layout_caption
from vlm.world.text import normalized_box, resolve_referring
from vlm.world.vocab import PLURALS, relation_holds

CFG = WorldConfig(n_train=300, n_eval=20, seed=1)


def turn_kind(prompt: str) -> str:
    """Which kind of turn a human prompt is (``LLAVA_TURN_KINDS``)."""
    prompt = prompt.replace(prompts.IMAGE_TOKEN + "\n", "")
    if prompt == prompts.CAPTION_PROMPT:
        return "caption"
    if prompt == prompts.DETAIL_PROMPT:
        return "detail"
    if prompt.startswith("How many"):
        return "count"
    if prompt.startswith("Is there"):
        return "exist"
    if "true or false" in prompt:
        return "spatial"
    assert prompt.startswith("Give the bounding box"), prompt
    return "grounding"


@pytest.fixture(scope="module")
def records():
    samples = [generate_sample(i, CFG.seed, CFG) for i in range(CFG.n_train)]
    return samples, llava_records(samples, CFG)


def answers_by_kind(recs) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {k: [] for k in LLAVA_TURN_KINDS}
    for r in recs:
        for (_, q), (_, a) in zip(r.conversations[0::2], r.conversations[1::2]):
            out[turn_kind(q)].append(a)
    return out


def test_mix_follows_the_config_weights(records):
    samples, recs = records
    assert len(recs) == CFG.n_train * CFG.llava_conversations
    assert all(len(r.conversations) == 2 * CFG.llava_turns and r.conversations[0][1].startswith("<image>\n")
               for r in recs)
    by_kind = answers_by_kind(recs)
    n = sum(map(len, by_kind.values()))
    total = sum(DEFAULT_LLAVA_MIX.values())
    for kind, w in DEFAULT_LLAVA_MIX.items():  # spatial is skipped on the few images without statements
        assert abs(len(by_kind[kind]) / n - w / total) < 0.05, kind
    only_exist = load_config(WorldConfig, None, ["n_train=300", "seed=1", "llava_mix={caption: 0, detail: 0, "
                                                 "exist: 1, count: 0, spatial: 0, grounding: 0}"])
    assert {turn_kind(q) for r in llava_records(samples[:20], only_exist) for q in (t for _, t in r.conversations[0::2])} \
        == {"exist"}


def test_short_answers_are_balanced_and_carry_a_third_of_the_answer_tokens(records):
    _, recs = records
    by_kind = answers_by_kind(recs)
    yes_no = Counter(by_kind["exist"])
    assert set(yes_no) == {"Yes", "No"} and abs(yes_no["Yes"] - yes_no["No"]) < 0.06 * len(by_kind["exist"])
    tf = Counter(by_kind["spatial"])
    assert set(tf) == {"True", "False"} and abs(tf["True"] - tf["False"]) < 0.1 * len(by_kind["spatial"])
    tok = train_bpe_tokenizer(world_corpus(CFG, range(100)), vocab_size=1024)
    n_tokens = {k: sum(len(tok(a, add_special_tokens=False)["input_ids"]) + 1 for a in answers)  # + </s>
                for k, answers in by_kind.items()}
    share = sum(n_tokens[k] for k in SHORT_ANSWER_KINDS) / sum(n_tokens.values())
    assert share >= 0.30, share


def test_a_conversation_asks_each_object_pair_once_while_another_is_left(records):
    samples, recs = records
    by_key = {s.key: s for s in samples}
    repeats = checked = 0
    for r in recs:
        statements = {st.text: st for st in by_key[r.image.removesuffix(".jpg")].statements}
        n_pairs = len({frozenset((st.subject, st.object)) for st in statements.values()})
        asked = [statements[q.removeprefix(prompts.IMAGE_TOKEN + "\n").split(" Is this statement")[0]]
                 for _, q in r.conversations[0::2] if turn_kind(q) == "spatial"]
        pairs = [frozenset((st.subject, st.object)) for st in asked]
        if len(pairs) <= n_pairs:
            checked += len(pairs) > 1
            repeats += len(set(pairs)) < len(pairs)
    assert checked > 20 and repeats == 0


def test_existence_negatives_sampled_the_pope_ways_from_the_given_images_only(records):
    samples, _ = records
    objects = image_objects(samples)
    exist = existence_questions(objects, CFG.seed)
    for key, qs in exist.items():
        assert [label for _, label in qs] == ["yes", "no"] * (len(qs) // 2)
        for q, label in qs:
            shape = re.match(r"Is there an? (\w+) in the image\?", q)[1]
            assert (shape in objects[key]) == (label == "yes")


def test_llava_export_holds_no_eval_image_and_ignores_the_eval_split(tmp_path):
    small = WorldConfig(n_train=12, n_eval=8, seed=2)
    export_world(tmp_path / "a", small, progress=False)
    export_world(tmp_path / "b", WorldConfig(n_train=12, n_eval=0, seed=2), progress=False)
    a, b = read_llava(tmp_path / "a" / "llava" / "train.json"), read_llava(tmp_path / "b" / "llava" / "train.json")
    assert a == b and {int(r.image.split(".")[0]) for r in a} == set(range(12))


def test_bad_mix_is_a_config_error():
    with pytest.raises(ConfigError, match="llava_mix"):
        load_config(WorldConfig, None, ["llava_mix.bogus=1"])
    with pytest.raises(ConfigError, match="llava_mix"):
        load_config(WorldConfig, None, ["llava_mix.exist=-1"])


def test_documents_answer_from_their_context():
    """Every exist / count / spatial answer of a document is decided by the caption it opens with."""
    cfg = WorldConfig(n_train=60, n_eval=0, seed=4)
    docs = list(world_documents(cfg, range(60), n_documents=2, n_turns=4))
    assert len(docs) == 120
    n_checked = Counter()
    for d, doc in enumerate(docs):
        sample = generate_sample(d // 2, cfg.seed, cfg)
        context, first = doc[0][1].split("\n", 1)
        assert context == (sample.long_caption if d % 2 else sample.captions["short"])
        words = set(re.findall(r"[a-z]+", context.lower()))
        for (_, q), (_, a) in zip(doc[0::2], doc[1::2]):
            q = first if q == doc[0][1] else q
            kind = turn_kind(q)
            if kind == "exist":
                shape = re.match(r"Is there an? (\w+) in the image\?", q)[1]
                assert (a == "Yes") == bool({shape, PLURALS[shape]} & words)
            if kind == "spatial":
                assert d % 2 == 1  # only the long caption states relations
            n_checked[kind] += 1
    assert n_checked["exist"] > 100 and n_checked["spatial"] > 20


def test_context_statements_are_true_exactly_when_the_relation_holds():
    cfg = WorldConfig(n_train=80, n_eval=0, seed=5)
    n = 0
    for i in range(80):
        sample = generate_sample(i, cfg.seed, cfg)
        for st in context_statements(sample, cfg.image_size):
            a, b = sample.objects[st.subject], sample.objects[st.object]
            assert relation_holds(st.relation, a, b, cfg.image_size) == st.label, st
            n += 1
    assert n > 50


def test_layout_documents_copy_boxes_and_only_ask_what_their_context_decides():
    """The layout context lists every object's box; its grounding answers are boxes of that list
    (the referred object's), its statements the image's own; the captions never get boxes."""
    cfg = WorldConfig(n_train=60, n_eval=0, seed=4, llava_mix={"exist": 1.0, "spatial": 1.0, "grounding": 2.0,
                                                               "detail": 1.0})
    docs = list(world_documents(cfg, range(60), n_documents=3, n_turns=4, contexts=("short", "long", "layout")))
    kinds = {c: Counter() for c in ("short", "long", "layout")}
    for d, doc in enumerate(docs):
        sample = generate_sample(d // 3, cfg.seed, cfg)
        context = ("short", "long", "layout")[d % 3]
        text, first = doc[0][1].split("\n", 1)
        boxes = [prompts.format_box(normalized_box(o, cfg.image_size)) for o in sample.objects]
        if context == "layout":
            assert text == layout_caption(sample, cfg.image_size)
            assert text.count(" is at [") == len(sample.objects) and all(b in text for b in boxes)
        for (_, q), (_, a) in zip(doc[0::2], doc[1::2]):
            q = first if q == doc[0][1] else q
            kind = turn_kind(q)
            kinds[context][kind] += 1
            if kind == "grounding":
                expr = q.rsplit(": ", 1)[1]
                target = resolve_referring(expr, sample.objects, cfg.image_size)
                assert len(target) == 1 and a == boxes[target[0]]
            if kind == "spatial" and context == "layout":
                assert any(prompts.vsr_prompt(st.text) == q and (a == prompts.TRUE) == st.label
                           for st in sample.statements)
    assert kinds["layout"]["grounding"] > 30 and kinds["layout"]["spatial"] > 20
    assert not any(kinds[c]["detail"] for c in kinds)
    assert not kinds["short"]["grounding"] and not kinds["long"]["grounding"]
    assert not kinds["short"]["spatial"]


def test_layout_caption_of_a_hand_built_sample():
    from vlm.world.types import WorldObject
    sample = generate_sample(0, 0, WorldConfig(n_train=1, n_eval=0, seed=0))
    obj = WorldObject(shape="circle", color="red", size="small", box=(16, 8, 32, 40), center=(24.0, 24.0))
    sample = dataclasses.replace(sample, objects=[obj])
    assert layout_caption(sample, 64) == "The small red circle is at [0.25, 0.12, 0.50, 0.62]."


def test_contexts_cycle_over_the_corpus():
    """contexts [short, long, short, long, layout] with 2 documents an image: 1 in 5 documents is a layout one."""
    cfg = WorldConfig(n_train=50, n_eval=0, seed=4)
    docs = list(world_documents(cfg, range(50), n_documents=2, n_turns=2,
                                contexts=("short", "long", "short", "long", "layout")))
    layout = [d for d, doc in enumerate(docs) if " is at [" in doc[0][1].split("\n", 1)[0]]
    assert layout == list(range(4, 100, 5))
