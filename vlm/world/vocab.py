"""The synthetic world's vocabulary: shapes, colours, sizes, spatial relations, CHAIR synonyms.

Everything the generator draws and every word the texts use comes from here, so the evals (CHAIR,
POPE, segmentation class names) and the generator can never disagree.

Colours are saturated hues; backgrounds are always grey (plain or textured), so a colour word never
describes the background. Shapes are drawn upright (no rotation) and filled.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vlm.world.types import WorldObject

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart", "diamond", "ring")

# name -> RGB. Distinct from each other (every pair differs by >= 85 in some channel) and from the
# grey backgrounds (levels 70..185, see ``vlm.world.render``): every colour is saturated, its
# largest and smallest channels >= 120 apart, while a grey has all three equal.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (35, 75, 230),
    "yellow": (245, 220, 30),
    "purple": (140, 40, 190),
    "orange": (250, 135, 20),
    "cyan": (30, 210, 230),
    "pink": (250, 130, 200),
}

SIZES: tuple[str, ...] = ("small", "large")

# Spatial relations between two objects i, j, defined from their box centres (cx, cy) (pixels, y
# pointing down) and boxes, with a margin m = RELATION_MARGIN * image_size:
#   "left of"  : cx_i + m < cx_j          "right of": cx_i > cx_j + m
#   "above"    : cy_i + m < cy_j          "below"   : cy_i > cy_j + m
#   "next to"  : the gap between the two boxes (the larger of the horizontal and the vertical gap,
#                0 when the boxes overlap) is <= NEXT_TO_GAP * image_size.
# Several can hold at once ("left of" and "above"); within the margin neither of a pair holds.
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below", "next to")
OPPOSITE: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
RELATION_MARGIN = 0.05
NEXT_TO_GAP = 0.08
# "next to" is stated false only when the gap is clearly large (beyond this fraction of the image).
FAR_APART_GAP = 0.25


def box_gap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    """Larger of the horizontal and vertical gap between two xyxy boxes (0 when they overlap)."""
    gx = max(a[0], b[0]) - min(a[2], b[2])
    gy = max(a[1], b[1]) - min(a[3], b[3])
    return max(gx, gy, 0)


def box_intersection(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    """Area (pixels) of the intersection of two xyxy boxes."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0) * max(h, 0)


def relation_holds(rel: str, a: WorldObject, b: WorldObject, image_size: int) -> bool:
    """Whether object ``a`` is ``rel`` object ``b`` (definitions above, from box centres and boxes)."""
    m = RELATION_MARGIN * image_size
    (ax, ay), (bx, by) = a.center, b.center
    if rel == "left of":
        return ax + m < bx
    if rel == "right of":
        return ax > bx + m
    if rel == "above":
        return ay + m < by
    if rel == "below":
        return ay > by + m
    if rel == "next to":
        return box_gap(a.box, b.box) <= NEXT_TO_GAP * image_size
    raise ValueError(f"unknown relation {rel!r}")


def far_apart(a: WorldObject, b: WorldObject, image_size: int) -> bool:
    """Boxes clearly not next to each other (gap > ``FAR_APART_GAP`` of the image side)."""
    return box_gap(a.box, b.box) > FAR_APART_GAP * image_size


def spatial_relations(objects: list[WorldObject], image_size: int) -> list[tuple[int, str, int]]:
    """Every (i, rel, j), i != j, such that objects[i] is rel objects[j]; order: i, j, RELATIONS."""
    out = []
    for i, a in enumerate(objects):
        for j, b in enumerate(objects):
            if i != j:
                out.extend((i, rel, j) for rel in RELATIONS if relation_holds(rel, a, b, image_size))
    return out


CLASS_NAMES: tuple[str, ...] = ("background", *SHAPES)

# For CHAIR on the world: every word (or multi-word phrase) that names a shape, including plurals.
# Only unambiguous synonyms: "ring" is its own shape (a hollow circle), never a circle; no "box" (boxes are what
# grounding answers contain), no "plus" (an ordinary word), no "x".
CHAIR_SYNONYMS: dict[str, list[str]] = {
    "circle": ["circle", "circles", "disc", "discs", "disk", "disks"],
    "square": ["square", "squares"],
    "triangle": ["triangle", "triangles"],
    "star": ["star", "stars"],
    "cross": ["cross", "crosses", "plus sign", "plus signs"],
    "heart": ["heart", "hearts"],
    "diamond": ["diamond", "diamonds", "rhombus", "rhombuses"],
    "ring": ["ring", "rings", "annulus", "donut", "donuts"],
}

PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
                           "cross": "crosses", "heart": "hearts", "diamond": "diamonds", "ring": "rings"}

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

assert len(SHAPES) >= 6 and len(COLORS) >= 8
assert set(CHAIR_SYNONYMS) == set(SHAPES) == set(PLURALS)
assert all(s in CHAIR_SYNONYMS[s] and PLURALS[s] in CHAIR_SYNONYMS[s] for s in SHAPES)
