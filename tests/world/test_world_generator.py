"""The generator: determinism, and annotations checked against the rendered pixels."""
import re

import numpy as np
import pytest

from vlm.config import WorldConfig
from vlm.world.generator import generate_sample, world_split
from vlm.world.render import shape_mask
from vlm.world.text import resolve_referring
from vlm.world.vocab import (CHAIR_SYNONYMS, CLASS_NAMES, COLORS, NEXT_TO_GAP, NUMBER_WORDS, RELATION_MARGIN,
                             RELATIONS, SHAPES, relation_holds)

CFG = WorldConfig(n_train=100, n_eval=20)


def test_same_seed_and_index_give_identical_samples():
    a, b = generate_sample(7, 3, CFG), generate_sample(7, 3, CFG)
    for field in ("image", "class_mask", "instance_mask"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.objects == b.objects and a.relations == b.relations
    assert (a.captions, a.long_caption, a.referring, a.questions, a.statements) == \
           (b.captions, b.long_caption, b.referring, b.questions, b.statements)


def test_different_seeds_and_indices_differ():
    base = generate_sample(0, 0, CFG)
    assert not np.array_equal(base.image, generate_sample(0, 1, CFG).image)
    assert not np.array_equal(base.image, generate_sample(1, 0, CFG).image)


def test_order_of_generation_does_not_matter():
    forward = [generate_sample(i, 5, CFG).image for i in range(5)]
    backward = [generate_sample(i, 5, CFG).image for i in reversed(range(5))][::-1]
    for a, b in zip(forward, backward):
        np.testing.assert_array_equal(a, b)


def test_world_split():
    train, ev = world_split(WorldConfig(n_train=10, n_eval=3))
    assert list(train) == list(range(10)) and list(ev) == [10, 11, 12]


def _reference_relation(rel, a, b, size):
    """Plain re-statement of the documented definitions (vocab.py)."""
    m = RELATION_MARGIN * size
    if rel == "left of":
        return a.center[0] + m < b.center[0]
    if rel == "right of":
        return a.center[0] > b.center[0] + m
    if rel == "above":
        return a.center[1] + m < b.center[1]
    if rel == "below":
        return a.center[1] > b.center[1] + m
    gx = max(a.box[0], b.box[0]) - min(a.box[2], b.box[2])
    gy = max(a.box[1], b.box[1]) - min(a.box[3], b.box[3])
    return max(gx, gy, 0) <= NEXT_TO_GAP * size


def check_sample(s, cfg):
    size = cfg.image_size
    assert s.image.shape == (size, size, 3) and s.image.dtype == np.uint8
    assert s.class_mask.shape == s.instance_mask.shape == (size, size)
    assert cfg.min_objects <= len(s.objects) <= cfg.max_objects
    # class mask is the instance mask mapped through each object's shape
    lut = np.array([0] + [SHAPES.index(o.shape) + 1 for o in s.objects])
    np.testing.assert_array_equal(s.class_mask, lut[s.instance_mask])
    assert set(np.unique(s.instance_mask)) <= set(range(len(s.objects) + 1))
    for k, o in enumerate(s.objects):
        ys, xs = np.nonzero(s.instance_mask == k + 1)
        assert len(ys) > 0
        # the box is tight around exactly the visible pixels (exclusive max)
        assert o.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert o.center == ((o.box[0] + o.box[2]) / 2, (o.box[1] + o.box[3]) / 2)
        assert (s.image[ys, xs] == COLORS[o.color]).all()
        # every shape fills >= ~35% of its tight box, so a sliver left by occlusion would fail this
        assert len(ys) >= 0.3 * (o.box[2] - o.box[0]) * (o.box[3] - o.box[1])
        assert o.shape in SHAPES and o.color in COLORS and o.size in ("small", "large")
    # relations agree with the documented definitions, for every ordered pair and relation
    expected = {(i, r, j) for i, a in enumerate(s.objects) for j, b in enumerate(s.objects) if i != j
                for r in RELATIONS if _reference_relation(r, a, b, size)}
    assert set(s.relations) == expected
    # referring expressions: one per object, each resolves to exactly its object, all distinct
    assert len(s.referring) == len(s.objects) == len(set(s.referring))
    for k, expr in enumerate(s.referring):
        assert resolve_referring(expr, s.objects, size) == [k], expr
    # statements: label = whether the relation holds; balanced
    for st in s.statements:
        assert relation_holds(st.relation, s.objects[st.subject], s.objects[st.object], size) == st.label
        assert st.relation in st.text
    assert sum(st.label for st in s.statements) * 2 == len(s.statements)
    # existence questions: yes iff the (colour and) shape is present
    present = {o.shape for o in s.objects} | {f"{o.color} {o.shape}" for o in s.objects}
    for q, a in s.questions:
        obj = re.match(r"Is there an? (.+) in the image\?", q).group(1)
        assert a == ("yes" if obj in present else "no"), q
    assert {a for _, a in s.questions} == {"yes", "no"} or len({o.shape for o in s.objects}) == len(SHAPES)
    # counting caption states the number of objects
    n = len(s.objects)
    assert s.captions["counting"].split()[2] == NUMBER_WORDS[n]
    assert set(s.captions) == {"short", "detailed", "counting"}
    assert s.long_caption.count(".") >= n + 1


@pytest.mark.parametrize("cfg,count", [
    (WorldConfig(), 150),
    (WorldConfig(image_size=32, max_objects=6, texture_prob=1.0, seed=4), 60),
    (WorldConfig(image_size=224, min_objects=3, max_objects=8, seed=9), 8),
])
def test_annotations_are_exact(cfg, count):
    for index in range(count):
        check_sample(generate_sample(index, cfg.seed, cfg), cfg)


def test_shapes_are_distinct_masks():
    masks = {s: shape_mask(s, 12).astype(bool) for s in SHAPES}
    for a in SHAPES:
        assert masks[a].sum() > 20
        for b in SHAPES:
            if a < b:
                iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
                assert iou < 0.85, (a, b, iou)
    with pytest.raises(ValueError, match="unknown shape"):
        shape_mask("blob", 10)


def test_vocabulary():
    assert len(SHAPES) >= 6 and len(COLORS) >= 8 and CLASS_NAMES[0] == "background"
    rgb = np.array(list(COLORS.values()), dtype=int)
    diffs = np.abs(rgb[:, None] - rgb[None]).max(-1)
    assert (diffs + np.eye(len(rgb), dtype=int) * 1000 >= 85).all()  # colours far apart
    assert (rgb.max(1) - rgb.min(1) >= 120).all()  # saturated, never mistaken for the grey background
    words = [w for syns in CHAIR_SYNONYMS.values() for w in syns]
    assert len(words) == len(set(words))  # no synonym names two shapes
