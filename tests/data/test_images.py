"""Square padding (LLaVA's expand2square) and boxes between the padded square and image pixels,
on a 640x480 image with a box at its border."""
import numpy as np
import pytest
from PIL import Image

from encoders.towers import CLIP_MEAN, ImageTransform
from vlm.data.images import box_from_square, box_to_square, expand2square, pad_colour


def border_image(width=640, height=480) -> Image.Image:
    """Dark grey with a pure red 40x40 block in the bottom-right corner (touching both borders)."""
    arr = np.full((height, width, 3), 30, dtype=np.uint8)
    arr[height - 40:, width - 40:] = (255, 0, 0)
    return Image.fromarray(arr)


def test_pad_colour_truncates_as_llava():
    assert pad_colour(CLIP_MEAN) == (122, 116, 104)  # int(0.48145466 * 255) = 122, as LLaVA's expand2square


def test_expand2square_keeps_the_whole_image():
    image = border_image()
    square = np.asarray(expand2square(image, (1, 2, 3)))
    assert square.shape == (640, 640, 3)
    assert (square[:80] == (1, 2, 3)).all() and (square[560:] == (1, 2, 3)).all()  # 80 px above and below
    assert (square[80:560] == np.asarray(image)).all()
    assert (square[520:560, 600:] == (255, 0, 0)).all()  # the border block is still there
    tall = np.asarray(expand2square(image.rotate(90, expand=True), (1, 2, 3)))  # 480x640: pads left and right
    assert tall.shape == (640, 640, 3) and (tall[:, :80] == (1, 2, 3)).all()
    same = border_image(64, 64)
    assert expand2square(same, (0, 0, 0)) is same


def test_box_at_the_border_round_trips():
    """The red block, [600, 440, 640, 480] px: in the padded square y moves by 80 of 640 px."""
    box = (600.0, 440.0, 640.0, 480.0)
    square = box_to_square(box, 640, 480)
    assert square == pytest.approx((600 / 640, 520 / 640, 1.0, 560 / 640))
    assert box_from_square(square, 640, 480) == pytest.approx(box)
    assert box_from_square((0.0, 0.0, 1.0, 1.0), 640, 480) == pytest.approx((0, -80, 640, 560))  # padding stays outside
    assert box_from_square(box_to_square((0, 0, 480, 640), 480, 640), 480, 640) == pytest.approx((0, 0, 480, 640))


def test_the_tower_sees_the_border_after_padding():
    """Through a 32-px CLIP transform: padded, the red block lands in the bottom-right of the image
    area (rows 26-27 of 32); centre-cropped it would be cut off."""
    transform = ImageTransform(32)
    image = border_image()
    padded = transform(expand2square(image, pad_colour(transform.mean)))
    red = padded[0] > padded[1] + 1.0  # red channel far above green, in normalised units
    rows, cols = np.nonzero(red.numpy())
    assert rows.max() == 27 and cols.max() == 31 and rows.min() >= 25
    assert padded[:, :3].abs().max() < 0.05  # the padding is the mean colour: ~0 after normalisation
    assert not bool((transform(image)[0] > transform(image)[1] + 1.0).any())  # the crop loses it
