"""Pieces shared by the objective modules: learnable scales and precision handling."""

from __future__ import annotations

import math
import random
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

from vlm.config import ObjectiveConfig


class LogScale(nn.Module):
    """A positive learnable scale held as exp(log_scale), clamped at ``max_value`` (as CLIP).

    ``forward() -> scalar tensor``; the clamp stops the gradient once the scale hits the ceiling.
    """

    def __init__(self, init_value: float, max_value: float) -> None:
        super().__init__()
        if not 0 < init_value <= max_value:
            raise ValueError(f"init scale {init_value} must be in (0, max {max_value}]")
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_value)))
        self.max_value = float(max_value)

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=self.max_value)


def check_global_pair(image_emb: torch.Tensor, text_emb: torch.Tensor) -> None:
    """Raise ValueError unless image_emb and text_emb are both [B, d] with B >= 1."""
    if image_emb.dim() != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(f"expected image_emb and text_emb of equal shape [B, d], got "
                         f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    if image_emb.shape[0] == 0:
        raise ValueError("empty batch")


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """Upcast half / bfloat16 tensors to float32 (losses are computed at full precision)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


@contextmanager
def no_autocast(device: torch.device) -> Iterator[None]:
    """Disable autocast around a loss so softmax / log-sigmoid run in float32 or better."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


class Objective(nn.Module):
    """Base of the stage-one objective modules.

    Subclasses implement ``forward(img: ImageFeatures, txt: TextFeatures, batch: dict) -> dict``
    of scalar terms with ``"loss"``. ``captions_for`` tells the data pipeline which texts a
    sample needs; the default is the caption alone.
    """

    @classmethod
    def captions_for(cls, cfg: ObjectiveConfig, caption: str, long_caption: Optional[str] = None,
                     rng: Optional[random.Random] = None) -> list[str]:
        """Texts to tokenise for one sample: ``[caption]`` for single-caption objectives.

        A classmethod so the data pipeline can ask before any model is built.
        """
        return [caption]
