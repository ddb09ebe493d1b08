"""The records the synthetic world produces. Plain dataclasses; no behaviour beyond conversion."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class WorldObject:
    """One object. ``box`` is (x1, y1, x2, y2) in pixels, x2/y2 exclusive; ``center`` is (cx, cy)."""

    shape: str
    color: str
    size: str  # "small" | "large"
    box: tuple[int, int, int, int]
    center: tuple[float, float]

    @property
    def name(self) -> str:
        """'small red circle'."""
        return f"{self.size} {self.color} {self.shape}"


@dataclass
class Statement:
    """A true/false spatial statement about two objects (VSR style)."""

    text: str
    label: bool
    relation: str
    subject: int  # object index
    object: int


@dataclass
class WorldSample:
    """One generated image with exact annotations.

    image          uint8 [H, W, 3]
    class_mask     int64 [H, W]: 0 background, c + 1 for ``SHAPES[c]`` (topmost object wins)
    instance_mask  int64 [H, W]: 0 background, i + 1 for ``objects[i]``
    relations      (i, relation, j): objects[i] is <relation> objects[j], from box centres
    """

    index: int
    image: np.ndarray
    class_mask: np.ndarray
    instance_mask: np.ndarray
    objects: list[WorldObject]
    relations: list[tuple[int, str, int]]
    captions: dict[str, str]  # "short", "detailed", "counting"
    long_caption: str  # several sentences, for FLAIR sub-caption sampling
    referring: list[str]  # one expression per object, unique within the image
    questions: list[tuple[str, str]] = field(default_factory=list)  # (question, "yes"|"no")
    statements: list[Statement] = field(default_factory=list)

    @property
    def key(self) -> str:
        """The sample's file stem in every export: zero-padded index."""
        return f"{self.index:08d}"
