"""Feature containers exchanged between the dual encoder and the stage-one objectives.

All embeddings are raw (not L2-normalised); each objective normalises what it needs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence, TypeVar, Union

import torch


@dataclass
class ImageFeatures:
    """Image-side features of a batch.

    global_emb:   [B, d]    pooled (and, for SPARC, non-linearly projected) image embedding.
    patch_emb:    [B, P, d] per-patch embeddings in the shared space.
    patch_tokens: [B, P, w] vision-tower patch hidden states (width w), used by FLAIR's pooling.
    """

    global_emb: torch.Tensor
    patch_emb: torch.Tensor
    patch_tokens: torch.Tensor


@dataclass
class TextFeatures:
    """Text-side features of a batch.

    global_emb: [B, d]    pooled caption embedding.
    token_emb:  [B, L, d] per-token embeddings in the shared space.
    token_mask: [B, L]    bool, True on real (non-padding) tokens.
    """

    global_emb: torch.Tensor
    token_emb: torch.Tensor
    token_mask: torch.Tensor


Features = TypeVar("Features", bound=Union[ImageFeatures, TextFeatures])


def cat_features(parts: Sequence[Features]) -> Features:
    """Concatenate the features of consecutive row blocks (``ImageFeatures`` or ``TextFeatures``):
    every field [b_i, ...] -> [sum_i b_i, ...] along dim 0."""
    first = parts[0]
    return type(first)(**{f.name: torch.cat([getattr(p, f.name) for p in parts], dim=0)
                          for f in dataclasses.fields(first)})
