"""CHAIR (Rohrbach et al., 2018): object hallucination in generated captions.

A caption's *mentions* are the object words it contains, found through a synonym table (each
synonym maps to one object). With ``present`` the set of objects really in the image:

    CHAIR_i = hallucinated mentions / all mentions          (over the whole set of captions)
    CHAIR_s = captions with >= 1 hallucinated mention / all captions
    recall  = present objects mentioned / present objects   (summed over images, as the reference)

plus the mean caption length in words. Ground truth: for COCO, an image's instance-segmentation
classes plus the objects named in its reference captions; for the world, the shapes in the
image's instance annotations.

Matching, as the reference ``chair.py`` does it: lower-case, tokenise, singularise each word, merge
multi-word names first (the longest match wins: "hot dog", "teddy bear", "traffic light" are
one object each, so "hot dog" does not fire "dog" and "teddy bear" does not fire "bear"), map
"baby <animal>" / "adult <animal>" to the animal (so the qualifier does not fire "person"),
"passenger jet/train" to the vehicle, "bow tie" to "tie", "toilet seat" to "toilet" (and drop
"seat" when "toilet" is mentioned), and treat "home plate" and "train track" as non-objects.
Repeated mentions of one object all count towards CHAIR_i, as in the reference.

Where this differs from the reference. The reference singularises with ``pattern.en`` and
tokenises with NLTK (punkt data), neither obtainable offline. Here the tokeniser is the regex
``[a-z]+`` and the singulariser is data-free: a word already in the table is kept as it is, else
irregular plurals (men, women, children, people, mice, geese, feet, knives, ...) and suffix rules
(-ies -> -y, -ves -> -f/-fe, -es -> "", -s -> "") are tried and the first candidate in the table
wins. Consequences: ``pattern.en`` turns "bus" into "bu" and "glass" into "glas" (hence the
reference's 'wine glas' rule), so the reference never counts a "bus" mention; this module does.
The reference merges only two-word names, so "stove top oven" never matches there; here it does.
"iPhone" in the reference table never matches a lower-cased caption there; here the table is
lower-cased.

Tokenisation follows ``nltk.word_tokenize`` for every word class CHAIR can see (``reference_words``):
hyphenated compounds stay one token ("hot-dog", "dog-shaped" name nothing, as in the reference),
possessives and contractions split off ("dog's" -> "dog"), any run of spaces, tabs or newlines
separates words (so "motor  bike" is the two-word name "motor bike"). "seat" is dropped only next
to the word "toilet" (or "toilet seat"), as the reference does it ("urinal" keeps it).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional

from eval.captioning import generate_captions, read_captioned_images, select_images
from eval.io import RunOptions
from eval.report import markdown_table, write_task_outputs
from eval.sources import EvalSources, first
from vlm.data.formats import read_coco_instances
from vlm.world.vocab import CHAIR_SYNONYMS

TASK = "chair"
HEADLINE = ["chair_i", "chair_s", "recall", "mean_length"]  # the harness's combined summary.md
REPORT_COLUMNS = ["chair_i", "chair_s", "recall"]  # the demo / ablation tables

# The COCO synonym table of the reference implementation (LisaAnne/Hallucination,
# data/synonyms.txt): one object per line, its COCO category name first, then its synonyms.
COCO_SYNONYMS_TXT = """\
person, girl, boy, man, woman, kid, child, chef, baker, people, adult, rider, children, baby, worker, passenger, sister, biker, policeman, cop, officer, lady, cowboy, bride, groom, male, female, guy, traveler, mother, father, gentleman, pitcher, player, skier, snowboarder, skater, skateboarder, person, woman, guy, foreigner, child, gentleman, caller, offender, coworker, trespasser, patient, politician, soldier, grandchild, serviceman, walker, drinker, doctor, bicyclist, thief, buyer, teenager, student, camper, driver, solider, hunter, shopper, villager
bicycle, bike, bicycle, bike, unicycle, minibike, trike
car, automobile, van, minivan, sedan, suv, hatchback, cab, jeep, coupe, taxicab, limo, taxi
motorcycle, scooter, motor bike, motor cycle, motorbike, scooter, moped
airplane, jetliner, plane, air plane, monoplane, aircraft, jet, jetliner, airbus, biplane, seaplane
bus, minibus, trolley
train, locomotive, tramway, caboose
truck, pickup, lorry, hauler, firetruck
boat, ship, liner, sailboat, motorboat, dinghy, powerboat, speedboat, canoe, skiff, yacht, kayak, catamaran, pontoon, houseboat, vessel, rowboat, trawler, ferryboat, watercraft, tugboat, schooner, barge, ferry, sailboard, paddleboat, lifeboat, freighter, steamboat, riverboat, battleship, steamship
traffic light, street light, traffic signal, stop light, streetlight, stoplight
fire hydrant, hydrant
stop sign
parking meter
bench, pew
bird, ostrich, owl, seagull, goose, duck, parakeet, falcon, robin, pelican, waterfowl, heron, hummingbird, mallard, finch, pigeon, sparrow, seabird, osprey, blackbird, fowl, shorebird, woodpecker, egret, chickadee, quail, bluebird, kingfisher, buzzard, willet, gull, swan, bluejay, flamingo, cormorant, parrot, loon, gosling, waterbird, pheasant, rooster, sandpiper, crow, raven, turkey, oriole, cowbird, warbler, magpie, peacock, cockatiel, lorikeet, puffin, vulture, condor, macaw, peafowl, cockatoo, songbird
cat, kitten, feline, tabby
dog, puppy, beagle, pup, chihuahua, schnauzer, dachshund, rottweiler, canine, pitbull, collie, pug, terrier, poodle, labrador, doggie, doberman, mutt, doggy, spaniel, bulldog, sheepdog, weimaraner, corgi, cocker, greyhound, retriever, brindle, hound, whippet, husky
horse, colt, pony, racehorse, stallion, equine, mare, foal, palomino, mustang, clydesdale, bronc, bronco
sheep, lamb, ram, lamb, goat, ewe
cow, cattle, oxen, ox, calf, cattle, holstein, heifer, buffalo, bull, zebu, bison
elephant
bear, panda
zebra
giraffe
backpack, knapsack
umbrella
handbag, wallet, purse, briefcase
tie, bow, bow tie
suitcase, suit case, luggage
frisbee
skis, ski
snowboard
sports ball, ball
kite
baseball bat
baseball glove
skateboard
surfboard, longboard, skimboard, shortboard, wakeboard
tennis racket, racket
bottle
wine glass
cup
fork
knife, pocketknife, knive
spoon
bowl, container
banana
apple
sandwich, burger, sub, cheeseburger, hamburger
orange
broccoli
carrot
hot dog
pizza
donut, doughnut, bagel
cake, cheesecake, cupcake, shortcake, coffeecake, pancake
chair, seat, stool
couch, sofa, recliner, futon, loveseat, settee, chesterfield
potted plant, houseplant
bed
dining table, table, desk
toilet, urinal, commode, toilet, lavatory, potty
tv, monitor, televison, television
laptop, computer, notebook, netbook, lenovo, macbook, laptop computer
mouse
remote
keyboard
cell phone, mobile phone, phone, cellphone, telephone, phon, smartphone, iPhone
microwave
oven, stovetop, stove, stove top oven
toaster
sink
refrigerator, fridge, fridge, freezer
book
clock
vase
scissors
teddy bear, teddybear
hair drier, hairdryer
toothbrush
"""

# The reference's hard-coded phrase rules (beyond the multi-word names of the table).
COCO_ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")
COCO_PHRASES: dict[str, Optional[str]] = {
    **{f"baby {a}": a for a in COCO_ANIMALS},
    **{f"adult {a}": a for a in COCO_ANIMALS},
    "passenger jet": "jet", "passenger train": "train",
    "bow tie": "tie", "toilet seat": "toilet",
    "home plate": None, "train track": None,  # phrases that name no COCO object
}

_IRREGULAR = {"men": "man", "women": "woman", "children": "child", "people": "person", "mice": "mouse",
              "geese": "goose", "feet": "foot", "teeth": "tooth", "oxen": "ox", "knives": "knife",
              "wives": "wife", "leaves": "leaf", "calves": "calf", "halves": "half", "shelves": "shelf",
              "loaves": "loaf", "wolves": "wolf", "dice": "die", "cacti": "cactus", "buses": "bus",
              "busses": "bus", "gasses": "gas", "skis": "ski"}
# NLTK's Treebank tokenisation, as far as CHAIR can see it: a hyphenated compound is one token
# ("hot-dog", "dog-friendly": never an object unless the table lists the compound), contractions and
# possessives split off ("dog's" -> "dog" "'s", "don't" -> "do" "n't", "dogs'" -> "dogs" "'"),
# punctuation apart. Tokens that cannot name an object (punctuation, "'s") are not kept.
_CONTRACTION = re.compile(r"(?<=[a-z0-9])(n't|'s|'re|'ve|'ll|'d|'m|')(?=[^a-z0-9]|$)")
_WORD = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*(?:'[a-z0-9]+)*")


def reference_words(caption: str) -> list[str]:
    """Lower-cased word tokens of ``caption`` as the reference's ``nltk.word_tokenize`` splits them
    (hyphenated compounds whole, clitics off), without the punctuation and clitic tokens."""
    text = _CONTRACTION.sub(lambda m: " " + m.group(1), str(caption).lower())
    return [w for w in _WORD.findall(text) if w not in ("n't",)]


def singular_candidates(word: str) -> list[str]:
    """Possible singular forms of a lower-case ``word``, most likely first (the word itself last).

    Data-free: an irregular-plural table, then suffix rules (-ies -> -y, -ves -> -f / -fe,
    -xes/-ches/-shes/-sses/-zes/-oes -> drop "es", -es -> drop "s" or "es", -s -> drop "s",
    -men -> -man); -is / -us -> drop "s" comes after the word itself.
    """
    cands: list[str] = []
    if word in _IRREGULAR:
        cands.append(_IRREGULAR[word])
    if len(word) > 3 and word.endswith("ies"):
        cands.append(word[:-3] + "y")
    if len(word) > 3 and word.endswith("ves"):
        cands += [word[:-3] + "f", word[:-3] + "fe"]
    if word.endswith(("xes", "ches", "shes", "sses", "zes", "oes")):
        cands.append(word[:-2])
    if word.endswith("es") and len(word) > 3:
        cands += [word[:-1], word[:-2]]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")) and len(word) > 2:
        cands.append(word[:-1])
    if word.endswith("men") and len(word) > 4:
        cands.append(word[:-3] + "man")  # policemen, gentlemen, servicemen
    cands.append(word)
    if word.endswith(("is", "us")) and len(word) > 3:
        cands.append(word[:-1])  # taxis, zebus: only after the word itself, so "bus" never becomes "bu"
    seen: list[str] = []
    for c in cands:
        if c and c not in seen:
            seen.append(c)
    return seen


def singularize(word: str, vocabulary: frozenset[str] | set[str] = frozenset()) -> str:
    """``word`` (lower case) -> its singular: a word in ``vocabulary`` is kept as it is ("scissors",
    "skis", "bus", "glass"); else the first candidate found in ``vocabulary``; else the first
    rule-based candidate (irregular table, then suffix rules)."""
    if word in vocabulary:
        return word
    cands = singular_candidates(word)
    for c in cands:
        if c in vocabulary:
            return c
    return cands[0]


@dataclass
class ChairVocab:
    """A synonym table: ``synonyms`` phrase (one or more words) -> object, and ``phrases``:
    extra multi-word rules phrase -> a word of the table (mapped on to its object) or None (the
    phrase names no object; so does a word the table does not know)."""

    synonyms: dict[str, str]
    phrases: dict[str, Optional[str]] = field(default_factory=dict)
    drop_if_present: dict[str, tuple[str, ...]] = field(default_factory=dict)  # word -> drop it next to these words

    def __post_init__(self) -> None:
        self.synonyms = {k.lower(): v for k, v in self.synonyms.items()}
        objs = set(self.synonyms.values())
        # A phrase's target is a word looked up in the table, as in the reference ("passenger jet"
        # -> "jet" -> airplane); a word the table does not know ("baby cub" -> "cub") names no object.
        self.phrases = {k.lower(): None if v is None else self.synonyms.get(v.lower(), v if v in objs else None)
                        for k, v in self.phrases.items()}
        table = {**self.synonyms, **self.phrases}
        self._multi = {tuple(k.split()): v for k, v in table.items() if len(k.split()) > 1}
        self._max_len = max([len(k) for k in self._multi] + [1])
        self._words = frozenset(w for k in table for w in k.split())

    @property
    def objects(self) -> set[str]:
        """Every object the table can name."""
        return set(self.synonyms.values()) | {v for v in self.phrases.values() if v is not None}

    def tokens(self, caption: str) -> list[str]:
        """Lower-cased word tokens of ``caption``, each singularised against the table's words."""
        return [singularize(w, self._words) for w in reference_words(caption)]

    def mentions(self, caption: str) -> list[tuple[str, str]]:
        """(matched phrase, object) for every object mention in ``caption``, in order (repeats kept).

        Multi-word names are matched first, longest first, on the singularised tokens.
        """
        words = self.tokens(caption)
        out: list[tuple[str, str]] = []
        i = 0
        while i < len(words):
            for n in range(min(self._max_len, len(words) - i), 1, -1):
                key = tuple(words[i:i + n])
                if key in self._multi:
                    if self._multi[key] is not None:
                        out.append((" ".join(key), self._multi[key]))
                    i += n
                    break
            else:
                if words[i] in self.synonyms:
                    out.append((words[i], self.synonyms[words[i]]))
                i += 1
        said = {w for w, _ in out}
        return [(w, o) for w, o in out if not said.intersection(self.drop_if_present.get(w, ()))]

    def objects_in(self, caption: str) -> list[str]:
        """The objects mentioned in ``caption`` (one entry per mention)."""
        return [obj for _, obj in self.mentions(caption)]

    def to_object(self, name: str) -> Optional[str]:
        """A category / object name -> its object in this table (None when unknown)."""
        name = " ".join(self.tokens(name)) if name.lower() not in self.synonyms else name.lower()
        return self.synonyms.get(name, self.phrases.get(name))


def coco_vocab() -> ChairVocab:
    """The reference's COCO table (80 categories) with its phrase rules."""
    synonyms: dict[str, str] = {}
    for line in COCO_SYNONYMS_TXT.strip().splitlines():
        names = [s.strip().lower() for s in line.split(",") if s.strip()]
        for s in names:
            synonyms[s] = names[0]  # a later line wins on a repeated synonym, as in the reference
    return ChairVocab(synonyms, dict(COCO_PHRASES), drop_if_present={"seat": ("toilet", "toilet seat")})


def vocab_from_table(table: Mapping[str, Iterable[str]]) -> ChairVocab:
    """A table object -> [synonyms...] (e.g. ``vlm.world.vocab.CHAIR_SYNONYMS``) as a ChairVocab;
    the object's own name always maps to itself."""
    synonyms: dict[str, str] = {}
    for obj, syns in table.items():
        for s in [obj, *syns]:
            synonyms[s.lower()] = obj
    return ChairVocab(synonyms)


def world_vocab() -> ChairVocab:
    """The synthetic world's table (``vlm.world.vocab.CHAIR_SYNONYMS``)."""
    return vocab_from_table(CHAIR_SYNONYMS)


def chair_metrics(mentioned: list[list[str]], present: list[set[str]], lengths: list[int]) -> dict[str, float]:
    """CHAIR from per-caption object mentions.

    mentioned  per caption, the objects it mentions (one entry per mention)
    present    per caption, the objects really in its image
    lengths    per caption, its length in words
    Returns chair_i, chair_s, recall (present objects mentioned / present objects, summed over
    captions), mean_length, n_captions, n_mentions, n_hallucinated. Ratios over an empty
    denominator are 0, as in the reference.
    """
    if not (len(mentioned) == len(present) == len(lengths)):
        raise ValueError(f"lengths differ: {len(mentioned)} mentions, {len(present)} present, {len(lengths)} lengths")
    n_mentions = n_hall = n_hall_caps = n_present = n_recalled = 0
    for objs, gt in zip(mentioned, present):
        hall = [o for o in objs if o not in gt]
        n_mentions += len(objs)
        n_hall += len(hall)
        n_hall_caps += bool(hall)
        n_present += len(gt)
        n_recalled += len(set(objs) & set(gt))
    n = len(mentioned)
    return {
        "chair_i": n_hall / n_mentions if n_mentions else 0.0,
        "chair_s": n_hall_caps / n if n else 0.0,
        "recall": n_recalled / n_present if n_present else 0.0,
        "mean_length": sum(lengths) / n if n else 0.0,
        "n_captions": n, "n_mentions": n_mentions, "n_hallucinated": n_hall,
    }


@dataclass
class ChairData:
    """CHAIR inputs. ``images``: image_id -> path; ``present``: image_id -> objects in the image
    (names in ``vocab``'s object space); ``vocab``: the synonym table."""

    images: dict[int, Path]
    present: dict[int, set[str]]
    vocab: ChairVocab


def ground_truth(vocab: ChairVocab, segment_classes: Mapping[int, Iterable[str]],
                 reference_captions: Mapping[int, Iterable[str]] | None = None) -> dict[int, set[str]]:
    """image_id -> present objects: its segmentation class names (mapped through ``vocab``; an
    unknown class name raises) plus the objects its reference captions mention (COCO protocol)."""
    out: dict[int, set[str]] = {}
    for img, names in segment_classes.items():
        objs = set()
        for name in names:
            obj = vocab.to_object(name)
            if obj is None:
                raise ValueError(f"image {img}: category {name!r} is not in the CHAIR synonym table")
            objs.add(obj)
        out[img] = objs
    for img, caps in (reference_captions or {}).items():
        out.setdefault(img, set()).update(o for c in caps for o in vocab.objects_in(c))
    return out


def score(captions: Mapping[int, str], data: ChairData) -> tuple[dict[str, float], list[dict]]:
    """CHAIR of generated ``captions`` (image_id -> text) -> (summary, per-caption records)."""
    ids = sorted(captions)
    missing = [i for i in ids if i not in data.present]
    if missing:
        raise ValueError(f"no ground-truth objects for image ids {missing[:5]}")
    mentions = [data.vocab.mentions(captions[i]) for i in ids]
    mentioned = [[o for _, o in m] for m in mentions]
    present = [data.present[i] for i in ids]
    lengths = [len(captions[i].split()) for i in ids]
    summary = chair_metrics(mentioned, present, lengths)
    records = []
    for i, m, gt in zip(ids, mentions, present):
        hall = [(w, o) for w, o in m if o not in gt]
        records.append({"id": i, "image": str(data.images.get(i, "")), "output": captions[i],
                        "mentions": [list(x) for x in m], "present": sorted(gt),
                        "hallucinated": [list(x) for x in hall], "chair_s": int(bool(hall)),
                        "chair_i": len(hall) / len(m) if m else 0.0})
    return summary, records


def segment_classes(inst, ids: Iterable[int]) -> dict[int, list[str]]:
    """image_id -> the category names of its instance annotations (``CocoInstances``), for ``ids``."""
    classes: dict[int, list[str]] = {i: [] for i in ids}
    for ann in inst.annotations.values():
        if ann["image_id"] in classes:
            classes[ann["image_id"]].append(inst.categories[ann["category_id"]])
    return classes


def write_outputs(out_dir: str | Path, summary: dict, records: list[dict]) -> dict:
    """Write ``out_dir/chair/`` (summary table and per-caption records); returns ``summary``."""
    md = f"# {TASK}\n\n" + markdown_table(["CHAIR_i", "CHAIR_s", "recall", "mean length", "captions"],
                                          [[summary["chair_i"], summary["chair_s"], summary["recall"],
                                            summary["mean_length"], summary["n_captions"]]]) + "\n"
    write_task_outputs(out_dir, TASK, summary, records, md)
    return summary


def load(src: EvalSources, limit: Optional[int] = None) -> ChairData:
    """Read and check the CHAIR files (``captions``, ``instances``, ``images``) -> ``ChairData`` of the
    first ``limit`` images. Ground truth: the world's shapes, or COCO's segmentation classes plus
    the objects its reference captions name (``ground_truth``)."""
    caps, images = read_captioned_images(src)
    ids = select_images(images, limit, TASK)
    classes = segment_classes(read_coco_instances(src.file("instances")), ids)
    if src.kind == "world":
        vocab = world_vocab()
        present = ground_truth(vocab, classes)
    else:
        vocab = coco_vocab()
        present = ground_truth(vocab, classes, {i: caps.captions[i] for i in ids})
    return ChairData({i: images[i] for i in ids}, present, vocab)


def run(model, data: ChairData, out_dir: str | Path, limit: Optional[int] = None, batch_size: int = 16,
        options: Optional[RunOptions] = None) -> dict[str, float]:
    """Caption the first ``limit`` images (greedy, [B,3,H,W] batches of ``batch_size``; captions
    already in ``options.captions`` from the captioning task are reused) and score CHAIR.
    Writes ``out_dir/chair/{predictions.jsonl, summary.json, summary.md}``; returns the summary."""
    options = options or RunOptions()
    ids = first(sorted(data.images), limit)
    if not ids:
        raise ValueError("chair: no images")
    prompt = options.prompts.caption
    have = {i: options.captions[i] for i in ids if i in options.captions}
    todo = [i for i in ids if i not in have]
    if todo:
        have.update(generate_captions(model, data.images, todo, batch_size, progress=options.progress, desc=TASK,
                                       blank=options.blank_image, prompt=prompt))
    summary, records = score({i: have[i] for i in ids}, data)
    for r in records:
        r["prompt"] = prompt
    summary["prompt"], summary["prompt_set"] = prompt, options.prompt_set
    return write_outputs(out_dir, summary, records)
