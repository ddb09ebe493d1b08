"""Bridges from a vision tower's patch tokens to a causal LLM (``vlm.model.bridges.BRIDGES``).

Every bridge is an ``nn.Module`` with the same small contract, so ``vlm.model.vision_language_model`` never branches on
the kind of bridge:

- ``forward(vision_features [B,N,w]) -> features`` (projector: [B,N,d] LLM-width tokens; flamingo:
  [B,M,d] resampled latents). The N vision tokens are chosen by ``VLMConfig.vision_feature_layer``
  / ``vision_feature_select_strategy`` (``vlm.model.tower``).
- ``num_image_tokens(N)``: how many ``<image>`` ids the processor writes for one image of N
  feature tokens (projector: N, one per token; flamingo: 1, the media location its mask reads).
- ``attach(llm, image_token_id)`` / ``detach(llm)``: install / remove the bridge's hooks in the LLM
  (an embedding forward hook for the projector; wrapped decoder layers and an embedding pre-hook
  that reads the ``<image>`` position for flamingo). Nothing in
  ``transformers`` is patched; only module instances are hooked or wrapped.
- ``multi_image``: whether a sequence may hold several images (flamingo: each ``<image>`` id then
  marks the next image; projector: one image per sequence).
- ``tokens_in_sequence``: whether the image's feature tokens sit in the LLM's sequence, so its
  self-attention over them can be read (projector: yes; flamingo: no, cross-attention reads them).
- ``conditioned(features)``: a context manager that makes every LLM forward inside it (training,
  scoring, ``generate`` with or without KV cache) see ``features`` as the current images.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn


class Bridge(nn.Module):
    """Base class: holds the current image features while an LLM forward runs."""

    multi_image = False  # True: a sequence may hold several images (features of [B,I,...] pixels)
    tokens_in_sequence = False  # True: one LLM position per feature token (the LLM attends to them itself)

    def __init__(self) -> None:
        super().__init__()
        self._features: Optional[torch.Tensor] = None
        self._image_token_id = -1

    def num_image_tokens(self, num_patches: int) -> int:
        """Number of ``<image>`` ids in the token sequence for one image of ``num_patches`` feature tokens."""
        raise NotImplementedError

    def attach(self, llm: nn.Module, image_token_id: int) -> None:
        """Install the bridge into ``llm`` (a transformers causal LM, possibly peft-wrapped)."""
        raise NotImplementedError

    def detach(self, llm: nn.Module) -> None:
        """Undo ``attach``: ``llm`` is left exactly as it was before."""
        raise NotImplementedError

    def log_terms(self) -> dict[str, torch.Tensor]:
        """Scalars worth logging during training (none by default)."""
        return {}

    @property
    def current_features(self) -> Optional[torch.Tensor]:
        """The features set by ``conditioned`` (None outside it)."""
        return self._features

    @contextlib.contextmanager
    def conditioned(self, features: Optional[torch.Tensor]) -> Iterator[None]:
        """Within the block, LLM forwards are conditioned on ``features`` ([B,N,d], one row per sequence)."""
        previous = self._features
        self._features = features
        try:
            yield
        finally:
            self._features = previous

    @contextlib.contextmanager
    def detached(self, llm: nn.Module) -> Iterator[None]:
        """Temporarily remove the bridge from ``llm`` (to save or merge a clean LLM)."""
        self.detach(llm)
        try:
            yield
        finally:
            self.attach(llm, self._image_token_id)
