"""The Flamingo bridge: a perceiver resampler and gated cross-attention blocks in the frozen LLM.

- ``PerceiverResampler``: the P patch tokens are projected to the LLM width d; M learned latents
  then go through ``resampler_layers`` blocks of (latents attend to [patch tokens; latents]) +
  FFN, each pre-LayerNorm and residual; output [B,M,d].
- ``GatedCrossAttentionBlock``: ``x = x + tanh(alpha_attn) * xattn(LN(x), latents)`` then
  ``x = x + tanh(alpha_ff) * ffn(LN(x))`` with both alphas initialised at 0, so at step 0 the
  LLM's outputs are exactly unchanged.
- ``GatedDecoderLayer``: the LLM's decoder layer i (every ``xattn_every``-th, from layer 0) is
  replaced in its ``ModuleList`` by a wrapper holding the original layer; the wrapper runs the
  gated block on the hidden states, then the original layer. The latents come from the bridge's
  context (``Bridge.conditioned``), set by the VLM around each LLM call. Every text position
  attends to all M latents (one image per sequence, so Flamingo's "only the preceding image"
  mask has nothing to select). A position's cross-attention depends only on its own hidden state,
  so ``generate`` with the KV cache needs no extra cache and gives the same tokens as without.

The ``<image>`` placeholder is removed from the text (``num_image_tokens == 0``): the image
enters only through cross-attention, and an LLM whose vocabulary lacks ``<image>`` needs no new
token. The gated blocks belong to the bridge (its ``state_dict``); a wrapper refers to its block
without registering it again, so parameter names stay unique.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlm.config import BridgeConfig
from vlm.model.bridges.base import Bridge
from vlm.model.llm import decoder_layers


class CrossAttention(nn.Module):
    """Multi-head attention of queries [B,T,d] over keys/values [B,S,d] -> [B,T,d] (no mask).

    Plain q/k/v/o projections and ``scaled_dot_product_attention``: one code path whether or not
    gradients are on (``nn.MultiheadAttention`` switches to a fused inference kernel, whose
    rounding differs, when they are off).
    """

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x [B,T,d], context [B,S,d] -> [B,T,d]."""
        B, T, d = x.shape
        h = self.num_heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, t.shape[1], h, d // h).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(context)), split(self.v(context)))
        return self.o(out.transpose(1, 2).reshape(B, T, d))


def _ffn(width: int, mult: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width * mult), nn.GELU(), nn.Linear(width * mult, width))


class ResamplerLayer(nn.Module):
    """latents [B,M,d] attend to [media [B,P,d]; latents], then an FFN; both residual."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.norm_media = nn.LayerNorm(width)
        self.norm_latents = nn.LayerNorm(width)
        self.attn = CrossAttention(width, num_heads)
        self.ffn = _ffn(width)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """media [B,P,d], latents [B,M,d] -> updated latents [B,M,d]."""
        q = self.norm_latents(latents)
        kv = torch.cat([self.norm_media(media), q], dim=1)
        latents = latents + self.attn(q, kv)
        return latents + self.ffn(latents)


class PerceiverResampler(nn.Module):
    """patch tokens [B,P,w] -> latents [B,M,d]."""

    def __init__(self, vision_width: int, width: int, num_latents: int, num_layers: int, num_heads: int):
        super().__init__()
        self.proj = nn.Linear(vision_width, width)
        self.latents = nn.Parameter(torch.randn(num_latents, width) * width ** -0.5)
        self.layers = nn.ModuleList(ResamplerLayer(width, num_heads) for _ in range(num_layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """patch_tokens [B,P,w] -> latents [B,M,d]."""
        media = self.proj(patch_tokens)
        latents = self.latents.unsqueeze(0).expand(media.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(media, latents)
        return self.norm(latents)


class GatedCrossAttentionBlock(nn.Module):
    """x [B,T,d], latents [B,M,d] -> x + tanh(a_attn) xattn(LN x, latents), then + tanh(a_ff) ffn(LN x)."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attn = CrossAttention(width, num_heads)
        self.attn_gate = nn.Parameter(torch.zeros(()))
        self.ffn = _ffn(width)  # begins with its own LayerNorm
        self.ff_gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """x [B,T,d] (any float dtype), latents [B,M,d] -> [B,T,d] in x's dtype."""
        dtype = self.attn_gate.dtype
        h = x.to(dtype)
        latents = latents.to(dtype)
        h = h + torch.tanh(self.attn_gate) * self.attn(self.norm(h), latents)
        h = h + torch.tanh(self.ff_gate) * self.ffn(h)
        return h.to(x.dtype)


class GatedDecoderLayer(nn.Module):
    """A decoder layer with a gated cross-attention block run on its input first.

    ``forward(hidden_states, *args, **kwargs)`` has the wrapped layer's signature and return value.
    Attributes the LLM reads from its layers (e.g. ``attention_type``) are forwarded to the layer.
    """

    def __init__(self, layer: nn.Module, block: GatedCrossAttentionBlock, bridge: "FlamingoBridge"):
        super().__init__()
        self.layer = layer
        # Owned (and registered) by the bridge; kept out of this module's registry on purpose.
        object.__setattr__(self, "_block", block)
        object.__setattr__(self, "_bridge", bridge)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "layer":
                raise
            return getattr(super().__getattr__("layer"), name)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        """hidden_states [B,T,d] (+ the layer's own arguments) -> the wrapped layer's output."""
        latents = self._bridge.current_features
        if latents is not None:
            if latents.shape[0] != hidden_states.shape[0]:
                raise ValueError(f"{latents.shape[0]} images for a batch of {hidden_states.shape[0]} sequences")
            hidden_states = self._block(hidden_states, latents)
        return self.layer(hidden_states, *args, **kwargs)


class FlamingoBridge(Bridge):
    """``forward(patch_tokens [B,P,w]) -> latents [B,M,d]``; gated blocks before every k-th layer."""

    def __init__(self, cfg: BridgeConfig, vision_width: int, llm_width: int, num_llm_layers: int):
        super().__init__()
        if llm_width % cfg.num_heads:
            raise ValueError(f"bridge.num_heads={cfg.num_heads} does not divide the LLM width {llm_width}")
        self.xattn_every = cfg.xattn_every
        self.layer_indices = list(range(0, num_llm_layers, cfg.xattn_every))
        self.resampler = PerceiverResampler(vision_width, llm_width, cfg.num_latents, cfg.resampler_layers,
                                            cfg.num_heads)
        self.blocks = nn.ModuleList(GatedCrossAttentionBlock(llm_width, cfg.num_heads) for _ in self.layer_indices)
        self._attached = False

    def num_image_tokens(self, num_patches: int) -> int:
        """0: the placeholder is removed; the image enters only through cross-attention."""
        return 0

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """patch_tokens [B,P,w] -> latents [B,M,d]."""
        return self.resampler(patch_tokens.to(self.resampler.proj.weight.dtype))

    def attach(self, llm: nn.Module, image_token_id: int = -1) -> None:
        """Wrap decoder layers ``layer_indices`` of ``llm`` in ``GatedDecoderLayer``s."""
        if self._attached:
            raise RuntimeError("the flamingo bridge is already attached to an LLM")
        layers = decoder_layers(llm)
        if self.layer_indices and self.layer_indices[-1] >= len(layers):
            raise ValueError(f"the bridge was built for >= {self.layer_indices[-1] + 1} decoder layers, "
                             f"the LLM has {len(layers)}")
        for block, i in zip(self.blocks, self.layer_indices):
            if isinstance(layers[i], GatedDecoderLayer):
                raise RuntimeError(f"decoder layer {i} is already wrapped")
            layers[i] = GatedDecoderLayer(layers[i], block, self)
        self._image_token_id = int(image_token_id)
        self._attached = True

    def detach(self, llm: nn.Module) -> None:
        """Put the original decoder layers back."""
        if not self._attached:
            return
        layers = decoder_layers(llm)
        for i in self.layer_indices:
            if isinstance(layers[i], GatedDecoderLayer):
                layers[i] = layers[i].layer
        self._attached = False

    def gates(self) -> torch.Tensor:
        """tanh of the gate parameters [n_blocks, 2] (attention, feed-forward), detached."""
        return torch.tanh(torch.stack([torch.stack([b.attn_gate, b.ff_gate]) for b in self.blocks]).detach())

    def log_terms(self) -> dict[str, torch.Tensor]:
        """``xattn_gate``: mean |tanh(alpha)| over every gate (0 at init: how open the image path is)."""
        return {"xattn_gate": self.gates().abs().mean()} if len(self.blocks) else {}
