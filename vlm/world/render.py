"""Numpy rendering for the synthetic world: filled shape masks and grey backgrounds.

A shape of size ``s`` is an ``s x s`` boolean mask, computed once per (shape, s) and cached, so
drawing an object is a slice assignment. Shapes (except the ring) fill most of their square (the tight box of the
drawn pixels is what annotations use, never this square).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from vlm.world.vocab import SHAPES


def _polygon(u: np.ndarray, v: np.ndarray, pts: list[tuple[float, float]]) -> np.ndarray:
    """Even-odd point-in-polygon test on coordinate grids u, v [s, s] -> bool [s, s]."""
    inside = np.zeros(u.shape, dtype=bool)
    n = len(pts)
    for k in range(n):
        (x1, y1), (x2, y2) = pts[k], pts[(k + 1) % n]
        if y1 == y2:
            continue
        crosses = (v >= min(y1, y2)) & (v < max(y1, y2))
        x_at = x1 + (v - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (u < x_at)
    return inside


def _star_points(n: int = 5, r_out: float = 1.0, r_in: float = 0.45) -> list[tuple[float, float]]:
    pts = []
    for k in range(2 * n):
        r = r_out if k % 2 == 0 else r_in
        a = -np.pi / 2 + k * np.pi / n  # first point straight up
        pts.append((r * np.cos(a), r * np.sin(a) + 0.1))
    return pts


@lru_cache(maxsize=None)
def shape_mask(shape: str, size: int) -> np.ndarray:
    """The filled mask of ``shape`` in an ``size x size`` square -> bool [size, size] (read-only).

    Coordinates: u, v in [-1, 1] at pixel centres, v pointing down. Raises ValueError for an
    unknown shape or a size < 4.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    if size < 4:
        raise ValueError(f"shape size must be >= 4 pixels, got {size}")
    c = (np.arange(size) + 0.5) / size * 2 - 1
    u, v = np.meshgrid(c, c)
    if shape == "circle":
        m = u ** 2 + v ** 2 <= 1.0
    elif shape == "square":
        m = (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    elif shape == "triangle":  # apex up
        m = (v <= 0.9) & (np.abs(u) <= (v + 1.0) / 1.9)
    elif shape == "star":
        m = _polygon(u, v, _star_points())
    elif shape == "cross":
        arm = 0.34
        m = ((np.abs(u) <= arm) & (np.abs(v) <= 1)) | ((np.abs(v) <= arm) & (np.abs(u) <= 1))
    elif shape == "heart":  # (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0, y up
        x, y = u * 1.2, -v * 1.25 + 0.2
        m = (x ** 2 + y ** 2 - 1) ** 3 - x ** 2 * y ** 3 <= 0
    elif shape == "diamond":
        m = np.abs(u) / 0.8 + np.abs(v) <= 1.0
    else:  # ring: a circle with a hole, the hole wide enough to see even at 10 px
        r2 = u ** 2 + v ** 2
        m = (r2 <= 1.0) & (r2 >= 0.5 ** 2)
    m = np.ascontiguousarray(m)
    m.flags.writeable = False
    return m


BACKGROUNDS = ("plain", "stripes", "checker", "noise", "dots")
GREY_RANGE = (70, 185)  # background base grey level; colours in vocab.COLORS stay clear of it


def background(rng: np.random.Generator, size: int, textured: bool) -> tuple[np.ndarray, str]:
    """A grey background -> (uint8 [size, size, 3], kind). Plain: one grey level. Textured:
    stripes, a checkerboard, smooth noise or dots, +-18 grey levels around the base."""
    base = int(rng.integers(GREY_RANGE[0] + 18, GREY_RANGE[1] - 18 + 1))
    if not textured:
        return np.full((size, size, 3), base, dtype=np.uint8), "plain"
    kind = BACKGROUNDS[1 + int(rng.integers(len(BACKGROUNDS) - 1))]
    yy, xx = np.mgrid[0:size, 0:size]
    if kind == "stripes":
        period = int(rng.integers(4, 10))
        direction = int(rng.integers(3))
        t = xx if direction == 0 else yy if direction == 1 else xx + yy
        pattern = ((t // (period // 2 + 1)) % 2) * 2.0 - 1
    elif kind == "checker":
        cell = int(rng.integers(3, 9))
        pattern = (((xx // cell) + (yy // cell)) % 2) * 2.0 - 1
    elif kind == "noise":
        coarse = rng.uniform(-1, 1, size=(size // 4 + 1, size // 4 + 1))
        pattern = np.kron(coarse, np.ones((4, 4)))[:size, :size]
    else:  # dots
        period = int(rng.integers(5, 9))
        pattern = np.where((xx % period < 2) & (yy % period < 2), 1.0, -0.3)
    grey = np.clip(base + 18 * pattern, 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2), kind
