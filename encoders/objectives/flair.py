"""FLAIR (Xiao et al., CVPR 2025): text-conditioned attention pooling (../shared/METHODS.md, "FLAIR").

Data contract. Every sample carries its caption and K sub-captions sampled from its long caption
(``FlairObjective.captions_for`` returns ``[caption, sub_1, ..., sub_K]``). The stage-one model
encodes the caption as usual (``txt``) and the sub-captions ``batch["sub_input_ids"]`` /
``batch["sub_attention_mask"]`` [B, K, L], flattened to [B*K, L] image-major (sub-caption k of
image i is row i*K + k), and passes the result as ``batch["sub_text"]``: a ``TextFeatures`` whose
``global_emb`` is [B*K, d]. The loss uses only the sub-captions (as METHODS and the reference);
the caption is not part of it.

Negatives of the text-conditioned loss: for image i and every other image j of the (global)
batch, one of j's K sub-captions, index ``neg_index[i, j]``. ``batch["flair_neg_index"]``
([B, N*B] long) fixes them; otherwise they are drawn uniformly with torch's global RNG, as the
reference does.

Normalisation follows METHODS: L_tcs is averaged over images (the reference sums over images),
L_mps is divided by B*K (as the reference).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from encoders.features import ImageFeatures, TextFeatures
from encoders.objectives.base import LogScale, Objective, ObjectiveConfig, full_precision, no_autocast, require
from encoders.objectives.gather import gather_features, local_offset

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass
class FlairConfig(ObjectiveConfig):
    """``objective.*`` of FLAIR. Encoder as the reference: CLS / EOS global embeddings, linear
    projections, no local heads (the pooling reads the tower's patch tokens; inherited
    ``encoder_defaults``)."""

    name: str = "flair"
    num_subcaptions: int = 8  # K per image
    max_merge: int = 3  # sentences merged per sub-caption
    num_heads: int = 8  # of the text-conditioned pooling
    init_scale: float = 14.285714285714286  # t at init: 1/0.07
    init_bias: float = -10.0  # b at init

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.num_subcaptions >= 1, "objective.num_subcaptions", "must be >= 1")
        for key in ("max_merge", "num_heads", "init_scale"):
            require(getattr(self, key) > 0, f"objective.{key}", f"must be > 0, got {getattr(self, key)}")


def split_sentences(text: str) -> list[str]:
    """Split a long caption into sentences on '.', '!' or '?' followed by whitespace."""
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def sample_subcaptions(long_caption: str, k: int, max_merge: int, rng: random.Random) -> list[str]:
    """K sub-captions of a long caption, each merging 1..max_merge of its sentences.

    Even-numbered sub-captions take a run of consecutive sentences, odd-numbered ones a random
    subset (kept in caption order), so half are consecutive and half random. Deterministic for a
    given ``rng`` state. -> list of K strings.
    """
    if k < 1 or max_merge < 1:
        raise ValueError(f"k and max_merge must be >= 1, got k={k}, max_merge={max_merge}")
    sentences = split_sentences(long_caption)
    if not sentences:
        raise ValueError("cannot sample sub-captions from an empty caption")
    out = []
    for i in range(k):
        n = rng.randint(1, min(max_merge, len(sentences)))
        if i % 2 == 0:
            start = rng.randint(0, len(sentences) - n)
            picked = sentences[start:start + n]
        else:
            picked = [sentences[j] for j in sorted(rng.sample(range(len(sentences)), n))]
        out.append(" ".join(picked))
    return out


class TextConditionedPooling(nn.Module):
    """Attention pooling of an image's patch tokens, queried by text embeddings (FLAIR).

    Multi-head attention (``num_heads``) with query = the projected global text embedding
    (width d) and keys / values = the vision tower's patch tokens (width w), a LayerNorm on each
    of q, k and v and a zero attention slot, as the reference. ``forward(text_emb [B,T,d],
    patch_tokens [B,P,w]) -> [B,T,d]``: image b pooled once for each of its T texts.
    """

    def __init__(self, embed_dim: int, token_width: int, num_heads: int = 8) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.ln_q = nn.LayerNorm(embed_dim)
        self.ln_k = nn.LayerNorm(token_width)
        self.ln_v = nn.LayerNorm(token_width)
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, kdim=token_width, vdim=token_width,
                                          batch_first=True, add_zero_attn=True)

    def forward(self, text_emb: torch.Tensor, patch_tokens: torch.Tensor) -> torch.Tensor:
        if text_emb.dim() != 3 or patch_tokens.dim() != 3 or text_emb.shape[0] != patch_tokens.shape[0]:
            raise ValueError(f"expected text_emb [B,T,d] and patch_tokens [B,P,w], got "
                             f"{tuple(text_emb.shape)} and {tuple(patch_tokens.shape)}")
        q, k, v = self.ln_q(text_emb), self.ln_k(patch_tokens), self.ln_v(patch_tokens)
        return self.attn(q, k, v, need_weights=False)[0]


def _check_sub(sub_text_emb: torch.Tensor, batch: int) -> None:
    if sub_text_emb.dim() != 3 or sub_text_emb.shape[0] != batch:
        raise ValueError(f"sub_text_emb must be [B={batch}, K, d], got {tuple(sub_text_emb.shape)}")


def flair_tcs_loss(patch_tokens: torch.Tensor, sub_text_emb: torch.Tensor, pooling: nn.Module,
                   logit_scale: Union[torch.Tensor, float], logit_bias: Union[torch.Tensor, float],
                   neg_index: Optional[torch.Tensor] = None, gather: bool = True,
                   gather_with_grad: bool = True) -> torch.Tensor:
    """Text-conditioned sigmoid loss. patch_tokens [B,P,w], sub_text_emb [B,K,d] raw -> scalar.

    Image i is scored against its K sub-captions (z = +1) and one sub-caption of each other image
    j of the global batch (index neg_index[i, j], neg_index [B, N*B] long; z = -1): T = N*B + K - 1
    texts, each with image i pooled for it, v_{i|j} = pooling(t_j, patches_i). Per image
    -(1/T) sum_j log sigmoid(z_ij (t <v_{i|j}, t_j> + b)) (normalised vectors), averaged over images.
    """
    _check_sub(sub_text_emb, patch_tokens.shape[0])
    batch, num_sub, dim = sub_text_emb.shape
    all_sub = gather_features(sub_text_emb, gather_with_grad) if gather else sub_text_emb  # [Bt,K,d]
    total = all_sub.shape[0]
    own = torch.arange(batch, device=sub_text_emb.device) + (local_offset(batch) if gather else 0)
    if neg_index is None:
        neg_index = torch.randint(0, num_sub, (batch, total), device=sub_text_emb.device)
    if neg_index.shape != (batch, total):
        raise ValueError(f"neg_index must be [B, N*B] = [{batch}, {total}], got {tuple(neg_index.shape)}")
    if bool(((neg_index < 0) | (neg_index >= num_sub)).any()):
        raise ValueError(f"neg_index values must be in [0, K={num_sub})")
    cols = torch.arange(total, device=sub_text_emb.device)
    negatives = all_sub[cols.expand(batch, total), neg_index.to(sub_text_emb.device)]  # [B,Bt,d]
    others = cols[None, :] != own[:, None]
    negatives = negatives[others].view(batch, total - 1, dim)
    texts = torch.cat([sub_text_emb, negatives], dim=1)                                 # [B,T,d]
    pooled = pooling(texts, patch_tokens)                                               # [B,T,d]
    logits = logit_scale * (F.normalize(pooled, dim=-1) * F.normalize(texts, dim=-1)).sum(-1) + logit_bias
    z = torch.full_like(logits, -1.0)
    z[:, :num_sub] = 1.0
    return -F.logsigmoid(z * logits).mean(dim=1).mean()


def flair_mps_loss(image_emb: torch.Tensor, sub_text_emb: torch.Tensor,
                   logit_scale: Union[torch.Tensor, float], logit_bias: Union[torch.Tensor, float],
                   gather: bool = True, gather_with_grad: bool = True) -> torch.Tensor:
    """Multi-positive sigmoid loss. image_emb [B,d], sub_text_emb [B,K,d] raw -> scalar.

    Each global image embedding against all B*K sub-captions (its own K are positives):
    -(1/(B*K)) sum_{i,c} log sigmoid(z_ic (t <v_i, t_c> + b)). Distributed: local rows against
    all N*B*K captions, divided by the local B*K.
    """
    _check_sub(sub_text_emb, image_emb.shape[0])
    batch, num_sub, dim = sub_text_emb.shape
    image_emb = F.normalize(image_emb, dim=-1)
    texts = F.normalize(sub_text_emb, dim=-1).reshape(batch * num_sub, dim)
    all_texts = gather_features(texts, gather_with_grad) if gather else texts              # [Bt*K,d]
    logits = logit_scale * image_emb @ all_texts.T + logit_bias                            # [B,Bt*K]
    owner = torch.arange(all_texts.shape[0], device=logits.device) // num_sub
    own = torch.arange(batch, device=logits.device) + (local_offset(batch) if gather else 0)
    z = torch.where(owner[None, :] == own[:, None], 1.0, -1.0).to(logits.dtype)
    return -F.logsigmoid(z * logits).sum() / (batch * num_sub)


def flair_loss(image_emb: torch.Tensor, patch_tokens: torch.Tensor, sub_text_emb: torch.Tensor,
               pooling: nn.Module, logit_scale: Union[torch.Tensor, float],
               logit_bias: Union[torch.Tensor, float], neg_index: Optional[torch.Tensor] = None,
               gather_with_grad: bool = True) -> dict[str, torch.Tensor]:
    """FLAIR total (L_tcs + L_mps) / 2. image_emb [B,d], patch_tokens [B,P,w], sub_text_emb [B,K,d].

    Returns {"loss", "loss_tcs", "loss_mps"}; the same t and b serve both terms.
    """
    tcs = flair_tcs_loss(patch_tokens, sub_text_emb, pooling, logit_scale, logit_bias, neg_index,
                         gather_with_grad=gather_with_grad)
    mps = flair_mps_loss(image_emb, sub_text_emb, logit_scale, logit_bias, gather_with_grad=gather_with_grad)
    return {"loss": (tcs + mps) / 2, "loss_tcs": tcs, "loss_mps": mps}


class FlairObjective(Objective):
    """FLAIR objective: scale t (init 1/0.07, clamped at max_logit_scale), bias b, the pooling.

    ``forward(img, txt, batch) -> {"loss", "loss_tcs", "loss_mps", "logit_scale", "logit_bias"}``
    with ``batch["sub_text"]`` a TextFeatures of the K sub-captions per image, global_emb
    [B*K, d] image-major (see the module docstring); uses ``img.global_emb`` and
    ``img.patch_tokens`` [B,P,w].
    """

    config_class = FlairConfig

    def __init__(self, cfg: FlairConfig, embed_dim: int, vision_width: int) -> None:
        super().__init__(cfg, embed_dim, vision_width)
        self.logit_scale = LogScale(cfg.init_scale, cfg.max_logit_scale)
        self.logit_bias = nn.Parameter(torch.tensor(float(cfg.init_bias)))
        self.pooling = TextConditionedPooling(embed_dim, vision_width, cfg.num_heads)

    @classmethod
    def captions_for(cls, cfg: FlairConfig, caption: str, long_caption: Optional[str] = None,
                     rng: Optional[random.Random] = None) -> list[str]:
        """``[caption, sub_1, ..., sub_K]``: K sub-captions of ``long_caption`` (else of ``caption``)."""
        if rng is None:
            raise ValueError("FLAIR samples sub-captions: pass a seeded random.Random as rng")
        source = long_caption if long_caption else caption
        return [caption, *sample_subcaptions(source, cfg.num_subcaptions, cfg.max_merge, rng)]

    def forward(self, img: ImageFeatures, txt: TextFeatures, batch: dict) -> dict:
        sub = batch.get("sub_text")
        if not isinstance(sub, TextFeatures):
            raise KeyError('FLAIR needs batch["sub_text"]: TextFeatures of the sub-captions, global_emb [B*K, d]')
        num_images, num_sub = img.global_emb.shape[0], self.cfg.num_subcaptions
        if sub.global_emb.shape[0] != num_images * num_sub:
            raise ValueError(f'batch["sub_text"].global_emb has {sub.global_emb.shape[0]} rows, expected '
                             f"B*K = {num_images}*{num_sub}")
        sub_emb = full_precision(sub.global_emb).reshape(num_images, num_sub, -1)
        with no_autocast(img.global_emb.device):
            scale = self.logit_scale()
            out = flair_loss(full_precision(img.global_emb), full_precision(img.patch_tokens), sub_emb,
                             self.pooling, scale, self.logit_bias, batch.get("flair_neg_index"),
                             self.cfg.gather_with_grad)
        out.update(logit_scale=scale.detach(), logit_bias=self.logit_bias.detach())
        return out
