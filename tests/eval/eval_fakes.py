"""A tiny deterministic stand-in for VisionLanguageModel and fixture files for the eval tests.

Images are 8x8 solid colours whose red channel encodes an image number (10 * k), so the fake
model knows which image it is looking at without any learning.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def write_image(path: Path, k: int) -> Path:
    """An 8x8 PNG whose red channel is 10 * k (k < 25)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((8, 8, 3), dtype=np.uint8)
    arr[..., 0] = 10 * k
    arr[..., 1] = 100
    Image.fromarray(arr).save(path)
    return path


def image_number(pixels: torch.Tensor) -> list[int]:
    """[B,3,H,W] in [0,1] -> the image numbers k."""
    return [int(round(float(p[0, 0, 0]) * 255 / 10)) for p in pixels]


class FakeVLM:
    """generate(): ``texts[(k, prompt)]`` (else ``default_text``); score(): ``scores[(k, prompt)]``
    (a list, one log-prob per choice; else zeros). Records every call in ``calls``."""

    def __init__(self, texts=None, scores=None, default_text: str = ""):
        self.texts = dict(texts or {})
        self.scores = dict(scores or {})
        self.default_text = default_text
        self.calls: list[tuple[str, int]] = []

    @staticmethod
    def image_transform(image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)

    def eval(self):
        return self

    def generate(self, pixel_values, prompts, max_new_tokens=32, **kwargs):
        assert pixel_values.shape[0] == len(prompts)
        self.calls.append(("generate", len(prompts)))
        return [self.texts.get((k, p), self.default_text) for k, p in zip(image_number(pixel_values), prompts)]

    def score(self, pixel_values, prompts, choices):
        assert pixel_values.shape[0] == len(prompts)
        self.calls.append(("score", len(prompts)))
        rows = [self.scores.get((k, p), [0.0] * len(choices)) for k, p in zip(image_number(pixel_values), prompts)]
        return torch.tensor(rows, dtype=torch.float32)
