"""Every text of the synthetic world: captions, referring expressions, questions, statements,
LLaVA conversations, and the corpus the world's tokenizers and LLM are trained on.

Grammar (all lower-case words from ``vlm.world.vocab``):
- an object's *phrase* is ``[size] [color] shape``, using the fewest attributes that make it unique
  among the image's objects (tried in the order: shape; color shape; size shape; size color shape);
- a *referring expression* is ``the <phrase>``; when two objects share all three attributes, the
  phrase gets a relation to another, uniquely named object (``the small red circle above the blue
  star``) or, failing that, a superlative (``the leftmost small red circle``).
  ``resolve_referring`` parses this grammar back to the matching object indices.
- positions are read from the box centre on a 3 x 3 grid ("in the top left", "in the center", ...).
"""
from __future__ import annotations

import re
from typing import Iterable, Iterator, Optional

import numpy as np

from vlm.data import prompts
from vlm.world.types import Statement, WorldObject, WorldSample
from vlm.world.vocab import (COLORS, NUMBER_WORDS, OPPOSITE, PLURALS, RELATIONS, SHAPES, SIZES,
                             far_apart, relation_holds)

BACKGROUND_WORDS = {"plain": "a plain", "stripes": "a striped", "checker": "a checkered", "noise": "a mottled",
                    "dots": "a dotted"}
_ATTRIBUTE_SETS = ((), ("color",), ("size",), ("size", "color"))
SUPERLATIVES = {"leftmost": (0, 1), "rightmost": (0, -1), "topmost": (1, 1), "bottommost": (1, -1)}


def number_word(n: int) -> str:
    """'one' .. 'ten', else the digits."""
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def phrase(obj: WorldObject, attrs: Iterable[str]) -> str:
    """'small red circle' with only the attributes in ``attrs`` (size before color), shape always."""
    attrs = set(attrs)
    words = ([obj.size] if "size" in attrs else []) + ([obj.color] if "color" in attrs else []) + [obj.shape]
    return " ".join(words)


def _matches(obj: WorldObject, target: WorldObject, attrs: Iterable[str]) -> bool:
    return obj.shape == target.shape and all(getattr(obj, a) == getattr(target, a) for a in attrs)


def unique_phrase(objects: list[WorldObject], i: int) -> Optional[str]:
    """The shortest attribute phrase naming objects[i] alone, or None when an identical twin exists."""
    for attrs in _ATTRIBUTE_SETS:
        if sum(_matches(o, objects[i], attrs) for o in objects) == 1:
            return phrase(objects[i], attrs)
    return None


def position_phrase(obj: WorldObject, image_size: int) -> str:
    """Where the box centre falls on a 3 x 3 grid: 'in the top left', 'at the top', 'in the center'."""
    col = min(int(obj.center[0] * 3 / image_size), 2)
    row = min(int(obj.center[1] * 3 / image_size), 2)
    vert, horiz = ("top", "middle", "bottom")[row], ("left", "center", "right")[col]
    if row == 1 and col == 1:
        return "in the center"
    if row == 1:
        return f"on the {horiz}"
    if col == 1:
        return f"at the {vert}"
    return f"in the {vert} {horiz}"


def referring_expression(objects: list[WorldObject], i: int, image_size: int,
                         rng: Optional[np.random.Generator] = None) -> str:
    """A referring expression that matches objects[i] and no other object (see module docstring).

    ``rng`` only varies which relation/anchor is used when several work. Raises RuntimeError when
    no expression of the grammar is unique (the generator's layout rules prevent this).
    """
    simple = unique_phrase(objects, i)
    if simple is not None:
        return f"the {simple}"
    full = phrase(objects[i], ("size", "color"))
    twins = [k for k, o in enumerate(objects) if k != i and _matches(o, objects[i], ("size", "color"))]
    options = []
    for j, anchor in enumerate(objects):
        anchor_phrase = unique_phrase(objects, j)
        if j == i or anchor_phrase is None:
            continue
        for rel in RELATIONS:
            if relation_holds(rel, objects[i], anchor, image_size) and not any(
                    relation_holds(rel, objects[t], anchor, image_size) for t in twins):
                options.append(f"the {full} {rel} the {anchor_phrase}")
    if options:
        return options[int(rng.integers(len(options)))] if rng is not None else options[0]
    group = [i, *twins]
    for word, (axis, sign) in SUPERLATIVES.items():
        values = [sign * objects[k].center[axis] for k in group]
        best = min(values)
        if values[0] == best and values.count(best) == 1:
            return f"the {word} {full}"
    raise RuntimeError(f"no unique referring expression for object {i} of {[o.name for o in objects]}")


_WORD = r"[a-z]+"
_EXPR = re.compile(
    rf"^the (?:(?P<sup>{'|'.join(SUPERLATIVES)}) )?(?P<target>(?:{_WORD} ){{0,2}}{_WORD})"
    rf"(?: (?P<rel>{'|'.join(RELATIONS)}) the (?P<anchor>(?:{_WORD} ){{0,2}}{_WORD}))?$")


def _parse_phrase(text: str) -> dict[str, str]:
    words = text.split()
    out: dict[str, str] = {"shape": words[-1]}
    for w in words[:-1]:
        key = "size" if w in SIZES else "color" if w in COLORS else None
        if key is None or key in out:
            raise ValueError(f"not an object phrase: {text!r}")
        out[key] = w
    if out["shape"] not in SHAPES:
        raise ValueError(f"not a shape: {out['shape']!r} in {text!r}")
    return out


def _phrase_matches(objects: list[WorldObject], attrs: dict[str, str]) -> list[int]:
    return [k for k, o in enumerate(objects) if all(getattr(o, a) == v for a, v in attrs.items())]


def resolve_referring(expression: str, objects: list[WorldObject], image_size: int) -> list[int]:
    """Indices of the objects an expression of this module's grammar denotes (ideally exactly one).

    Relations are judged with ``relation_holds``; an anchor phrase must itself match one object.
    Raises ValueError for text outside the grammar.
    """
    m = _EXPR.match(expression.strip().rstrip("."))
    if m is None:
        raise ValueError(f"not a referring expression of the world grammar: {expression!r}")
    candidates = _phrase_matches(objects, _parse_phrase(m["target"]))
    if m["rel"]:
        anchors = _phrase_matches(objects, _parse_phrase(m["anchor"]))
        if len(anchors) != 1:
            return []
        a = anchors[0]
        candidates = [k for k in candidates if k != a and relation_holds(m["rel"], objects[k], objects[a], image_size)]
    if m["sup"] and candidates:
        axis, sign = SUPERLATIVES[m["sup"]]
        best = min(sign * objects[k].center[axis] for k in candidates)
        candidates = [k for k in candidates if sign * objects[k].center[axis] == best]
    return candidates


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def _grouped(objects: list[WorldObject], key) -> list[tuple[tuple, int]]:
    """(key, count) in order of first appearance."""
    counts: dict[tuple, int] = {}
    for o in objects:
        counts[key(o)] = counts.get(key(o), 0) + 1
    return list(counts.items())


def _counted(n: int, words: str, plural: str) -> str:
    return f"{_article(words) if n == 1 else number_word(n)} {words if n == 1 else plural}"


def short_caption(objects: list[WorldObject]) -> str:
    """'A red circle and two blue stars.'"""
    parts = [_counted(n, f"{c} {s}", f"{c} {PLURALS[s]}") for (c, s), n in _grouped(objects, lambda o: (o.color, o.shape))]
    return _sentence(_join(parts))


def counting_caption(objects: list[WorldObject]) -> str:
    """'There are three objects: two circles and one star.'"""
    n = len(objects)
    parts = [f"{number_word(k)} {s if k == 1 else PLURALS[s]}" for (s,), k in _grouped(objects, lambda o: (o.shape,))]
    verb = "is" if n == 1 else "are"
    return f"There {verb} {number_word(n)} object{'' if n == 1 else 's'}: {_join(parts)}."


def stated_relations(sample: WorldSample, names: list[Optional[str]], image_size: int,
                     limit: int) -> list[tuple[int, str, int]]:
    """(i, rel, j) for each unordered pair i < j of uniquely named objects (``names[k]`` not None)
    with a relation (the first that holds, in ``RELATIONS`` order), at most ``limit``: the
    relations the detailed and long captions state."""
    objs, out = sample.objects, []
    for i in range(len(objs)):
        for j in range(i + 1, len(objs)):
            if names[i] is None or names[j] is None:
                continue
            rel = next((r for r in RELATIONS if relation_holds(r, objs[i], objs[j], image_size)), None)
            if rel is not None:
                out.append((i, rel, j))
            if len(out) >= limit:
                return out
    return out


def _relation_sentences(sample: WorldSample, names: list[Optional[str]], image_size: int, limit: int) -> list[str]:
    """'The {a} is {rel} the {b}.' for each of ``stated_relations``."""
    return [f"The {names[i]} is {rel} the {names[j]}." for i, rel, j in stated_relations(sample, names, image_size, limit)]


def _statements(sample: WorldSample, names: list[Optional[str]], image_size: int, rng: np.random.Generator,
                max_each: int = 3) -> list[Statement]:
    """Balanced true/false spatial statements between uniquely named objects: true ones from the
    relations, false ones the opposite direction of a true one, or "next to" for far-apart boxes."""
    objs = sample.objects
    true, false = [], []
    for i, rel, j in sample.relations:
        if names[i] is None or names[j] is None:
            continue
        true.append(Statement(f"The {names[i]} is {rel} the {names[j]}.", True, rel, i, j))
        if rel in OPPOSITE:
            opp = OPPOSITE[rel]
            false.append(Statement(f"The {names[i]} is {opp} the {names[j]}.", False, opp, i, j))
    for i in range(len(objs)):
        for j in range(len(objs)):
            if i != j and names[i] and names[j] and far_apart(objs[i], objs[j], image_size):
                false.append(Statement(f"The {names[i]} is next to the {names[j]}.", False, "next to", i, j))
    k = min(len(true), len(false), max_each)
    pick_t = rng.permutation(len(true))[:k] if true else []
    pick_f = rng.permutation(len(false))[:k] if false else []
    out = [true[t] for t in pick_t] + [false[f] for f in pick_f]
    return [out[p] for p in rng.permutation(len(out))]


def _questions(objects: list[WorldObject], rng: np.random.Generator) -> list[tuple[str, str]]:
    """Existence questions: every present shape (yes), as many absent shapes (no), and one present /
    one absent colour-shape pair."""
    present = list(dict.fromkeys(o.shape for o in objects))
    absent = [s for s in SHAPES if s not in present]
    qs = [(prompts.pope_question(s), "yes") for s in present]
    for s in rng.permutation(absent)[:len(present)]:
        qs.append((prompts.pope_question(str(s)), "no"))
    o = objects[int(rng.integers(len(objects)))]
    qs.append((prompts.pope_question(f"{o.color} {o.shape}"), "yes"))
    pairs = {(p.color, p.shape) for p in objects}
    shape = present[int(rng.integers(len(present)))]
    colors = [c for c in COLORS if (c, shape) not in pairs]
    if colors:
        qs.append((prompts.pope_question(f"{colors[int(rng.integers(len(colors)))]} {shape}"), "no"))
    return [qs[p] for p in rng.permutation(len(qs))]


def describe(sample: WorldSample, rng: np.random.Generator, background_kind: str, image_size: int) -> None:
    """Fill every text field of ``sample`` in place (captions, long caption, referring expressions,
    questions, statements) from its objects and relations."""
    objs = sample.objects
    n = len(objs)
    bg = f"{BACKGROUND_WORDS[background_kind]} grey background"
    sample.referring = [referring_expression(objs, i, image_size, rng) for i in range(n)]
    for i, expr in enumerate(sample.referring):
        if resolve_referring(expr, objs, image_size) != [i]:  # the uniqueness guarantee, checked on every sample
            raise RuntimeError(f"referring expression {expr!r} is not unique in {[o.name for o in objs]}")
    located = [f"{_article(o.size)} {o.name} {position_phrase(o, image_size)}" for o in objs]
    names = [unique_phrase(objs, k) for k in range(n)]
    rel_sentences = _relation_sentences(sample, names, image_size, limit=max(1, n))
    detailed = _sentence(f"{_join(located)}, on {bg}")
    if rel_sentences:
        detailed += " " + " ".join(rel_sentences[:2])
    sample.captions = {"short": short_caption(objs), "detailed": detailed, "counting": counting_caption(objs)}
    sentences = [f"The image shows {number_word(n)} object{'' if n == 1 else 's'} on {bg}."]
    sentences += [f"There is {_article(o.size)} {o.name} {position_phrase(o, image_size)}." for o in objs]
    sentences += rel_sentences
    sample.long_caption = " ".join(sentences)
    sample.questions = _questions(objs, rng)
    sample.statements = _statements(sample, names, image_size, rng)


def normalized_box(obj: WorldObject, image_size: int) -> tuple[float, float, float, float]:
    """The object's box as [x1, y1, x2, y2] in [0, 1] (pixel box / image side)."""
    return tuple(v / image_size for v in obj.box)  # type: ignore[return-value]


def _turn(sample: WorldSample, kind: str, rng: np.random.Generator, image_size: int) -> tuple[str, str]:
    """One (prompt, answer) of the given kind."""
    if kind == "caption":
        return prompts.CAPTION_PROMPT, sample.captions["short"]
    if kind == "detail":
        return prompts.DETAIL_PROMPT, sample.captions["detailed"]
    if kind == "count":
        return prompts.COUNT_PROMPT, sample.captions["counting"]
    if kind == "exist":
        q, a = sample.questions[int(rng.integers(len(sample.questions)))]
        return prompts.pope_prompt(q), prompts.YES if a == "yes" else prompts.NO
    if kind == "spatial":
        st = sample.statements[int(rng.integers(len(sample.statements)))]
        return prompts.vsr_prompt(st.text), prompts.TRUE if st.label else prompts.FALSE
    i = int(rng.integers(len(sample.objects)))
    return prompts.grounding_prompt(sample.referring[i]), prompts.format_box(normalized_box(sample.objects[i], image_size))


def llava_conversations(sample: WorldSample, seed: int, image_size: int) -> list[list[tuple[str, str]]]:
    """Two LLaVA conversations for a sample, each a list of ("human"|"gpt", text) turns with
    ``<image>`` at the start of the first human turn. The first opens with a caption (short or
    detailed), the second with a grounding request; both continue with 1-2 random other turns
    (existence, counting, spatial true/false, grounding). Deterministic in (seed, index)."""
    rng = np.random.default_rng([seed, sample.index, 2])
    extra = ["exist", "count", "grounding"] + (["spatial"] if sample.statements else [])
    convs = []
    for first in ("caption" if rng.random() < 0.5 else "detail", "grounding"):
        others = [k for k in extra if k != first]
        kinds = [first] + [others[p] for p in rng.permutation(len(others))[:1 + int(rng.integers(2))]]
        turns: list[tuple[str, str]] = []
        for t, kind in enumerate(kinds):
            q, a = _turn(sample, kind, rng, image_size)
            turns += [("human", f"{prompts.IMAGE_TOKEN}\n{q}" if t == 0 else q), ("gpt", a)]
        convs.append(turns)
    return convs


def sample_texts(sample: WorldSample, seed: int, image_size: int) -> Iterator[str]:
    """Every text of one sample: captions, long caption, referring expressions, questions with
    answers, statements, and each LLaVA turn as 'prompt\\nanswer' (without the image token)."""
    yield from sample.captions.values()
    yield sample.long_caption
    yield from sample.referring
    for q, a in sample.questions:
        yield f"{q} {prompts.YES if a == 'yes' else prompts.NO}"
    for st in sample.statements:
        yield st.text
    for conv in llava_conversations(sample, seed, image_size):
        for (_, q), (_, a) in zip(conv[0::2], conv[1::2]):
            yield f"{q.replace(prompts.IMAGE_TOKEN, '').strip()}\n{a}"
