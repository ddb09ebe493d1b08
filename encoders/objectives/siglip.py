"""SigLIP: pairwise sigmoid loss on global embeddings (../shared/METHODS.md, "SigLIP").

``siglip_loss`` normalises its inputs itself: pass raw global embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from encoders.features import ImageFeatures, TextFeatures
from encoders.objectives.base import (LogScale, Objective, ObjectiveConfig, check_global_pair, full_precision,
                                      no_autocast)
from encoders.objectives.gather import gather_features, local_offset


@dataclass
class SiglipConfig(ObjectiveConfig):
    """``objective.*`` of SigLIP. Encoder as the paper: the tower's pooled output (a SigLIP tower's
    attention-pooling head), linear projections, no local heads (the inherited ``encoder_defaults``)."""

    name: str = "siglip"
    init_log_scale: float = 2.302585092994046  # t' at init: log(10)
    init_bias: float = -10.0  # b at init


def siglip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor,
                logit_scale: Union[torch.Tensor, float], logit_bias: Union[torch.Tensor, float],
                gather: bool = True, gather_with_grad: bool = True) -> torch.Tensor:
    """Pairwise sigmoid loss. image_emb, text_emb [B, d] raw (L2-normalised here); -> scalar.

    logits_ij = t * <v_i, t_j> + b, z_ij = +1 on the diagonal else -1,
    loss = -(1/B) sum_ij log sigmoid(z_ij * logits_ij). Distributed: this rank's B image rows
    against all N*B texts, divided by the local B (the mean over ranks is the global loss).
    """
    check_global_pair(image_emb, text_emb)
    image_emb = F.normalize(image_emb, dim=-1)
    text_emb = F.normalize(text_emb, dim=-1)
    all_text = gather_features(text_emb, gather_with_grad) if gather else text_emb
    batch = image_emb.shape[0]
    offset = local_offset(batch) if gather else 0
    logits = logit_scale * image_emb @ all_text.T + logit_bias                    # [B, N*B]
    cols = torch.arange(all_text.shape[0], device=logits.device)
    rows = torch.arange(batch, device=logits.device) + offset
    z = torch.where(rows[:, None] == cols[None, :], 1.0, -1.0).to(logits.dtype)
    return -F.logsigmoid(z * logits).sum() / batch


class SiglipObjective(Objective):
    """SigLIP objective: holds t = exp(t') (t' init log 10; ``after_optimizer_step`` clamps t' to
    [0, ln max_logit_scale]) and b.

    ``forward(img, txt, batch) -> {"loss", "logit_scale", "logit_bias"}`` on the global embeddings.
    """

    config_class = SiglipConfig

    def __init__(self, cfg: SiglipConfig, embed_dim: int, vision_width: int) -> None:
        super().__init__(cfg, embed_dim, vision_width)
        init = min(math.exp(cfg.init_log_scale), cfg.max_logit_scale)
        self.logit_scale = LogScale(init, cfg.max_logit_scale)
        self.logit_bias = nn.Parameter(torch.tensor(float(cfg.init_bias)))

    def forward(self, img: ImageFeatures, txt: TextFeatures, batch: dict) -> dict:
        with no_autocast(img.global_emb.device):
            scale = self.logit_scale()
            loss = siglip_loss(full_precision(img.global_emb), full_precision(txt.global_emb),
                               scale, self.logit_bias, gather_with_grad=self.cfg.gather_with_grad)
        return {"loss": loss, "logit_scale": scale.detach(), "logit_bias": self.logit_bias.detach()}
