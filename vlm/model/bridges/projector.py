"""The LLaVA projector bridge: a 2-layer MLP (GELU) maps each patch token to the LLM's width.

The processor writes P ``<image>`` ids where the conversation had its single ``<image>``
placeholder; a forward hook on the LLM's input-embedding module overwrites the embeddings at
those positions with the P projected patch tokens (``merge_image_features``). Going through the
embedding module (rather than passing ``inputs_embeds``) keeps every path identical: training,
scoring and ``generate`` with or without the KV cache (transformers forces the cache on when
``generate`` gets ``inputs_embeds``). Steps that contain no ``<image>`` id (cached decoding) pass
through unchanged. Padding on either side works: positions are found by id, not by offset.
"""
from __future__ import annotations

import torch
from torch import nn

from vlm.config import BridgeConfig
from vlm.model.bridges.base import Bridge


def merge_image_features(text_embeds: torch.Tensor, input_ids: torch.Tensor, image_features: torch.Tensor,
                         image_token_id: int) -> torch.Tensor:
    """Put the image tokens at the ``<image>`` positions.

    text_embeds [B,T,d], input_ids [B,T], image_features [B,N,d] -> [B,T,d]: row b's n-th
    ``<image>`` position holds ``image_features[b, n]``; other rows are ``text_embeds``. Every
    row must hold exactly N image ids or none (a text-only sequence: its features are not read;
    no row any: returned unchanged).
    """
    is_image = input_ids == image_token_id
    counts = is_image.sum(dim=1)
    if not bool(counts.any()):
        return text_embeds
    if image_features.shape[0] != input_ids.shape[0]:
        raise ValueError(f"{image_features.shape[0]} images for a batch of {input_ids.shape[0]} sequences")
    n = image_features.shape[1]
    with_image = counts == n
    if not bool((with_image | (counts == 0)).all()):
        raise ValueError(f"each sequence needs exactly {n} <image> ids (one per image token) or none, got counts "
                         f"{counts.tolist()}; build inputs with the model's VLMProcessor")
    out = text_embeds.clone()
    out[is_image] = image_features[with_image].reshape(-1, image_features.shape[-1]).to(out.dtype)
    return out


class ProjectorBridge(Bridge):
    """``forward(patch_tokens [B,P,w]) -> image tokens [B,P,d]``: Linear(w,d) -> GELU -> Linear(d,d)
    (+ a learned [P,d] position table with ``cfg.position_embedding``)."""

    tokens_in_sequence = True

    def __init__(self, cfg: BridgeConfig, vision_width: int, llm_width: int, num_llm_layers: int = 0,
                 num_tokens: int = 0):
        """``cfg.position_embedding`` needs ``num_tokens`` (P); ``num_llm_layers`` is unused."""
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(vision_width, llm_width), nn.GELU(), nn.Linear(llm_width, llm_width))
        self.position: nn.Parameter | None = None
        if cfg.position_embedding:
            if num_tokens <= 0:
                raise ValueError("bridge.position_embedding needs the tower's number of tokens per image")
            self.position = nn.Parameter(torch.randn(num_tokens, llm_width) * 0.02)
        self._hook = None

    def num_image_tokens(self, num_patches: int) -> int:
        """One sequence position per patch."""
        return num_patches

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """patch_tokens [B,P,w] -> [B,P,d]."""
        out = self.mlp(patch_tokens.to(self.mlp[0].weight.dtype))
        if self.position is not None:
            if out.shape[1] != self.position.shape[0]:
                raise ValueError(f"{out.shape[1]} image tokens, but the position table holds {self.position.shape[0]}")
            out = out + self.position
        return out

    def _embedding_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        input_ids = args[0] if args else None
        if input_ids is None:
            return output
        has_image = bool((input_ids == self._image_token_id).any())
        if not has_image:
            return output
        if self._features is None:
            raise RuntimeError("the input holds <image> ids but no image features are set; call the LLM inside "
                               "bridge.conditioned(features) (VisionLanguageModel does this)")
        return merge_image_features(output, input_ids, self._features, self._image_token_id)

    def attach(self, llm: nn.Module, image_token_id: int) -> None:
        """Hook the LLM's input embeddings: ``<image>`` positions get the current image tokens."""
        if self._hook is not None:
            raise RuntimeError("the projector is already attached to an LLM")
        self._image_token_id = int(image_token_id)
        self._hook = llm.get_input_embeddings().register_forward_hook(self._embedding_hook)

    def detach(self, llm: nn.Module) -> None:
        """Remove the embedding hook."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
