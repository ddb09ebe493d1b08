"""The procedural world: seeded images of coloured shapes with exact annotations.

``generate_sample(index, seed, cfg)`` is a pure function of ``(seed, index, cfg)``: all randomness
comes from ``numpy.random.default_rng([seed, index])`` (layout and pixels) and
``default_rng([seed, index, 1])`` (the wording of the texts), so any sample can be regenerated
alone, in any order, in any process.

Layout rules (what keeps every object identifiable):
- 1..``max_objects`` objects (at least ``min_objects``), each a shape, a colour and a size
  (``small`` / ``large``: a square side drawn from ``cfg.small_size`` / ``cfg.large_size``, as
  fractions of the image side), drawn upright at a random position;
- two boxes may overlap by at most ``MAX_OVERLAP`` of the smaller one's area, and two objects of
  the same colour never touch (>= 2 px apart), so each object keeps most of its pixels visible
  (a layout where one keeps less than ``MIN_VISIBLE`` of them is re-drawn);
- at most two objects share all three attributes, so a referring expression can always single one
  out (by a relation or by "leftmost"/"topmost"...).
Annotations are read off the rendered masks: later objects are drawn on top, the instance and
class masks record the topmost object, and each box is tight around the object's visible pixels.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from vlm.config import WorldConfig
from vlm.world import mix as world_mix
from vlm.world import text as world_text
from vlm.world.render import background, shape_mask
from vlm.world.types import WorldObject, WorldSample
from vlm.world.vocab import COLORS, SHAPES, SIZES, box_gap, box_intersection, spatial_relations

MAX_OVERLAP = 0.10
MIN_VISIBLE = 0.75
SAME_COLOR_GAP = 2
_COLOR_NAMES = tuple(COLORS)


def world_split(cfg: WorldConfig) -> tuple[range, range]:
    """(train indices, eval indices): ``range(n_train)`` and ``range(n_train, n_train + n_eval)``."""
    return range(cfg.n_train), range(cfg.n_train, cfg.n_train + cfg.n_eval)


Placement = tuple  # (shape, color, size, side, x0, y0): one object before rendering


def size_range(cfg: WorldConfig, size: str) -> tuple[float, float]:
    """(lo, hi) of an object's square side as a fraction of the image side, for "small" / "large"."""
    lo, hi = cfg.small_size if size == "small" else cfg.large_size
    return float(lo), float(hi)


def _fits(placed: list[Placement], candidate: Placement) -> bool:
    """Whether ``candidate`` obeys the layout rules against every object in ``placed`` (overlap,
    same-colour gap, at most two objects sharing all three attributes)."""
    shape, color, size, side, x0, y0 = candidate
    if sum(p[:3] == (shape, color, size) for p in placed) >= 2:
        return False
    box = (x0, y0, x0 + side, y0 + side)
    for p in placed:
        other = (p[4], p[5], p[4] + p[3], p[5] + p[3])
        if box_intersection(box, other) > MAX_OVERLAP * min(side, p[3]) ** 2:
            return False
        if p[1] == color and box_gap(box, other) < SAME_COLOR_GAP:
            return False
    return True


def _sample_layout(rng: np.random.Generator, cfg: WorldConfig, n: int) -> list[Placement]:
    """Up to ``n`` placements (shape, color, size, side, x0, y0) obeying the layout rules."""
    s_img = cfg.image_size
    placed: list[Placement] = []
    for _ in range(n):
        for _attempt in range(60):
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            color = _COLOR_NAMES[int(rng.integers(len(_COLOR_NAMES)))]
            size = SIZES[int(rng.integers(len(SIZES)))]
            if sum(p[:3] == (shape, color, size) for p in placed) >= 2:
                continue  # checked before drawing the position (the draw order defines the world)
            lo, hi = size_range(cfg, size)
            side = int(rng.integers(max(4, round(lo * s_img)), max(4, round(hi * s_img)) + 1))
            side = min(side, s_img)
            x0 = int(rng.integers(0, s_img - side + 1))
            y0 = int(rng.integers(0, s_img - side + 1))
            candidate = (shape, color, size, side, x0, y0)
            if _fits(placed, candidate):
                placed.append(candidate)
                break
    return placed


def _render(placed: list[Placement], image: np.ndarray) -> Optional[tuple[np.ndarray, np.ndarray, list[WorldObject]]]:
    """Draw ``placed`` on a copy of ``image`` [S,S,3] -> (image, instance mask int64 [S,S], objects),
    or None when an object keeps less than ``MIN_VISIBLE`` of its pixels. Later objects are drawn
    on top; each box is tight around the object's visible pixels."""
    s_img = image.shape[0]
    img = image.copy()
    inst = np.zeros((s_img, s_img), dtype=np.int64)
    for k, (shape, color, _size, side, x0, y0) in enumerate(placed):
        m = shape_mask(shape, side)
        img[y0:y0 + side, x0:x0 + side][m] = COLORS[color]
        inst[y0:y0 + side, x0:x0 + side][m] = k + 1
    objects = []
    for k, (shape, color, size, side, x0, y0) in enumerate(placed):
        local = inst[y0:y0 + side, x0:x0 + side] == k + 1
        if int(local.sum()) < MIN_VISIBLE * int(shape_mask(shape, side).sum()):
            return None
        ys, xs = np.nonzero(local.any(axis=1))[0], np.nonzero(local.any(axis=0))[0]
        box = (x0 + int(xs[0]), y0 + int(ys[0]), x0 + int(xs[-1]) + 1, y0 + int(ys[-1]) + 1)
        center = ((box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0)
        objects.append(WorldObject(shape=shape, color=color, size=size, box=box, center=center))
    return img, inst, objects


def _layout(index: int, seed: int, cfg: WorldConfig) -> tuple[np.ndarray, str, list[Placement]]:
    """(background uint8 [S,S,3], its kind, placements) of sample ``index``: every draw from
    ``default_rng([seed, index])``, so the twin of a sample shares its background and layout."""
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = np.random.default_rng([seed, index])
    n_target = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    textured = bool(rng.random() < cfg.texture_prob)
    image, bg_kind = background(rng, cfg.image_size, textured)
    for _layout_try in range(20):
        placed = _sample_layout(rng, cfg, n_target)
        if len(placed) >= cfg.min_objects and _render(placed, image) is not None:
            return image, bg_kind, placed
    # pragma: no cover - only for extreme configs (many large objects on a tiny image)
    raise RuntimeError(f"could not lay out {cfg.min_objects}+ objects on a {cfg.image_size}px image (index {index})")


def _sample(index: int, seed: int, cfg: WorldConfig, placed: list[Placement], image: np.ndarray,
            bg_kind: str) -> WorldSample:
    """Render ``placed`` and annotate it (masks, relations, every text field)."""
    rendered = _render(placed, image)
    if rendered is None:
        raise RuntimeError(f"sample {index}: an object of the layout is hidden (internal error)")
    img, inst, objects = rendered
    shape_index = np.array([0] + [SHAPES.index(o.shape) + 1 for o in objects], dtype=np.int64)
    relations = spatial_relations(objects, cfg.image_size)
    sample = WorldSample(index=index, image=img, class_mask=shape_index[inst], instance_mask=inst, objects=objects,
                         relations=relations, captions={}, long_caption="", referring=[])
    world_text.describe(sample, np.random.default_rng([seed, index, 1]), bg_kind, cfg.image_size)
    return sample


def generate_sample(index: int, seed: int, cfg: WorldConfig) -> WorldSample:
    """Render sample ``index`` of the world ``(seed, cfg)`` -> WorldSample.

    image uint8 [S, S, 3]; class_mask / instance_mask int64 [S, S]; boxes xyxy pixels (exclusive
    max), tight around the visible pixels; every text field filled (see ``vlm.world.text``).
    """
    image, bg_kind, placed = _layout(index, seed, cfg)
    return _sample(index, seed, cfg, placed, image, bg_kind)


TWIN_ATTRIBUTES = ("shape", "color")


def _twin_candidates(placed: list[Placement], rng: np.random.Generator) -> Iterator[tuple[int, str, Placement]]:
    """(object k, attribute, changed placement) in a random order: every object, both attributes,
    every other value of the attribute."""
    for k in rng.permutation(len(placed)):
        for attr in rng.permutation(len(TWIN_ATTRIBUTES)):
            values = SHAPES if attr == 0 else _COLOR_NAMES
            current = placed[int(k)][attr]
            for value in rng.permutation([v for v in values if v != current]):
                changed = list(placed[int(k)])
                changed[attr] = str(value)
                yield int(k), TWIN_ATTRIBUTES[attr], tuple(changed)


def generate_twin(index: int, seed: int, cfg: WorldConfig) -> tuple[WorldSample, int, str]:
    """The image-side hard negative of sample ``index``: the same background and layout with one
    object's shape or colour changed -> (twin sample, object index k, "shape" | "color").

    The change is drawn from ``default_rng([seed, index, 2])`` among those that keep the layout
    rules and every object visible; the twin's texts describe the twin. Its ``index`` is the
    original's (it is never a sample of the world's splits). Raises ``RuntimeError`` when no change
    fits (cannot happen with the vocabulary's 8 shapes and 8 colours).
    """
    image, bg_kind, placed = _layout(index, seed, cfg)
    rng = np.random.default_rng([seed, index, 2])
    for k, attr, changed in _twin_candidates(placed, rng):
        twin = placed[:k] + [changed] + placed[k + 1:]
        if _fits(placed[:k] + placed[k + 1:], changed) and _render(twin, image) is not None:
            return _sample(index, seed, cfg, twin, image, bg_kind), k, attr
    raise RuntimeError(f"sample {index}: no one-attribute change keeps the layout valid")


def world_corpus(cfg: WorldConfig, indices: Iterable[int]) -> Iterator[str]:
    """Every text the world produces for samples ``indices`` (``vlm.world.text.sample_texts``), in order."""
    for index in indices:
        yield from world_text.sample_texts(generate_sample(index, cfg.seed, cfg), cfg.seed, cfg.image_size)


def world_documents(cfg: WorldConfig, indices: Iterable[int], n_documents: int, n_turns: int,
                    contexts: Sequence[str] = ("short", "long")) -> Iterator[list[tuple[str, str]]]:
    """The world LM's per-image documents (``vlm.world.mix.image_documents``) for samples
    ``indices``, in order; existence negatives are sampled POPE-style over these samples only."""
    indices = list(indices)
    objects = {f"{i:08d}": {o.shape for o in generate_sample(i, cfg.seed, cfg).objects} for i in indices}
    exist = world_mix.existence_questions(objects, cfg.seed)
    for index in indices:
        sample = generate_sample(index, cfg.seed, cfg)
        yield from world_mix.image_documents(sample, exist[sample.key], cfg, n_documents, n_turns, contexts)
