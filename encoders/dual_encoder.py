"""The stage-one dual encoder: a vision tower, a text tower, global and local projection heads.

Embeddings (all raw, un-normalised; objectives normalise what they need):

- Image global ``[B,d]``: ``pool`` = "cls" takes the tower's pooled output (CLIP: post-LayerNorm
  CLS; SigLIP: its attention-pooling head; a conv tower has no CLS and refuses it), "mean" averages
  the patch tokens (SPARC: no CLS), "max" takes their channel-wise max, "map" attention-pools them
  with ``heads["image_pool"]``, transformers' ``SiglipMultiheadAttentionPoolingHead`` (SigLIP's MAP
  head: a learned probe, ``model.map_heads`` heads, LayerNorm + MLP of 4w) owned by the encoder, so
  it saves in ``heads.safetensors``. With ``global_mlp`` one Linear+GELU layer (SPARC's non-linear
  layer) precedes the linear projection.
- Text global ``[B,d]``: "cls" takes the last real token (the tokenizer appends ``</s>``, so this is
  CLIP's EOS pooling); every other ``pool`` averages the non-padding tokens ("max" and "map" pool
  the image's patch grid only); then a linear projection.
- Patch / token embeddings ``[B,P,d]`` / ``[B,L,d]``: without ``local_heads`` (the default, and
  the SPARC paper's) the global LINEAR projections g_v, g_t applied per token:
  v_ik = g_v(f_v(x_ik)), t_ij = g_t(f_t(x_ij)). The ``global_mlp`` layer h_v belongs to the global
  vision path only (v̄_i = g_v(h_v(pool f_v(x)))): patches never go through it. For CLIP-like
  encoders this gives a dense embedding in the shared space (as MaskCLIP-style dense evaluation).
  With ``local_heads`` separate linear adapters instead (an ablation).
- ``token_mask`` ``[B,L]`` is True on word tokens only: padding and the tokenizer's special
  tokens (``<s>``, ``</s>``) are excluded, because SPARC aligns words with patches.

The text tower is a stock ``CLIPTextModel`` (causal attention, right padding). Checkpoint layout
written by ``save_pretrained(dir)``: ``dir/vision`` (the stock tower: ``CLIPVisionModel``,
``SiglipVisionModel``, ``ResNetModel`` or ``ConvNextModel``, plus ``preprocessor_config.json``),
``dir/text``, ``dir/tokenizer``, ``dir/heads.safetensors``, ``dir/encoder.yaml``. No pickle
anywhere.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerBase, SiglipVisionConfig
from transformers.models.siglip.modeling_siglip import SiglipMultiheadAttentionPoolingHead

from encoders.features import ImageFeatures, TextFeatures
from encoders.towers import (ImageTransform, VisionTower, build_vision_tower, default_transform, is_conv_tower,
                             load_vision_tower, pool_patch_grid, tower_forward, tower_width)
from vlm.config import ConfigError, EncoderConfig, config_from_yaml_text, save_config
from vlm.data.tokenizer import load_tokenizer
from vlm.files import atomic_path, loading_weights, read_json

HEADS_FILE = "heads.safetensors"
CONFIG_FILE = "encoder.yaml"


def build_text_tower(cfg: EncoderConfig, tokenizer: PreTrainedTokenizerBase) -> CLIPTextModel:
    """A randomly initialised ``CLIPTextModel`` sized by ``cfg.text`` with the tokenizer's ids,
    or, with ``cfg.text.pretrained``, the one loaded from that directory (``dir/text`` or ``dir``)."""
    t = cfg.text
    if t.pretrained:
        return load_text_tower(t.pretrained)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if getattr(tokenizer, name) is None:
            raise ValueError(f"the tokenizer has no {name[:-9]} token; the text tower needs pad, bos and eos")
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=t.hidden_size,
                            intermediate_size=4 * t.hidden_size, num_hidden_layers=t.num_layers,
                            num_attention_heads=t.num_heads, max_position_embeddings=t.max_len,
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, projection_dim=cfg.embed_dim)
    config._attn_implementation = "sdpa"
    return CLIPTextModel(config)


def load_text_tower(path: Union[str, Path]) -> CLIPTextModel:
    """Load a ``CLIPTextModel`` from ``path/text`` (our checkpoints) or ``path`` (a local HF CLIP dir)."""
    path = Path(path)
    directory = path / "text" if (path / "text" / "config.json").is_file() else path
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json here or in {path / 'text'}")
    model_type = read_json(directory / "config.json", "model config").get("model_type", "")
    if model_type not in ("clip", "clip_text_model"):
        raise ValueError(f"{directory}: model_type {model_type!r} is not a CLIP text model")
    with loading_weights(directory, "text tower"):
        return CLIPTextModel.from_pretrained(str(directory), attn_implementation="sdpa", use_safetensors=True)


def map_pooling_head(width: int, num_heads: int) -> SiglipMultiheadAttentionPoolingHead:
    """SigLIP's attention-pooling (MAP) head for tokens of width w: [B,P,w] -> [B,w] (a learned
    probe attends over the tokens with ``num_heads`` heads, then LayerNorm and a 4w MLP, residual)."""
    if width % num_heads:
        raise ConfigError(f"model.map_heads: {num_heads} heads do not divide the vision width {width}")
    config = SiglipVisionConfig(hidden_size=width, num_attention_heads=num_heads, intermediate_size=4 * width)
    return SiglipMultiheadAttentionPoolingHead(config)


def tokenize_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                   max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """texts (N) -> (input_ids [N,L], attention_mask [N,L]): right-padded to the longest text,
    truncated at ``max_len`` tokens (specials included)."""
    if isinstance(texts, str) or not len(texts) or not all(isinstance(t, str) for t in texts):
        raise TypeError("tokenize expects a non-empty list of strings")
    tokenizer.padding_side = "right"
    enc = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


class DualEncoder(nn.Module):
    """Vision tower + text tower + projection heads (see the module docstring).

    ``DualEncoder(cfg, tokenizer)`` builds (or loads, per ``cfg.*.pretrained``) both towers;
    ``vision`` / ``text`` / ``transform`` override them (used by ``from_pretrained``). ``cfg`` must
    set ``pool``, ``global_mlp`` and ``local_heads`` (``Stage1Config`` fills them from the objective).
    Attributes: ``.vision``, ``.text``, ``.heads``, ``.tokenizer``, ``.transform``, ``.cfg``.
    """

    def __init__(self, cfg: EncoderConfig, tokenizer: PreTrainedTokenizerBase, vision: Optional[VisionTower] = None,
                 text: Optional[CLIPTextModel] = None, transform: Optional[ImageTransform] = None) -> None:
        super().__init__()
        if cfg.unset():
            raise ConfigError(f"{', '.join(cfg.unset())}: unset; the DualEncoder needs them (a Stage1Config "
                              "sets them from its objective)")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"  # the causal text tower and last-token pooling need it
        if vision is None and cfg.vision.pretrained:
            vision, loaded_transform = load_vision_tower(cfg.vision.pretrained)
            transform = transform or loaded_transform
        self.vision = vision if vision is not None else build_vision_tower(cfg.vision)
        self.text = text if text is not None else build_text_tower(cfg, tokenizer)
        self.transform = transform or default_transform(self.vision)
        w, wt, d = tower_width(self.vision), int(self.text.config.hidden_size), cfg.embed_dim
        # image_global = [h_v (Linear+GELU, with global_mlp)] + g_v (the last Linear, shared with the
        # patches unless local_heads); the state-dict keys are those of earlier checkpoints.
        heads = {
            "image_global": nn.Sequential(*([nn.Linear(w, w), nn.GELU()] if cfg.global_mlp else []),
                                          nn.Linear(w, d, bias=False)),
            "text_global": nn.Linear(wt, d, bias=False),
        }
        if cfg.pool == "cls" and is_conv_tower(self.vision):
            raise ConfigError(f"model.pool: 'cls' with a {type(self.vision).__name__} tower, which has no CLS token; "
                              "set model.pool to mean, max or map")
        if cfg.pool == "map":
            heads["image_pool"] = map_pooling_head(w, cfg.map_heads)
        if cfg.local_heads:
            heads["image_local"] = nn.Linear(w, d)
            heads["text_local"] = nn.Linear(wt, d)
        self.heads = nn.ModuleDict(heads)
        self._special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)

    @property
    def vision_width(self) -> int:
        return tower_width(self.vision)

    def tokenize(self, texts: Sequence[str], max_len: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """texts (N) -> (input_ids [N,L], attention_mask [N,L]): right-padded to the longest, truncated
        at ``max_len`` (default ``cfg.text.max_len``; never beyond the tower's positions)."""
        return tokenize_texts(self.tokenizer, texts, min(max_len or self.cfg.text.max_len, self.max_text_len))

    @property
    def max_text_len(self) -> int:
        """Most tokens the text tower takes (its position table)."""
        return int(self.text.config.max_position_embeddings)

    def encode_image(self, pixel_values: torch.Tensor) -> ImageFeatures:
        """pixel_values [B,3,H,W] -> ImageFeatures(global_emb [B,d], patch_emb [B,P,d], patch_tokens [B,P,w])."""
        patches, pooled = tower_forward(self.vision, pixel_values)
        global_emb = self.heads["image_global"](self.pool_image(patches, pooled))  # g_v(h_v(pool))
        return ImageFeatures(global_emb=global_emb, patch_emb=self.image_local_head(patches), patch_tokens=patches)

    def pool_image(self, patches: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """The ``pool`` of patch tokens [B,P,w] (or the tower's own pooled output [B,w] for "cls") -> [B,w]."""
        if self.cfg.pool == "cls":
            return pooled
        if self.cfg.pool in ("mean", "max"):
            return pool_patch_grid(patches, self.cfg.pool)
        return self.heads["image_pool"](patches)

    @property
    def unused_tower_head(self) -> bool:
        """True when the tower has a pooling head (SigLIP's) that ``pool`` != "cls" never reads: its
        parameters get no gradient, so DDP must look for unused parameters."""
        core = getattr(self.vision, "vision_model", self.vision)  # transformers 5 flattened the ViTs
        return self.cfg.pool != "cls" and getattr(core, "head", None) is not None

    @property
    def image_local_head(self) -> nn.Module:
        """The patch projection: ``heads["image_local"]`` with ``local_heads``, else g_v, the global
        path's final Linear, WITHOUT the ``global_mlp`` layer h_v (v_ik = g_v(f_v(x_ik)), SPARC)."""
        return self.heads["image_local"] if self.cfg.local_heads else self.heads["image_global"][-1]

    @property
    def text_local_head(self) -> nn.Module:
        """The token projection: ``heads["text_local"]`` with ``local_heads``, else g_t (t_ij = g_t(f_t(x_ij)))."""
        return self.heads["text_local"] if self.cfg.local_heads else self.heads["text_global"]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TextFeatures:
        """input_ids, attention_mask [B,L] -> TextFeatures(global_emb [B,d], token_emb [B,L,d],
        token_mask [B,L] bool: word tokens only, no padding / special tokens)."""
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(f"input_ids and attention_mask must both be [B,L], got {tuple(input_ids.shape)} "
                             f"and {tuple(attention_mask.shape)}")
        if bool((attention_mask.sum(dim=1) == 0).any()):
            raise ValueError("a caption has no tokens (attention_mask row of zeros)")
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B,L,wt]
        mask = attention_mask.bool()
        if self.cfg.pool != "cls":
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(dim=1) / m.sum(dim=1)
        else:
            last = attention_mask.long().sum(dim=1) - 1
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        global_emb = self.heads["text_global"](pooled)
        special = torch.isin(input_ids, self._special_ids.to(input_ids.device))
        return TextFeatures(global_emb=global_emb, token_emb=self.text_local_head(hidden), token_mask=mask & ~special)

    def encode_texts(self, texts: Sequence[str], max_len: Optional[int] = None) -> TextFeatures:
        """Convenience: tokenize on the model's device, then ``encode_text``."""
        ids, mask = self.tokenize(texts, max_len)
        device = next(self.parameters()).device
        return self.encode_text(ids.to(device), mask.to(device))

    def save_pretrained(self, directory: Union[str, Path]) -> Path:
        """Write the checkpoint layout of the module docstring to ``directory``; returns it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.vision.save_pretrained(str(directory / "vision"))
        self.transform.save_pretrained(directory / "vision")
        self.text.save_pretrained(str(directory / "text"))
        self.tokenizer.save_pretrained(str(directory / "tokenizer"))
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.heads.state_dict().items()}
        with atomic_path(directory / HEADS_FILE) as tmp:
            save_file(tensors, str(tmp))
        save_config(self.cfg, directory / CONFIG_FILE)
        return directory

    @classmethod
    def from_pretrained(cls, directory: Union[str, Path]) -> "DualEncoder":
        """Reassemble a ``DualEncoder`` written by ``save_pretrained`` (no pickle, no remote code)."""
        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{directory}: no {CONFIG_FILE}; not a DualEncoder checkpoint")
        cfg = config_from_yaml_text(EncoderConfig, (directory / CONFIG_FILE).read_text())
        vision, transform = load_vision_tower(directory / "vision")
        text = load_text_tower(directory / "text")
        model = cls(cfg, load_tokenizer(directory / "tokenizer"), vision=vision, text=text, transform=transform)
        model.heads.load_state_dict(load_file(str(directory / HEADS_FILE)), strict=True)
        return model
