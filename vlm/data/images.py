"""Square padding for VLM inputs (LLaVA's ``expand2square``) and boxes between the two frames.

Every VLM eval (and ``vlm generate`` / ``vlm chat``) pads a non-square image to a square of side
S = max(w, h) with the processor's mean colour before the tower's resize, as LLaVA-1.5 does, so
the whole image and every box stay in the frame (a centre crop would cut them off). The image sits
at offset ((S - w) // 2, (S - h) // 2). A box the model reads or writes as [0, 1] coordinates is in
that padded square; ``box_from_square`` maps it back to the original image's pixels, where it is
scored, and ``box_to_square`` is its inverse.
"""
from __future__ import annotations

from typing import Sequence

from PIL import Image

Box = tuple[float, float, float, float]


def pad_colour(mean: Sequence[float]) -> tuple[int, int, int]:
    """A processor's mean (3 floats in [0, 1]) as the RGB fill colour, as LLaVA computes it
    (``tuple(int(x * 255) for x in image_mean)``: truncated, not rounded)."""
    return tuple(int(float(m) * 255) for m in mean)  # type: ignore[return-value]


def expand2square(image: Image.Image, colour: tuple[int, int, int]) -> Image.Image:
    """``image`` (w x h) centred on an S x S canvas of ``colour``, S = max(w, h); a square image is returned as it is."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), colour if image.mode == "RGB" else colour[0])
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def _offsets(width: float, height: float) -> tuple[float, float, float]:
    side = max(width, height)
    return side, (side - width) // 2, (side - height) // 2


def box_from_square(box: Sequence[float], width: float, height: float) -> Box:
    """A [0, 1] (x1, y1, x2, y2) box in the padded square of a ``width`` x ``height`` image ->
    pixels of the original image (not clamped: a box reaching into the padding stays outside)."""
    side, ox, oy = _offsets(width, height)
    x1, y1, x2, y2 = (float(v) * side for v in box)
    return (x1 - ox, y1 - oy, x2 - ox, y2 - oy)


def box_to_square(box_px: Sequence[float], width: float, height: float) -> Box:
    """Pixels (x1, y1, x2, y2) of a ``width`` x ``height`` image -> [0, 1] in its padded square."""
    side, ox, oy = _offsets(width, height)
    x1, y1, x2, y2 = map(float, box_px)
    return ((x1 + ox) / side, (y1 + oy) / side, (x2 + ox) / side, (y2 + oy) / side)
