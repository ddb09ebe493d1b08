"""FLAIR (Xiao et al., CVPR 2025): text-conditioned attention pooling (../shared/METHODS.md, "FLAIR").

Checked against the reference code (ExplainableML/flair): src/flair/loss.py (``FlairLoss``,
``downsample_text_features``), transformer.py (``PureAttentionPoolingBlock``), model.py
(``FLAIR.forward``: ``image_post`` projects both the global token and the patch tokens) and
data.py (``sample_dict``, ``split_caption``, ``random_sample_from_list``).

Data contract. Every sample carries K sub-captions sampled from the sentences of its caption and
long caption together (``caption_pool``: the reference pools the raw caption with the short and
long synthetic captions; ``FlairObjective.captions_for`` returns ``[caption, sub_1, ..., sub_K]``;
the caption itself is not part of any loss, as in the reference). ``training.stage1.stage1_collate``
therefore sends only the sub-captions through the text tower: ``input_ids`` / ``attention_mask``
are [B*K, L], image-major (sub-caption k of image i is row i*K + k), so ``txt.global_emb`` is
[B*K, d]. A batch may instead carry ``batch["sub_text"]`` (``Stage1Model`` encodes
``sub_input_ids`` [B,K,L] there); it is then used and ``txt`` is ignored.

Keys / values of the pooling are ``img.patch_emb``: the patch tokens after the tower's final norm
and the global image projection (the ``DualEncoder`` applies the global head per patch when there
are no separate local heads, which ``Stage1Config`` refuses for FLAIR), i.e. the reference's
``image_post(local_image_tokens)`` in the joint space of width D.

Negatives of the text-conditioned loss: for image i and every other image j of this rank's batch,
one of j's K sub-captions (the reference's ``random_offsets``), ``neg_index[i, m]`` for the m-th
other image (j != i in increasing order), [B, B-1] long. ``batch["flair_neg_index"]`` fixes them;
otherwise they are drawn uniformly with torch's global RNG, as the reference does. With several
ranks every rank's [B, B+K-1] rows of texts are gathered and image i of a rank is also pooled with
row i of every other rank, all negatives (the reference's neighbour exchange, here through
``gather_features``).

Normalisation as the reference: L_tcs is summed over the images and divided by the texts per
image B+K-1 (each other rank's chunk the same), L_mps is divided by B*K.
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
from encoders.objectives.gather import gather_features, local_offset, world_info

_SENTENCE_SPLIT = re.compile(r"\n|</s>|[.]")  # the reference's split_caption


@dataclass
class FlairConfig(ObjectiveConfig):
    """``objective.*`` of FLAIR. Encoder as the reference: CLS / EOS global embeddings, linear
    projections, no local heads: the pooling reads ``patch_emb``, the global image projection
    applied per patch (inherited ``encoder_defaults``; separate local heads would give the pooling
    another projection than the reference's shared ``image_post``)."""

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
    """Sentences of a long caption as the reference's ``split_caption``: split on '.', newlines and
    '</s>', stripped, empty pieces dropped (the periods are removed; ``'. '`` joins them again)."""
    return [s.strip() for s in _SENTENCE_SPLIT.split(text) if s.strip()]


def caption_pool(caption: str, long_caption: Optional[str] = None) -> list[str]:
    """The sentences a sample's sub-captions are drawn from: the caption's, then the long caption's.

    As the reference's ``sample_dict`` on its main data (DreamLIP-recaptioned CC3M/CC12M/YFCC,
    ``pixelprose=False``): ``raw_caption + shortIB + longIB + ...``, each a list of sentences, so the
    short captions are drawn as often as any sentence of the long ones. -> list of sentences."""
    return split_sentences(caption) + (split_sentences(long_caption) if long_caption else [])


def sample_subcaptions(long_caption: Union[str, list[str]], k: int, max_merge: int, rng: random.Random) -> list[str]:
    """K sub-captions of a long caption (or of a list of sentences, e.g. ``caption_pool``), as the
    reference's ``sample_dict`` (diverse sampling).

    For each: m = randint(1, max_merge) sentences. m = 1: one random sentence. Otherwise a coin
    flip (``rng.random() < 0.5``): consecutive sentences (``random_sample_from_list``: all of them
    joined when m >= n, else a window starting at one of 0..n-m-1, the reference's
    ``draw_numbers(n - m, 1)``), or m random sentences in sampled order (``random.sample`` without
    replacement when n >= m, else m draws with replacement). Joined with '. '. Deterministic for a
    given ``rng`` state (the reference's calls, in its order, on ``rng``). -> list of K strings.
    """
    if k < 1 or max_merge < 1:
        raise ValueError(f"k and max_merge must be >= 1, got k={k}, max_merge={max_merge}")
    sentences = split_sentences(long_caption) if isinstance(long_caption, str) else list(long_caption)
    if not sentences:
        raise ValueError("cannot sample sub-captions from an empty caption")
    n = len(sentences)
    out = []
    for _ in range(k):
        m = rng.randint(1, max_merge)
        if m == 1:
            out.append(rng.choice(sentences))
        elif rng.random() < 0.5:  # consecutive sentences
            if m >= n:
                out.append(". ".join(sentences))
            else:
                start = rng.sample(range(n - m), 1)[0]
                out.append(". ".join(sentences[start:start + m]))
        else:  # random sentences, unordered
            picked = rng.sample(sentences, m) if n >= m else [rng.choice(sentences) for _ in range(m)]
            out.append(". ".join(picked))
    return out


class TextConditionedPooling(nn.Module):
    """Attention pooling of an image's patch embeddings, queried by text embeddings (FLAIR).

    The reference's ``PureAttentionPoolingBlock``: ``nn.MultiheadAttention(D, num_heads,
    add_zero_attn=True)`` with a LayerNorm on each of q, k and v, everything in the joint space of
    width D. ``forward(text_emb [B,T,D], patch_emb [B,P,D]) -> [B,T,D]``: image b pooled once for
    each of its T texts.
    """

    def __init__(self, embed_dim: int, num_heads: int = 8) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.ln_q = nn.LayerNorm(embed_dim)
        self.ln_k = nn.LayerNorm(embed_dim)
        self.ln_v = nn.LayerNorm(embed_dim)
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, kdim=embed_dim, vdim=embed_dim,
                                          batch_first=True, add_zero_attn=True)

    def forward(self, text_emb: torch.Tensor, patch_emb: torch.Tensor) -> torch.Tensor:
        if text_emb.dim() != 3 or patch_emb.dim() != 3 or text_emb.shape[0] != patch_emb.shape[0]:
            raise ValueError(f"expected text_emb [B,T,D] and patch_emb [B,P,D], got "
                             f"{tuple(text_emb.shape)} and {tuple(patch_emb.shape)}")
        q, k, v = self.ln_q(text_emb), self.ln_k(patch_emb), self.ln_v(patch_emb)
        return self.attn(q, k, v, need_weights=False)[0]


def _check_sub(sub_text_emb: torch.Tensor, batch: int) -> None:
    if sub_text_emb.dim() != 3 or sub_text_emb.shape[0] != batch:
        raise ValueError(f"sub_text_emb must be [B={batch}, K, d], got {tuple(sub_text_emb.shape)}")


def draw_negatives(batch: int, num_sub: int, device: torch.device) -> torch.Tensor:
    """neg_index [B, B-1] long: for each image, one of the K sub-captions of every other image,
    uniform, from torch's global RNG (the reference's ``random_offsets``)."""
    return torch.randint(0, num_sub, (batch, batch - 1), device=device)


def sampled_texts(sub_text_emb: torch.Tensor, neg_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Image i's K own sub-captions then one of every other image's: [B,K,d] -> [B, K+B-1, d].

    neg_index [B, B-1] long: the sub-caption of the m-th other image (j != i, increasing), drawn
    uniformly when None (the reference's ``downsample_text_features``; it sorts the columns, which
    changes no loss value).
    """
    batch, num_sub, dim = sub_text_emb.shape
    device = sub_text_emb.device
    if neg_index is None:
        neg_index = draw_negatives(batch, num_sub, device)
    neg_index = neg_index.to(device)
    if neg_index.shape != (batch, batch - 1):
        raise ValueError(f"neg_index must be [B, B-1] = [{batch}, {batch - 1}], got {tuple(neg_index.shape)}")
    if bool(((neg_index < 0) | (neg_index >= num_sub)).any()):
        raise ValueError(f"neg_index values must be in [0, K={num_sub})")
    idx = torch.arange(batch, device=device)
    others = idx.expand(batch, batch)[idx[:, None] != idx[None, :]].view(batch, batch - 1)   # [B,B-1]
    negatives = sub_text_emb[others, neg_index]                                            # [B,B-1,d]
    return torch.cat([sub_text_emb, negatives], dim=1)


def flair_tcs_loss(patch_emb: torch.Tensor, sub_text_emb: torch.Tensor, pooling: nn.Module,
                   logit_scale: Union[torch.Tensor, float], logit_bias: Union[torch.Tensor, float],
                   neg_index: Optional[torch.Tensor] = None, gather: bool = True,
                   gather_with_grad: bool = True) -> torch.Tensor:
    """Text-conditioned sigmoid loss. patch_emb [B,P,D], sub_text_emb [B,K,D] raw -> scalar.

    Image i is scored against its K sub-captions (z = +1) and one sub-caption of each other image
    of this rank (``neg_index`` [B, B-1], see ``sampled_texts``; z = -1): T = B + K - 1 texts, each
    with image i pooled for it, v_{i|j} = pooling(t_j, patches_i). Loss
    -(1/T) sum_i sum_j log sigmoid(z_ij (t <v_{i|j}, t_j> + b)) (normalised vectors), as the
    reference's ``-logsigmoid(labels * logits).sum() / text_features.shape[1]``. With N ranks
    every rank's [B, T, D] texts are gathered and row i of each other rank is added for image i,
    all negatives, each chunk also divided by T (the reference's ``negative_only`` chunks).
    """
    _check_sub(sub_text_emb, patch_emb.shape[0])
    batch, num_sub, dim = sub_text_emb.shape
    texts = sampled_texts(sub_text_emb, neg_index)                                       # [B,T,D]
    per_image = texts.shape[1]
    rank, world = world_info() if gather else (0, 1)
    if world > 1:
        chunks = gather_features(texts, gather_with_grad).view(world, batch, per_image, dim)
        others = torch.cat([chunks[:rank], chunks[rank + 1:]], dim=0)                     # [N-1,B,T,D]
        texts = torch.cat([texts, others.permute(1, 0, 2, 3).reshape(batch, -1, dim)], dim=1)
    pooled = pooling(texts, patch_emb)                                                   # [B,N*T,D]
    logits = logit_scale * (F.normalize(pooled, dim=-1) * F.normalize(texts, dim=-1)).sum(-1) + logit_bias
    z = torch.full_like(logits, -1.0)
    z[:, :num_sub] = 1.0
    return -F.logsigmoid(z * logits).sum() / per_image


def flair_mps_loss(image_emb: torch.Tensor, sub_text_emb: torch.Tensor,
                   logit_scale: Union[torch.Tensor, float], logit_bias: Union[torch.Tensor, float],
                   gather: bool = True, gather_with_grad: bool = True) -> torch.Tensor:
    """Multi-positive sigmoid loss. image_emb [B,d], sub_text_emb [B,K,d] raw -> scalar.

    Each global image embedding against all B*K sub-captions (its own K are positives):
    -(1/(B*K)) sum_{i,c} log sigmoid(z_ic (t <v_i, t_c> + b)). Distributed: local rows against
    all N*B*K captions, divided by the local B*K (the reference adds the other ranks' captions as
    negative-only chunks, each divided by B*K: the same sum).
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


def flair_loss(image_emb: torch.Tensor, patch_emb: torch.Tensor, sub_text_emb: torch.Tensor,
               pooling: nn.Module, logit_scale: Union[torch.Tensor, float],
               logit_bias: Union[torch.Tensor, float], neg_index: Optional[torch.Tensor] = None,
               gather_with_grad: bool = True) -> dict[str, torch.Tensor]:
    """FLAIR total (L_tcs + L_mps) / 2. image_emb [B,D], patch_emb [B,P,D], sub_text_emb [B,K,D].

    Returns {"loss", "loss_tcs", "loss_mps"}; the same t and b serve both terms.
    """
    tcs = flair_tcs_loss(patch_emb, sub_text_emb, pooling, logit_scale, logit_bias, neg_index,
                         gather_with_grad=gather_with_grad)
    mps = flair_mps_loss(image_emb, sub_text_emb, logit_scale, logit_bias, gather_with_grad=gather_with_grad)
    return {"loss": (tcs + mps) / 2, "loss_tcs": tcs, "loss_mps": mps}


@torch.no_grad()
def conditioned_similarity(pooling: nn.Module, patch_emb: torch.Tensor, text_emb: torch.Tensor,
                           chunk: int = 256) -> torch.Tensor:
    """Eval score of every (image, text) pair: cos(v_{i|t}, t), the reference's
    ``--inference-with-flair``. patch_emb [N,P,D], text_emb [M,D] -> [N,M] (texts in chunks)."""
    out = []
    for start in range(0, text_emb.shape[0], chunk):
        t = text_emb[start:start + chunk]
        queries = t.unsqueeze(0).expand(patch_emb.shape[0], -1, -1)
        pooled = pooling(queries, patch_emb)                                               # [N,c,D]
        out.append((F.normalize(pooled, dim=-1) * F.normalize(t, dim=-1).unsqueeze(0)).sum(-1))
    return torch.cat(out, dim=1)


class FlairObjective(Objective):
    """FLAIR objective: scale t (init 1/0.07, clamped at max_logit_scale), bias b, the pooling.

    ``forward(img, txt, batch) -> {"loss", "loss_tcs", "loss_mps", "logit_scale", "logit_bias"}``
    with the K sub-captions per image as ``txt`` (global_emb [B*K, D], image-major) or
    ``batch["sub_text"]`` (see the module docstring); uses ``img.global_emb`` and
    ``img.patch_emb`` [B,P,D].
    """

    config_class = FlairConfig

    def __init__(self, cfg: FlairConfig, embed_dim: int, vision_width: int) -> None:
        super().__init__(cfg, embed_dim, vision_width)
        self.logit_scale = LogScale(cfg.init_scale, cfg.max_logit_scale)
        self.logit_bias = nn.Parameter(torch.tensor(float(cfg.init_bias)))
        self.pooling = TextConditionedPooling(embed_dim, cfg.num_heads)

    @classmethod
    def captions_for(cls, cfg: FlairConfig, caption: str, long_caption: Optional[str] = None,
                     rng: Optional[random.Random] = None) -> list[str]:
        """``[caption, sub_1, ..., sub_K]``: K sub-captions drawn from the sentences of the caption and
        the long caption together (``caption_pool``). Only the sub-captions are encoded
        (``stage1_collate``)."""
        if rng is None:
            raise ValueError("FLAIR samples sub-captions: pass a seeded random.Random as rng")
        pool = caption_pool(caption, long_caption)
        return [caption, *sample_subcaptions(pool, cfg.num_subcaptions, cfg.max_merge, rng)]

    def fixed_random_inputs(self, batch: dict, num_images: int, device: torch.device) -> dict:
        """``{"flair_neg_index": [B, B-1]}`` drawn once for a batch of B = ``num_images`` (unless the
        batch fixes it), so every pass of a cached accumulation step samples the same negatives."""
        if "flair_neg_index" in batch:
            return {}
        return {"flair_neg_index": draw_negatives(num_images, self.cfg.num_subcaptions, device)}

    def forward(self, img: ImageFeatures, txt: TextFeatures, batch: dict) -> dict:
        sub = batch.get("sub_text", txt)
        if not isinstance(sub, TextFeatures):
            raise KeyError('FLAIR needs the sub-captions: txt or batch["sub_text"], TextFeatures with global_emb '
                           '[B*K, d]')
        num_images, num_sub = img.global_emb.shape[0], self.cfg.num_subcaptions
        if sub.global_emb.shape[0] != num_images * num_sub:
            raise ValueError(f"the sub-captions have {sub.global_emb.shape[0]} rows, expected B*K = "
                             f"{num_images}*{num_sub} (txt holds the sub-captions, image-major)")
        sub_emb = full_precision(sub.global_emb).reshape(num_images, num_sub, -1)
        with no_autocast(img.global_emb.device):
            scale = self.logit_scale()
            out = flair_loss(full_precision(img.global_emb), full_precision(img.patch_emb), sub_emb,
                             self.pooling, scale, self.logit_bias, batch.get("flair_neg_index"),
                             self.cfg.gather_with_grad)
        out.update(logit_scale=scale.detach(), logit_bias=self.logit_bias.detach())
        return out
