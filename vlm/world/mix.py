"""An image's texts kept together: stage two's mixed LLaVA conversations and the world LM's documents.

Both are lists of (human, gpt) turns drawn from one sample, each turn of a kind in
``vlm.config.LLAVA_TURN_KINDS`` chosen with the weights ``WorldConfig.llava_mix``:

- ``caption`` / ``detail``: the short / detailed caption;
- ``exist``: a POPE question, "Yes"/"No". The absent objects are sampled the three POPE ways
  (random, popular, adversarial) by ``vlm.data.pope.build_pope`` over the images at hand (for the
  export: the train split only), one way per image in turn; yes and no alternate in shuffled pairs;
- ``count``: "How many {stars | objects} are in the image?", a number word ("Two", "Zero");
- ``spatial``: a true/false statement, "True"/"False";
- ``grounding``: a referring expression answered with its normalised box ``[x1, y1, x2, y2]``.

A *document* (``image_document``) is a conversation in which the image is replaced by a caption: its
first human turn starts ``{context}\\n``, so with stage two's plain text format (``vlm.model.processor``)
it reads ``<s>{context}\\n{question}\\n{answer}</s>{question}\\n{answer}</s>...``, exactly a stage-two
sequence with the caption where the image tokens go. The context is one of ``vlm.config.DOCUMENT_CONTEXTS``:

- ``short``: the short caption; caption, exist and count turns;
- ``long``: the long caption; also spatial statements, drawn from the relations it states;
- ``layout``: each object with its box, "The small red circle is at [0.36, 0.28, 0.61, 0.53]."
  (``layout_caption``); also every spatial statement of the image (decided by the boxes) and
  grounding (the box copied from the context): the box grammar and box reading to learn (what a
  1000-step tiny LM learns of it: ``configs/lm/tiny_world.yaml``).

The answer to every question of a document is determined by its context: kinds the context
cannot decide (detail always; grounding without the layout) are left out.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np

from vlm.config import DOCUMENT_CONTEXTS, LLAVA_TURN_KINDS, WorldConfig
from vlm.data import prompts
from vlm.data.pope import SPLITS as POPE_WAYS
from vlm.data.pope import build_pope
from vlm.world.text import normalized_box, number_word, stated_relations, unique_phrase
from vlm.world.types import Statement, WorldSample
from vlm.world.vocab import OPPOSITE, PLURALS, SHAPES

Turn = tuple[str, str]  # (prompt, answer)
CONVERSE = {**OPPOSITE, "next to": "next to"}  # "a rel b" <=> "b CONVERSE[rel] a"


def existence_questions(image_objects: dict[str, set[str]], seed: int) -> dict[str, list[tuple[str, str]]]:
    """POPE questions per image: key -> [(question, "yes"|"no")], yes/no in pairs.

    image_objects: image key -> the shapes present. Image k (in sorted key order) gets the
    negatives of POPE way ``POPE_WAYS[k % 3]`` (random, popular, adversarial), computed over all
    of ``image_objects`` with ``build_pope(n_per_image=3)``.
    """
    pope = build_pope(image_objects, n_per_image=3, seed=seed, vocabulary=SHAPES)
    way = {key: POPE_WAYS[k % len(POPE_WAYS)] for k, key in enumerate(sorted(image_objects))}
    out: dict[str, list[tuple[str, str]]] = {key: [] for key in image_objects}
    for split, questions in pope.items():
        for q in questions:
            if way[q.image] == split:
                out[q.image].append((q.text, q.label))
    return out


def context_statements(sample: WorldSample, image_size: int) -> list[Statement]:
    """True/false statements decided by the relations the long caption states: for a stated
    "a rel b", true "a rel b" and "b CONVERSE[rel] a", false "a OPPOSITE[rel] b" and
    "b OPPOSITE[CONVERSE[rel]] a" (none for "next to", which has no opposite)."""
    names = [unique_phrase(sample.objects, k) for k in range(len(sample.objects))]
    out = []
    for i, rel, j in stated_relations(sample, names, image_size, limit=max(1, len(sample.objects))):
        facts = [(i, rel, j, True), (j, CONVERSE[rel], i, True)]
        if rel in OPPOSITE:
            facts += [(i, OPPOSITE[rel], j, False), (j, OPPOSITE[CONVERSE[rel]], i, False)]
        out += [Statement(f"The {names[a]} is {r} the {names[b]}.", label, r, a, b) for a, r, b, label in facts]
    return out


class TurnDrawer:
    """Draws (prompt, answer) turns of each kind for one sample with ``rng``.

    Existence questions and statements are drawn in a shuffled order without replacement (refilled
    when used up), so within an image yes/no and true/false stay balanced. ``statements`` defaults
    to the sample's own (``sample.statements``). Within one conversation (``new_conversation``) a
    statement's object pair is not asked twice while the image has another pair: "A left of B"
    then "A right of B" would answer the second from the first, not from the image.
    """

    def __init__(self, sample: WorldSample, exist: list[tuple[str, str]], image_size: int,
                 rng: np.random.Generator, statements: Optional[list[Statement]] = None,
                 kinds: Optional[Iterable[str]] = None):
        self.sample, self.image_size, self.rng = sample, image_size, rng
        self.kinds = set(LLAVA_TURN_KINDS if kinds is None else kinds)
        self.exist_pool = _pairs_shuffled(exist, rng)
        self.statement_pool = list(sample.statements if statements is None else statements)
        self._exist: list[tuple[str, str]] = []
        self._statements: list[Statement] = []
        self._asked_pairs: set[frozenset[int]] = set()

    def new_conversation(self) -> None:
        """Forget the object pairs asked so far (they may be asked again in the next conversation)."""
        self._asked_pairs = set()

    def available(self, kind: str) -> bool:
        """Whether this sample has turns of ``kind`` (spatial needs statements, exist questions) and
        the drawer allows it (``kinds``)."""
        return kind in self.kinds and {"exist": bool(self.exist_pool), "spatial": bool(self.statement_pool)}.get(kind, True)

    def draw(self, kind: str) -> Turn:
        """One (prompt, answer) of ``kind`` (one of ``LLAVA_TURN_KINDS``)."""
        s = self.sample
        if kind == "caption":
            return prompts.CAPTION_PROMPT, s.captions["short"]
        if kind == "detail":
            return prompts.DETAIL_PROMPT, s.captions["detailed"]
        if kind == "exist":
            if not self._exist:
                self._exist = list(self.exist_pool)
            q, label = self._exist.pop(0)
            return prompts.pope_prompt(q), prompts.YES if label == "yes" else prompts.NO
        if kind == "count":
            return self._count()
        if kind == "spatial":
            st = self._statement()
            return prompts.vsr_prompt(st.text), prompts.TRUE if st.label else prompts.FALSE
        if kind == "grounding":
            i = int(self.rng.integers(len(s.objects)))
            return prompts.grounding_prompt(s.referring[i]), prompts.format_box(normalized_box(s.objects[i], self.image_size))
        raise ValueError(f"unknown turn kind {kind!r}; valid: {', '.join(LLAVA_TURN_KINDS)}")

    def _statement(self) -> Statement:
        """The next queued statement about a pair not yet asked in this conversation; the queue is
        extended by the pool in a new order when empty or when every queued one repeats a pair (then
        the first, when every pair of the image has been asked)."""
        k = self._first_fresh()
        if k is None:
            self._statements += [self.statement_pool[p] for p in self.rng.permutation(len(self.statement_pool))]
            k = self._first_fresh() or 0
        st = self._statements.pop(k)
        self._asked_pairs.add(_pair(st))
        return st

    def _first_fresh(self) -> Optional[int]:
        """Index of the first queued statement whose object pair this conversation has not asked."""
        return next((i for i, st in enumerate(self._statements) if _pair(st) not in self._asked_pairs), None)

    def _count(self) -> Turn:
        """'How many objects / {plural} ...' for all objects, a present shape or an absent one."""
        present = sorted({o.shape for o in self.sample.objects})
        absent = [sh for sh in SHAPES if sh not in present]
        targets: list[Optional[str]] = [None, *present] + ([absent[int(self.rng.integers(len(absent)))]] if absent else [])
        shape = targets[int(self.rng.integers(len(targets)))]
        n = len(self.sample.objects) if shape is None else sum(o.shape == shape for o in self.sample.objects)
        return prompts.count_prompt("objects" if shape is None else PLURALS[shape]), number_word(n).capitalize()


def _pair(st: Statement) -> frozenset[int]:
    """The unordered object pair a statement is about ("A left of B" and "B right of A" share one)."""
    return frozenset((st.subject, st.object))


def _pairs_shuffled(questions: list[tuple[str, str]], rng: np.random.Generator) -> list[tuple[str, str]]:
    """Consecutive (yes, no) pairs in a random order, each pair in a random order."""
    pairs = [questions[k:k + 2] for k in range(0, len(questions), 2)]
    out: list[tuple[str, str]] = []
    for p in rng.permutation(len(pairs)):
        pair = pairs[int(p)]
        out += pair[::-1] if rng.random() < 0.5 else pair
    return out


def draw_kinds(drawer: TurnDrawer, mix: dict[str, float], n: int, rng: np.random.Generator) -> list[str]:
    """``n`` turn kinds drawn independently with weights ``mix`` (kinds the sample lacks left out)."""
    kinds = [k for k in LLAVA_TURN_KINDS if mix.get(k, 0) > 0 and drawer.available(k)]
    if not kinds:
        raise ValueError(f"no turn kind of the mix {mix} is available for sample {drawer.sample.index}")
    w = np.array([mix[k] for k in kinds], dtype=np.float64)
    return [kinds[int(i)] for i in rng.choice(len(kinds), size=n, p=w / w.sum())]


def mixed_conversations(sample: WorldSample, exist: list[tuple[str, str]], cfg: WorldConfig) -> list[list[tuple[str, str]]]:
    """``cfg.llava_conversations`` LLaVA conversations of ``cfg.llava_turns`` turns each, kinds drawn
    with ``cfg.llava_mix``: [("human"|"gpt", text)], ``<image>\\n`` before the first human turn.
    ``exist``: this image's POPE questions (``existence_questions``). Deterministic in (seed, index)."""
    rng = np.random.default_rng([cfg.seed, sample.index, 2])
    drawer = TurnDrawer(sample, exist, cfg.image_size, rng)
    convs = []
    for _ in range(cfg.llava_conversations):
        drawer.new_conversation()
        turns = [drawer.draw(k) for k in draw_kinds(drawer, cfg.llava_mix, cfg.llava_turns, rng)]
        convs.append(_as_conversation(turns, prompts.IMAGE_TOKEN))
    return convs


def _as_conversation(turns: list[Turn], opening: str) -> list[tuple[str, str]]:
    """[(prompt, answer)] -> [("human", opening + "\\n" + prompt), ("gpt", answer), ("human", prompt), ...]."""
    out: list[tuple[str, str]] = []
    for t, (q, a) in enumerate(turns):
        out += [("human", f"{opening}\n{q}" if t == 0 else q), ("gpt", a)]
    return out


def layout_caption(sample: WorldSample, image_size: int) -> str:
    """Every object with its full phrase and box: 'The small red circle is at [0.36, 0.28, 0.61, 0.53].
    The large blue star is at [...].' (the ``layout`` context)."""
    return " ".join(f"The {o.size} {o.color} {o.shape} is at {prompts.format_box(normalized_box(o, image_size))}."
                    for o in sample.objects)


def document_context(sample: WorldSample, context: str, image_size: int) -> tuple[str, list[Statement], tuple[str, ...]]:
    """(context text, the statements it decides, the turn kinds it decides) for one of ``DOCUMENT_CONTEXTS``."""
    if context == "short":
        return sample.captions["short"], [], ("caption", "exist", "count")
    if context == "long":
        return sample.long_caption, context_statements(sample, image_size), ("caption", "exist", "count", "spatial")
    if context == "layout":
        return (layout_caption(sample, image_size), list(sample.statements),
                ("caption", "exist", "count", "spatial", "grounding"))
    raise ValueError(f"unknown document context {context!r}; valid: {', '.join(DOCUMENT_CONTEXTS)}")


def image_documents(sample: WorldSample, exist: list[tuple[str, str]], cfg: WorldConfig, n_documents: int,
                    n_turns: int, contexts: Sequence[str] = ("short", "long")) -> list[list[tuple[str, str]]]:
    """The world LM's documents for one sample: ``n_documents`` conversations of ``n_turns`` turns
    whose first human turn opens with a context instead of the image (module docstring). Document d
    takes ``contexts[(index * n_documents + d) % len(contexts)]`` (the list cycles over the corpus, so a
    context listed once of k gets 1/k of the documents); each turn's kind is drawn with ``cfg.llava_mix``
    among the kinds that context decides. Deterministic in (seed, index)."""
    rng = np.random.default_rng([cfg.seed, sample.index, 3])
    docs = []
    for d in range(n_documents):
        context = contexts[(sample.index * n_documents + d) % len(contexts)]
        text, statements, kinds = document_context(sample, context, cfg.image_size)
        drawer = TurnDrawer(sample, exist, cfg.image_size, rng, statements=statements, kinds=kinds)
        turns = [drawer.draw(k) for k in draw_kinds(drawer, cfg.llava_mix, n_turns, rng)]
        docs.append(_as_conversation(turns, text))
    return docs


def image_objects(samples: Iterable[WorldSample]) -> dict[str, set[str]]:
    """sample key -> the shapes present (``existence_questions``' input)."""
    return {s.key: {o.shape for o in s.objects} for s in samples}
