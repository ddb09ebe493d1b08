"""POPE construction on hand-built examples: popular, adversarial and random negatives, balance."""
from collections import Counter

import pytest

from vlm.data.pope import build_pope, co_occurrence, object_frequencies

# "dog" is the most frequent object; "car" co-occurs most with "road", "fork" with "knife".
IMAGES = {
    "1.jpg": {"dog", "road", "car"},
    "2.jpg": {"dog", "road", "car"},
    "3.jpg": {"dog", "ball"},
    "4.jpg": {"dog", "grass"},
    "5.jpg": {"knife", "fork"},
    "6.jpg": {"knife", "fork", "dog"},
    "q.jpg": {"road", "knife"},
}


def _obj(q):
    return q.text.removeprefix("Is there a ").removeprefix("n ").removesuffix(" in the image?")


def _pairs(questions, image):
    qs = [q for q in questions if q.image == image]
    return [(_obj(a), _obj(b)) for a, b in zip(qs[0::2], qs[1::2])]


def test_statistics():
    assert object_frequencies(IMAGES)["dog"] == 5
    assert co_occurrence(IMAGES)["road"] == Counter({"car": 2, "dog": 2, "knife": 1})


def test_popular_negatives_are_the_most_frequent_absent_objects():
    out = build_pope(IMAGES, n_per_image=2, seed=0)
    # frequencies: dog 5, car 2, fork 2, knife 3, road 3, ball 1, grass 1 -> for q.jpg (road, knife)
    # absent ones by frequency: dog (5), then car / fork (2; alphabetical tie-break)
    assert [neg for _, neg in _pairs(out["popular"], "q.jpg")] == ["dog", "car"]


def test_adversarial_negatives_co_occur_with_the_positive():
    out = build_pope(IMAGES, n_per_image=2, seed=0)
    # road co-occurs with car (2) and dog (2) -> car (tie broken alphabetically);
    # knife co-occurs with fork (2), then dog and road (1)
    assert dict(_pairs(out["adversarial"], "q.jpg")) == {"road": "car", "knife": "fork"}
    # for 3.jpg (dog, ball): dog co-occurs most with road / car (2 each) -> car; ball with dog only
    pairs = dict(_pairs(out["adversarial"], "3.jpg"))
    assert pairs["dog"] == "car"


def test_adversarial_falls_back_to_random_when_co_occurrences_are_used_up():
    out = build_pope({"a.jpg": {"x", "y"}, "b.jpg": {"x", "y"}}, n_per_image=2, seed=0, vocabulary=["x", "y", "z", "w"])
    negs = [neg for _, neg in _pairs(out["adversarial"], "a.jpg")]
    assert sorted(negs) == ["w", "z"]


def test_balance_structure_and_random_negatives():
    out = build_pope(IMAGES, n_per_image=3, seed=1)
    assert set(out) == {"random", "popular", "adversarial"}
    for split, qs in out.items():
        labels = [q.label for q in qs]
        assert labels.count("yes") == labels.count("no") and labels[0::2] == ["yes"] * (len(qs) // 2)
        assert [q.question_id for q in qs] == list(range(1, len(qs) + 1))
        for image, objs in IMAGES.items():
            pairs = _pairs(qs, image)
            assert len(pairs) == min(3, len(objs))
            asked = [o for p in pairs for o in p]
            assert len(set(asked)) == len(asked)  # never the same object twice in one image
            assert all(p in objs and n not in objs for p, n in pairs)
    # the positives are the same in every split
    assert [q.text for q in out["random"] if q.label == "yes"] == [q.text for q in out["popular"] if q.label == "yes"]
    assert build_pope(IMAGES, seed=1) == out


def test_min_objects_filters_images_like_the_reference():
    vocab = set().union(*IMAGES.values())
    out = build_pope(IMAGES, n_per_image=3, seed=0, min_objects=3, vocabulary=vocab)
    assert {q.image for q in out["random"]} == {"1.jpg", "2.jpg", "6.jpg"}
    assert len(out["random"]) == 3 * 6
    # without a vocabulary, negatives come from the kept images' objects only (5 here): 2 pairs each
    assert len(build_pope(IMAGES, n_per_image=3, min_objects=3)["random"]) == 3 * 4


def test_article_and_errors():
    out = build_pope({"a.jpg": {"apple"}, "b.jpg": {"pear"}}, n_per_image=1)
    assert "Is there an apple in the image?" in [q.text for q in out["random"]]
    with pytest.raises(ValueError, match="vocabulary"):
        build_pope({"a.jpg": {"apple"}}, vocabulary=["pear"])
    with pytest.raises(ValueError):
        build_pope({"a.jpg": {"apple"}}, n_per_image=0)
