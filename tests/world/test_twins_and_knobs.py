"""Image-side twins (one attribute changed) and the world's size knobs."""
import numpy as np
import pytest

from vlm.config import ConfigError, WorldConfig
from vlm.world.generator import generate_sample, generate_twin, world_split

CFG = WorldConfig(n_train=50, n_eval=10)


@pytest.mark.parametrize("index", range(12))
def test_twin_differs_in_exactly_one_attribute_of_one_object(index):
    sample = generate_sample(index, 0, CFG)
    twin, k, attr = generate_twin(index, 0, CFG)
    assert len(twin.objects) == len(sample.objects)
    for j, (a, b) in enumerate(zip(sample.objects, twin.objects)):
        diffs = {f for f in ("shape", "color", "size") if getattr(a, f) != getattr(b, f)}
        assert diffs == ({attr} if j == k else set())
    changed = (sample.image != twin.image).any(axis=-1)
    assert changed.any()
    # only pixels of the changed object's square differ; the background and the others are untouched
    ys, xs = np.nonzero(changed)
    ob, ot = sample.objects[k].box, twin.objects[k].box
    x0, y0 = min(ob[0], ot[0]), min(ob[1], ot[1])
    x1, y1 = max(ob[2], ot[2]), max(ob[3], ot[3])
    assert xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1
    assert twin.captions["short"] != sample.captions["short"]


def test_twin_is_deterministic():
    a, ka, attr_a = generate_twin(3, 0, CFG)
    b, kb, attr_b = generate_twin(3, 0, CFG)
    assert (ka, attr_a) == (kb, attr_b) and np.array_equal(a.image, b.image)
    assert a.captions == b.captions


def test_twins_change_shape_and_colour_about_equally():
    attrs = [generate_twin(i, 0, CFG)[2] for i in range(60)]
    assert 15 <= attrs.count("shape") <= 45


def test_size_knobs_change_object_sizes_and_keep_determinism():
    big = WorldConfig(small_size=[0.25, 0.30], large_size=[0.40, 0.45])
    sides = []
    for i in range(20):
        s = generate_sample(i, 0, big)
        assert np.array_equal(s.image, generate_sample(i, 0, big).image)
        for o in s.objects:
            side = max(o.box[2] - o.box[0], o.box[3] - o.box[1])
            lo, hi = (big.small_size if o.size == "small" else big.large_size)
            assert side <= round(hi * big.image_size)
            sides.append(side)
    assert min(sides) >= 10  # even the smallest drawn shape spans most of its 16+ px square


def test_held_out_split_is_disjoint():
    train, held_out = world_split(CFG)
    assert set(train).isdisjoint(held_out) and len(held_out) == CFG.n_eval


@pytest.mark.parametrize("bad", [dict(small_size=[0.3, 0.2]), dict(small_size=[0.2]),
                                 dict(small_size=[0.2, 0.35], large_size=[0.3, 0.4])])
def test_bad_size_knobs_name_the_key(bad):
    with pytest.raises(ConfigError, match="world.small_size"):
        WorldConfig(**bad)
