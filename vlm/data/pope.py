"""POPE question construction (Li et al., 2023), following the reference repo's ``utils.pope``.

For each image, ``n`` present objects are asked about (label "yes"), each followed by one absent
object (label "no"), chosen three ways:
- random: uniformly among the vocabulary's objects not in the image and not asked yet;
- popular: the most frequent objects of the dataset (count of images containing them) not in the
  image and not asked yet;
- adversarial: for the positive just asked, the objects that co-occur with it most often (count of
  images holding both) not in the image and not asked yet.
When popular/adversarial run out of candidates they fall back to random, as the reference does.

Differences from the reference (documented choices): objects per image are a set, so the positives
are a seeded random choice of ``n`` of them (the reference takes the first ``n`` of its list); ties
in frequency / co-occurrence are broken alphabetically (the reference: first seen); and an image
with fewer than ``n`` objects (or fewer than ``n`` absent ones) gets as many pairs as it can,
unless ``min_objects`` is given, which drops such images the way the reference's ``main.py`` does
(``min_objects=n_per_image``). Every split stays balanced: one "no" per "yes".
"""
from __future__ import annotations

import random
from collections import Counter
from typing import Iterable, Optional

from vlm.data.formats import PopeQuestion
from vlm.data.prompts import pope_question

SPLITS = ("random", "popular", "adversarial")


def object_frequencies(image_objects: dict[str, set[str]]) -> Counter:
    """object -> number of images that contain it."""
    return Counter(o for objs in image_objects.values() for o in set(objs))


def co_occurrence(image_objects: dict[str, set[str]]) -> dict[str, Counter]:
    """object -> Counter(other object -> number of images holding both)."""
    out: dict[str, Counter] = {}
    for objs in image_objects.values():
        objs = set(objs)
        for a in objs:
            out.setdefault(a, Counter()).update(b for b in objs if b != a)
    return out


def _ranked(counts: Counter) -> list[str]:
    return [o for o, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def build_pope(image_objects: dict[str, set[str]], n_per_image: int = 3, seed: int = 0,
               vocabulary: Optional[Iterable[str]] = None,
               min_objects: Optional[int] = None) -> dict[str, list[PopeQuestion]]:
    """POPE questions for images -> {"random": [...], "popular": [...], "adversarial": [...]}.

    image_objects: image file name -> the object names present in it.
    vocabulary: the objects negatives may be drawn from (default: every object in the dataset).
    Within a split, questions alternate yes, no, yes, no per image; question ids count from 1.
    """
    if n_per_image < 1:
        raise ValueError(f"n_per_image must be >= 1, got {n_per_image}")
    if min_objects is not None:
        image_objects = {k: v for k, v in image_objects.items() if len(set(v)) >= min_objects}
    freq = object_frequencies(image_objects)
    vocab = sorted(set(vocabulary) if vocabulary is not None else set(freq))
    missing = set(freq) - set(vocab)
    if missing:
        raise ValueError(f"objects {sorted(missing)} appear in images but not in the vocabulary")
    popular = _ranked(freq)
    co = {o: _ranked(c) for o, c in co_occurrence(image_objects).items()}
    out: dict[str, list[PopeQuestion]] = {}
    for split in SPLITS:
        pos_rng = random.Random(f"pope:{seed}:positives")  # same positives in every split, as in the reference
        neg_rng = random.Random(f"pope:{seed}:{split}")
        questions: list[PopeQuestion] = []
        for image in sorted(image_objects):
            present = sorted(set(image_objects[image]))
            absent = [o for o in vocab if o not in present]
            k = min(n_per_image, len(present), len(absent))
            positives = pos_rng.sample(present, k)
            asked: set[str] = set()
            for pos in positives:
                asked.add(pos)
                if split == "random":
                    neg = None
                elif split == "popular":
                    neg = next((o for o in popular if o not in asked and o not in present), None)
                else:
                    neg = next((o for o in co.get(pos, []) if o not in asked and o not in present), None)
                if neg is None:
                    neg = neg_rng.choice([o for o in absent if o not in asked])
                asked.add(neg)
                for obj, label in ((pos, "yes"), (neg, "no")):
                    questions.append(PopeQuestion(question_id=len(questions) + 1, image=image,
                                                  text=pope_question(obj), label=label))
        out[split] = questions
    return out
