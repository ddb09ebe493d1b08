"""Small helpers shared by the eval tasks: run options, batching, image loading, moving inputs to the model."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar

import torch
from PIL import Image

from eval.prompt_sets import PromptSet, prompt_set
from vlm.data.images import expand2square, pad_colour
from vlm.files import DEFAULT_MAX_IMAGE_PIXELS, open_image

T = TypeVar("T")
ANSWER_MODES = ("score", "generate")


@dataclass
class RunOptions:
    """What every task's ``run(model, data, out_dir, limit, batch_size, options)`` may read besides
    its data: ``progress`` (tqdm bars), ``answer_mode`` for yes/no and true/false answers ("score":
    single-forward log-prob comparison, with AUC; "generate": generated text parsed the reference
    way), ``captions`` (image_id -> caption), filled by the captioning task and reused by CHAIR
    so the same captions are not generated twice, and ``blank_image``: the image-ablation control,
    every image replaced by a uniform one of the processor's mean colour at the same size
    (``blank_like``), so the score is what the model gets from priors alone; ``prompt_set``: the
    wording the tasks ask with (``eval.prompt_sets``)."""

    progress: bool = True
    answer_mode: str = "score"
    captions: dict[int, str] = field(default_factory=dict)
    blank_image: bool = False
    prompt_set: str = "world"

    def __post_init__(self) -> None:
        if self.answer_mode not in ANSWER_MODES:
            raise ValueError(f"answer_mode must be 'score' or 'generate', got {self.answer_mode!r}")
        prompt_set(self.prompt_set)  # a typo fails here, listing the valid names

    @property
    def prompts(self) -> PromptSet:
        """The ``PromptSet`` called ``prompt_set``."""
        return prompt_set(self.prompt_set)


def batched(items: Sequence[T], batch_size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of ``items`` of length ``batch_size`` (the last may be shorter)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    for start in range(0, len(items), batch_size):
        yield items[start:start + batch_size]


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an image file as RGB; a missing or unreadable file, or one over ``max_pixels`` pixels by
    its header (checked before decoding), raises ``vlm.files.ImageError`` naming the path."""
    return open_image(path, max_pixels)


def mean_colour(transform) -> tuple[int, int, int]:
    """The processor's mean colour as RGB 0..255 (``transform.mean``; mid-grey when it has none)."""
    mean = getattr(transform, "mean", (0.5, 0.5, 0.5))
    return tuple(int(round(255 * float(m))) for m in mean)


def blank_like(image: Image.Image, transform) -> Image.Image:
    """A uniform RGB image of ``transform``'s mean colour with ``image``'s size (the blank-image control)."""
    return Image.new("RGB", image.size, mean_colour(transform))


def pixel_batch(model, paths: Sequence[str | Path], cache: dict | None = None, blank: bool = False) -> torch.Tensor:
    """Images at ``paths`` through ``model.image_transform`` -> float [B, 3, H, W] on the model's device.

    A non-square image is padded to a square with the processor's mean colour first (LLaVA's
    ``expand2square``, ``vlm.data.images``), never centre-cropped, so the whole image and every box
    stay in view. ``cache`` (path -> [3, H, W]) avoids re-decoding an image asked about several
    times (POPE asks ~6 questions per image). ``blank``: each image is replaced by
    ``blank_like(image)`` (same size, the processor's mean colour) before the padding and transform.
    """
    transform: Callable = model.image_transform
    tensors = []
    for p in paths:
        key = str(p)
        if cache is not None and key in cache:
            tensors.append(cache[key])
            continue
        image = load_image(p)
        image = blank_like(image, transform) if blank else image
        t = transform(expand2square(image, pad_colour(getattr(transform, "mean", (0.5, 0.5, 0.5)))))
        if cache is not None:
            cache[key] = t
        tensors.append(t)
    pixels = torch.stack(tensors)
    device = model_device(model)
    return pixels.to(device) if device is not None else pixels


def model_device(model) -> torch.device | None:
    """The device of the model's first parameter (None for objects without parameters)."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return None
