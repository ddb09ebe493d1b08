"""SPARC (Bica et al., 2024): sparse fine-grained contrastive alignment (../shared/METHODS.md).

Every fine-grained quantity is computed per image-caption pair (einsums over b, never across the
batch), so the cost is O(B * L * P * d) and no B x B x L x P tensor is ever built. The global
term is CLIP on the DualEncoder's global embeddings (it does the average pooling and the
vision-side non-linear layer), gathered across ranks; the fine-grained term stays per example.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

import torch
import torch.nn.functional as F

from encoders.features import ImageFeatures, TextFeatures
from encoders.objectives.base import LogScale, Objective, ObjectiveConfig, full_precision, no_autocast, require
from encoders.objectives.clip import clip_loss


@dataclass
class SparcConfig(ObjectiveConfig):
    """``objective.*`` of SPARC. Encoder as the paper (section 2): average pooling (no CLS), one
    non-linear layer before the vision global projection, local adapters shared with the global
    projections (separate ``model.local_heads`` are an ablation)."""

    name: str = "sparc"
    init_temperature: float = 0.07  # tau at init, shared by both terms (logit scale = 1/tau)
    lambda_global: float = 0.5
    lambda_fine: float = 1.0
    sparsity_threshold: Optional[float] = None  # sigma; None = 1/P

    encoder_defaults: ClassVar[dict[str, Any]] = {"pool": "mean", "global_mlp": True, "local_heads": False}
    uses_local_embeddings: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        require(1 / self.max_logit_scale <= self.init_temperature <= 1, "objective.init_temperature",
                f"must be in [1/max_logit_scale, 1] = [{1 / self.max_logit_scale:g}, 1] (the logit scale 1/tau "
                f"is kept in [1, max_logit_scale]), got {self.init_temperature}")
        require(self.lambda_global >= 0, "objective.lambda_global", "must be >= 0")
        require(self.lambda_fine >= 0, "objective.lambda_fine", "must be >= 0")
        if self.sparsity_threshold is not None:
            require(0 <= self.sparsity_threshold <= 1, "objective.sparsity_threshold", "must be in [0, 1]")


def _check_local(patch_emb: torch.Tensor, token_emb: torch.Tensor, token_mask: torch.Tensor) -> None:
    if patch_emb.dim() != 3 or token_emb.dim() != 3:
        raise ValueError(f"expected patch_emb [B,P,d] and token_emb [B,L,d], got "
                         f"{tuple(patch_emb.shape)} and {tuple(token_emb.shape)}")
    if patch_emb.shape[0] != token_emb.shape[0] or patch_emb.shape[2] != token_emb.shape[2]:
        raise ValueError(f"patch_emb {tuple(patch_emb.shape)} and token_emb {tuple(token_emb.shape)} "
                         "disagree on batch size or width")
    if token_mask.shape != token_emb.shape[:2]:
        raise ValueError(f"token_mask {tuple(token_mask.shape)} must be [B, L] = {tuple(token_emb.shape[:2])}")


def sparc_similarity(patch_emb: torch.Tensor, token_emb: torch.Tensor) -> torch.Tensor:
    """Raw token-patch similarities s_ijk = t_ij . v_ik. patch_emb [B,P,d], token_emb [B,L,d] -> [B,L,P]."""
    return torch.einsum("bld,bpd->blp", token_emb, patch_emb)


def sparc_alignment_weights(patch_emb: torch.Tensor, token_emb: torch.Tensor, token_mask: torch.Tensor,
                            threshold: Optional[float] = None) -> torch.Tensor:
    """SPARC alignment weights a_ijk. patch_emb [B,P,d], token_emb [B,L,d], token_mask [B,L] -> [B,L,P].

    As the paper's equations: min-max normalise the similarities over patches,
    ŝ = (s - min) / (max - min), so the best patch gets exactly 1 and the worst exactly 0; zero
    those below ``threshold`` (sigma, default 1/P; sigma <= 1 so every token keeps its best patch);
    renormalise each row to sum 1. Padded tokens get all-zero rows. These weights are what
    heatmaps draw.

    The only guard is for a zero range (max == min: every patch ties as the best): there ŝ = 1 for
    every patch, so the token keeps them all with uniform weights 1/P. No epsilon shifts the
    normalised values otherwise.
    """
    _check_local(patch_emb, token_emb, token_mask)
    num_patches = patch_emb.shape[1]
    sigma = 1.0 / num_patches if threshold is None else float(threshold)
    if not 0.0 <= sigma <= 1.0:
        raise ValueError(f"sparsity threshold must be in [0, 1], got {sigma}")
    sim = sparc_similarity(patch_emb, token_emb)                                  # [B,L,P]
    sim_min = sim.min(dim=-1, keepdim=True).values
    span = sim.max(dim=-1, keepdim=True).values - sim_min                        # [B,L,1], >= 0
    tied = span <= 0
    norm = (sim - sim_min) / torch.where(tied, torch.ones_like(span), span)
    norm = torch.where(tied, torch.ones_like(norm), norm)                         # all tie: every patch is the best
    sparse = torch.where(norm >= sigma, norm, torch.zeros_like(norm))
    weights = sparse / sparse.sum(dim=-1, keepdim=True)                         # row sum >= 1 (the max is 1)
    return weights * token_mask.to(weights.dtype).unsqueeze(-1)


def sparc_grouped_embeddings(patch_emb: torch.Tensor, align_weights: torch.Tensor) -> torch.Tensor:
    """Language-grouped vision embeddings c_ij = sum_k a_ijk v_ik. [B,P,d], [B,L,P] -> [B,L,d]."""
    return torch.einsum("blp,bpd->bld", align_weights, patch_emb)


def sparc_fine_grained_loss(patch_emb: torch.Tensor, token_emb: torch.Tensor, token_mask: torch.Tensor,
                            temperature: Union[torch.Tensor, float],
                            threshold: Optional[float] = None) -> torch.Tensor:
    """SPARC sequence-wise loss. patch_emb [B,P,d], token_emb [B,L,d], token_mask [B,L] bool -> scalar.

    L_f = -(1/2B) sum_i (1/L_i) sum_j [log softmax_r(<c_ij, t_ir>/tau)[j] + log softmax_r(<c_ir, t_ij>/tau)[j]],
    j and r over the L_i real tokens of caption i; c and t are L2-normalised for the logits (the
    alignment weights use the raw embeddings). Every caption needs at least one real token.
    """
    _check_local(patch_emb, token_emb, token_mask)
    mask = token_mask.bool()
    lengths = mask.sum(dim=1)
    if bool((lengths == 0).any()):
        raise ValueError("every caption needs at least one real token in token_mask")
    weights = sparc_alignment_weights(patch_emb, token_emb, mask, threshold)
    grouped = F.normalize(sparc_grouped_embeddings(patch_emb, weights), dim=-1)   # [B,L,d]
    tokens = F.normalize(token_emb, dim=-1)
    logits = torch.einsum("bjd,brd->bjr", grouped, tokens) / temperature          # <c_ij, t_ir>, [B,L,L]
    pad = ~mask.unsqueeze(1)                                                        # columns r
    neg = torch.finfo(logits.dtype).min
    log_p_c2t = torch.log_softmax(logits.masked_fill(pad, neg), dim=-1)           # over r, row j
    log_p_t2c = torch.log_softmax(logits.transpose(1, 2).masked_fill(pad, neg), dim=-1)  # <c_ir, t_ij>
    diag = torch.diagonal(log_p_c2t, dim1=1, dim2=2) + torch.diagonal(log_p_t2c, dim1=1, dim2=2)  # [B,L]
    per_caption = torch.where(mask, diag, torch.zeros_like(diag)).sum(dim=1) / lengths
    return -per_caption.sum() / (2 * patch_emb.shape[0])


def sparc_loss(image_global: torch.Tensor, text_global: torch.Tensor, patch_emb: torch.Tensor,
               token_emb: torch.Tensor, token_mask: torch.Tensor, logit_scale: Union[torch.Tensor, float],
               lambda_global: float = 0.5, lambda_fine: float = 1.0, threshold: Optional[float] = None,
               gather_with_grad: bool = True) -> dict[str, torch.Tensor]:
    """SPARC total. image_global, text_global [B,d]; patch_emb [B,P,d]; token_emb [B,L,d]; token_mask [B,L].

    Returns {"loss": lambda_g * L_g + lambda_f * L_f, "loss_global": L_g, "loss_fine": L_f}; one
    learned temperature tau = 1 / logit_scale serves both terms. L_g is gathered across ranks.
    """
    loss_global = clip_loss(image_global, text_global, logit_scale, gather_with_grad=gather_with_grad)
    loss_fine = sparc_fine_grained_loss(patch_emb, token_emb, token_mask, 1.0 / logit_scale, threshold)
    return {"loss": lambda_global * loss_global + lambda_fine * loss_fine,
            "loss_global": loss_global, "loss_fine": loss_fine}


class SparcObjective(Objective):
    """SPARC objective: holds the shared logit scale (1 / tau; ``after_optimizer_step`` clamps it to
    [1, max_logit_scale]).

    ``forward(img, txt, batch) -> {"loss", "loss_global", "loss_fine", "logit_scale"}`` using the
    global embeddings, ``img.patch_emb`` [B,P,d], ``txt.token_emb`` [B,L,d], ``txt.token_mask``.
    """

    config_class = SparcConfig

    def __init__(self, cfg: SparcConfig, embed_dim: int, vision_width: int) -> None:
        super().__init__(cfg, embed_dim, vision_width)
        self.logit_scale = LogScale(1.0 / cfg.init_temperature, cfg.max_logit_scale)

    def forward(self, img: ImageFeatures, txt: TextFeatures, batch: dict) -> dict:
        with no_autocast(img.global_emb.device):
            scale = self.logit_scale()
            out = sparc_loss(full_precision(img.global_emb), full_precision(txt.global_emb),
                             full_precision(img.patch_emb), full_precision(txt.token_emb), txt.token_mask,
                             scale, self.cfg.lambda_global, self.cfg.lambda_fine,
                             self.cfg.sparsity_threshold, self.cfg.gather_with_grad)
        out["logit_scale"] = scale.detach()
        return out
