"""The Flamingo bridge (OpenFlamingo): a perceiver resampler and gated cross-attention blocks in the frozen LLM.

- ``PerceiverResampler``: the P patch tokens are projected to the LLM width d; M learned latents
  then go through ``resampler_layers`` blocks of (latents attend to [patch tokens; latents]) +
  FFN, each pre-LayerNorm and residual; output [B,M,d]. With ``resampler_layers: 0`` there are no
  latents: the gated blocks attend to the P projected (and normalised) patch tokens themselves, as
  Llama 3.2 Vision's gated cross-attention layers do (M = P; ``configs/stage2/flamingo_tiny.yaml``
  has the measurement that chose it for the world).
- ``GatedCrossAttentionBlock`` (OpenFlamingo ``helpers.GatedCrossAttentionBlock``):
  ``x = x + tanh(alpha_attn) * m * xattn(LN(x), latents)`` then ``x = x + tanh(alpha_ff) * ffn(LN(x))``
  with both alphas initialised at 0, so at step 0 the LLM's outputs are exactly unchanged. ``m`` is
  the media mask: 1 where a text token may attend to the image, 0 before it.
- Placement (OpenFlamingo ``flamingo_lm.FlamingoLMMixin.init_flamingo``): a block runs before
  decoder layer i when ``(i + 1) % xattn_every == 0`` (k=1: every layer; k=2 with 5 layers: 1, 3).
  ``GatedDecoderLayer`` replaces that layer in its ``ModuleList`` by a wrapper holding the original
  layer; the wrapper runs the gated block on the hidden states, then the original layer.
- Media mask (OpenFlamingo ``helpers.MaskedCrossAttention`` with ``only_attend_immediate_media``):
  the sequence keeps ONE ``<image>`` id where the image is (``num_image_tokens == 1``; the
  processor writes it, as OpenFlamingo's text does); with ``text_time = cumsum(input_ids == <image>)``
  a token attends to the latents of image ``text_time`` and tokens with ``text_time == 0`` (before
  the image) get no cross-attention (exactly zero; the ``<image>`` token itself attends). As in
  OpenFlamingo, the gated feed-forward still applies to every token. Several images per sequence
  (``multi_image``; ``VisionLanguageModel.image_features`` of [B,I,3,H,W] gives latents [B,I*M,d],
  image after image): a token attends only to the latents of image ``text_time``, the last
  ``<image>`` before it (OpenFlamingo's ``only_attend_immediate_media``).
  The mask is computed by a forward pre-hook on the LLM's input embeddings from each call's
  ``input_ids`` (so the LLM must be called with ids, as ``VisionLanguageModel`` does). A call
  without any ``<image>`` id inside ``conditioned`` continues a sequence whose earlier call held
  the image (``generate`` with the KV cache, OpenFlamingo's ``use_cached_media``): every new
  token comes after the image and attends. A position's cross-attention depends only on its own
  hidden state and ``text_time``, so ``generate`` with and without the cache give the same tokens.

The gated blocks belong to the bridge (its ``state_dict``); a wrapper refers to its block
without registering it again, so parameter names stay unique.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

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

    def forward(self, x: torch.Tensor, context: torch.Tensor, allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B,T,d], context [B,S,d] (allowed [B,T,S] bool: which keys each query may attend) -> [B,T,d]."""
        B, T, d = x.shape
        h = self.num_heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, t.shape[1], h, d // h).transpose(1, 2)

        mask = allowed.unsqueeze(1) if allowed is not None else None
        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(context)), split(self.v(context)),
                                             attn_mask=mask)
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
    """patch tokens [B,P,w] -> latents [B,M,d]; with ``num_layers=0`` -> LN(proj(patch tokens)) [B,P,d]."""

    def __init__(self, vision_width: int, width: int, num_latents: int, num_layers: int, num_heads: int):
        super().__init__()
        self.proj = nn.Linear(vision_width, width)
        # No layers: the projected patch tokens are the media (no learned latents to hold).
        self.latents = nn.Parameter(torch.randn(num_latents, width) * width ** -0.5) if num_layers else None
        self.layers = nn.ModuleList(ResamplerLayer(width, num_heads) for _ in range(num_layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """patch_tokens [B,P,w] -> latents [B,M,d] (no layers: the projected patch tokens [B,P,d])."""
        media = self.proj(patch_tokens)
        if not self.layers:
            return self.norm(media)
        latents = self.latents.unsqueeze(0).expand(media.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(media, latents)
        return self.norm(latents)


def immediate_media_mask(input_ids: torch.Tensor, image_token_id: int, image_in_cache: bool,
                         max_images: int = 1) -> torch.Tensor:
    """input_ids [B,T] -> attend [B,T] bool: True where a token attends to its sequence's image.

    OpenFlamingo's ``only_attend_immediate_media`` for one image per sequence: ``text_time =
    cumsum(input_ids == image_token_id)`` and a token attends iff ``text_time >= 1`` (the ``<image>``
    token included). Every row must hold at most ``max_images`` ``<image>`` ids (one per image;
    none: a text-only sequence beside
    ones with an image: none of its tokens attends), or no row any: then the call continues
    cached sequences whose image came earlier (``image_in_cache`` must be True) and every token
    attends. Raises ``ValueError`` otherwise.
    """
    is_image = input_ids == image_token_id
    counts = is_image.sum(dim=1)
    if not bool(counts.any()):
        if not image_in_cache:
            raise ValueError("no <image> id in the input and no earlier call held one; flamingo needs the "
                             "image's position (build inputs with the model's VLMProcessor)")
        return torch.ones_like(is_image)
    if not bool((counts <= max_images).all()):
        raise ValueError(f"each sequence needs one <image> id per image ({max_images}) or none, got counts "
                         f"{counts.tolist()}")
    return is_image.cumsum(dim=1) > 0


class GatedCrossAttentionBlock(nn.Module):
    """x [B,T,d], latents [B,M,d], mask [B,T] -> x + tanh(a_attn) mask xattn(LN x, latents), then + tanh(a_ff) ffn(LN x)."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attn = CrossAttention(width, num_heads)
        self.attn_gate = nn.Parameter(torch.zeros(()))
        self.ffn = _ffn(width)  # begins with its own LayerNorm
        self.ff_gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, latents: torch.Tensor, media_mask: Optional[torch.Tensor] = None,
                allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B,T,d] (any float dtype), latents [B,S,d], media_mask [B,T] bool (None: all attend),
        allowed [B,T,S] bool (several images: the latents of each token's image; None: all)
        -> [B,T,d] in x's dtype. Masked-out tokens get no cross-attention term (exactly)."""
        dtype = self.attn_gate.dtype
        h = x.to(dtype)
        latents = latents.to(dtype)
        attended = self.attn(self.norm(h), latents, allowed)
        if media_mask is not None:
            attended = attended.masked_fill(~media_mask.unsqueeze(-1), 0.0)
        h = h + torch.tanh(self.attn_gate) * attended
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
            mask = self._bridge.media_mask
            if mask is None or mask.shape != hidden_states.shape[:2]:
                raise RuntimeError("no media mask for this call: call the LLM with input_ids (not inputs_embeds) "
                                   "inside bridge.conditioned(features)")
            hidden_states = self._block(hidden_states, latents, mask, self._bridge.latent_mask)
        return self.layer(hidden_states, *args, **kwargs)


def xattn_layer_indices(num_layers: int, every: int) -> list[int]:
    """Decoder layers preceded by a gated block: i with (i + 1) % every == 0 (OpenFlamingo)."""
    return [i for i in range(num_layers) if (i + 1) % every == 0]


class FlamingoBridge(Bridge):
    """``forward(patch_tokens [B,P,w]) -> latents [B,M,d]`` (M = P without resampler layers); gated
    blocks before layers (i+1) % k == 0."""

    # The transformers convention: one FSDP unit per block (training.parallel.fsdp_units).
    _no_split_modules = ["GatedDecoderLayer", "GatedCrossAttentionBlock", "ResamplerLayer"]

    def __init__(self, cfg: BridgeConfig, vision_width: int, llm_width: int, num_llm_layers: int,
                 num_tokens: int = 0):
        super().__init__()
        if llm_width % cfg.num_heads:
            raise ValueError(f"bridge.num_heads={cfg.num_heads} does not divide the LLM width {llm_width}")
        self.xattn_every = cfg.xattn_every
        self.layer_indices = xattn_layer_indices(num_llm_layers, cfg.xattn_every)
        self.resampler = PerceiverResampler(vision_width, llm_width, cfg.num_latents, cfg.resampler_layers,
                                            cfg.num_heads)
        self.blocks = nn.ModuleList(GatedCrossAttentionBlock(llm_width, cfg.num_heads) for _ in self.layer_indices)
        self._attached = False
        self._hook = None
        if not cfg.resampler_layers and num_tokens <= 0:
            raise ValueError("bridge.resampler_layers=0 (attend to the patch tokens) needs the tower's token count")
        # M: the tokens each image gives the gated blocks (the latents, or the P patch tokens).
        self.num_latents = cfg.num_latents if cfg.resampler_layers else num_tokens
        self._media_mask: Optional[torch.Tensor] = None
        self._latent_mask: Optional[torch.Tensor] = None
        self._last_image: Optional[torch.Tensor] = None  # [B]: the image of each sequence's last token
        self._image_in_cache = False

    multi_image = True  # several images per sequence: latents [B, I*M, d], image after image

    def num_image_tokens(self, num_patches: int) -> int:
        """1: one ``<image>`` id marks where the image is (the media location); it is not replaced."""
        return 1

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """patch_tokens [B,P,w] -> latents [B,M,d]."""
        return self.resampler(patch_tokens.to(self.resampler.proj.weight.dtype))

    @property
    def media_mask(self) -> Optional[torch.Tensor]:
        """attend [B,T] bool of the current LLM call (see ``immediate_media_mask``); None outside one."""
        return self._media_mask

    @property
    def latent_mask(self) -> Optional[torch.Tensor]:
        """allowed [B,T,I*M] bool of the current call with several images per sequence: each token
        attends to the M latents of its image (``text_time``); None with one image."""
        return self._latent_mask

    @contextlib.contextmanager
    def conditioned(self, features: Optional[torch.Tensor]) -> Iterator[None]:
        """As ``Bridge.conditioned``; the media masks and the cached-image state live within the block."""
        saved = (self._media_mask, self._latent_mask, self._last_image, self._image_in_cache)
        self._media_mask, self._latent_mask, self._last_image, self._image_in_cache = None, None, None, False
        try:
            with super().conditioned(features):
                yield
        finally:
            self._media_mask, self._latent_mask, self._last_image, self._image_in_cache = saved

    def _embedding_pre_hook(self, module: nn.Module, args: tuple) -> None:
        input_ids = args[0] if args else None
        if self._features is None or input_ids is None:
            self._media_mask = self._latent_mask = None
            return
        images = max(self._features.shape[1] // self.num_latents, 1)
        self._media_mask = immediate_media_mask(input_ids, self._image_token_id, self._image_in_cache, images)
        self._latent_mask = self._image_latent_mask(input_ids, images) if images > 1 else None
        self._image_in_cache = True

    def _image_latent_mask(self, input_ids: torch.Tensor, images: int) -> torch.Tensor:
        """[B,T,I*M] bool: token t of row b may attend latent s iff s is one of image text_time's M
        latents; a token before any image gets image 1's (its term is then masked to zero), a
        cached decoding step (no ``<image>`` id) the sequence's last image."""
        text_time = (input_ids == self._image_token_id).cumsum(dim=1)  # [B,T]
        if self._last_image is not None and not bool((input_ids == self._image_token_id).any()):
            text_time = self._last_image.unsqueeze(1).expand_as(input_ids)
        self._last_image = text_time[:, -1]
        image_of_latent = torch.arange(images * self.num_latents, device=input_ids.device) // self.num_latents + 1
        return text_time.clamp(min=1).unsqueeze(-1) == image_of_latent

    def attach(self, llm: nn.Module, image_token_id: int) -> None:
        """Wrap decoder layers ``layer_indices`` of ``llm`` in ``GatedDecoderLayer``s and hook its
        input embeddings to read the ``<image>`` (id ``image_token_id``) positions."""
        if self._attached:
            raise RuntimeError("the flamingo bridge is already attached to an LLM")
        if image_token_id < 0:
            raise ValueError("the flamingo bridge needs the <image> token id (the media location)")
        layers = decoder_layers(llm)
        if self.layer_indices and self.layer_indices[-1] >= len(layers):
            raise ValueError(f"the bridge was built for >= {self.layer_indices[-1] + 1} decoder layers, "
                             f"the LLM has {len(layers)}")
        for block, i in zip(self.blocks, self.layer_indices):
            if isinstance(layers[i], GatedDecoderLayer):
                raise RuntimeError(f"decoder layer {i} is already wrapped")
            layers[i] = GatedDecoderLayer(layers[i], block, self)
        self._image_token_id = int(image_token_id)
        self._hook = llm.get_input_embeddings().register_forward_pre_hook(self._embedding_pre_hook)
        self._attached = True

    def detach(self, llm: nn.Module) -> None:
        """Put the original decoder layers back and remove the embedding hook."""
        if not self._attached:
            return
        layers = decoder_layers(llm)
        for i in self.layer_indices:
            if isinstance(layers[i], GatedDecoderLayer):
                layers[i] = layers[i].layer
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._attached = False

    def gates(self) -> torch.Tensor:
        """tanh of the gate parameters [n_blocks, 2] (attention, feed-forward), detached."""
        return torch.tanh(torch.stack([torch.stack([b.attn_gate, b.ff_gate]) for b in self.blocks]).detach())

    def log_terms(self) -> dict[str, torch.Tensor]:
        """``xattn_gate``: mean |tanh(alpha)| over every gate (0 at init: how open the image path is)."""
        return {"xattn_gate": self.gates().abs().mean()} if len(self.blocks) else {}
