"""CLIP: symmetric InfoNCE on global embeddings (../shared/METHODS.md, "CLIP").

``clip_loss`` normalises its inputs itself: pass raw global embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F

from encoders.features import ImageFeatures, TextFeatures
from encoders.objectives.base import (LogScale, Objective, ObjectiveConfig, check_global_pair, full_precision,
                                      no_autocast, require)
from encoders.objectives.gather import gather_features, local_offset


@dataclass
class ClipConfig(ObjectiveConfig):
    """``objective.*`` of CLIP. Encoder as the paper: CLS / EOS pooling, linear projections, no local
    heads (the inherited ``encoder_defaults``)."""

    name: str = "clip"
    init_temperature: float = 0.07  # tau at init (logit scale = 1/tau)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(1 / self.max_logit_scale <= self.init_temperature <= 1, "objective.init_temperature",
                f"must be in [1/max_logit_scale, 1] = [{1 / self.max_logit_scale:g}, 1] (the logit scale 1/tau "
                f"is kept in [1, max_logit_scale]), got {self.init_temperature}")


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor,
              logit_scale: Union[torch.Tensor, float], gather: bool = True,
              gather_with_grad: bool = True) -> torch.Tensor:
    """Symmetric InfoNCE. image_emb, text_emb [B, d] raw (L2-normalised here); -> scalar.

    logits_ij = logit_scale * <v_i, t_j>; loss = (CE(logits, diag) + CE(logits^T, diag)) / 2.
    Under torch.distributed (and ``gather``) this rank's rows are scored against every rank's
    columns, labels offset by rank * B; the mean of the per-rank losses is the loss on the
    concatenated batch.
    """
    check_global_pair(image_emb, text_emb)
    image_emb = F.normalize(image_emb, dim=-1)
    text_emb = F.normalize(text_emb, dim=-1)
    if gather:
        all_image = gather_features(image_emb, gather_with_grad)
        all_text = gather_features(text_emb, gather_with_grad)
    else:
        all_image, all_text = image_emb, text_emb
    offset = local_offset(image_emb.shape[0]) if gather else 0
    labels = torch.arange(image_emb.shape[0], device=image_emb.device) + offset
    logits_per_image = logit_scale * image_emb @ all_text.T      # [B, N*B]
    logits_per_text = logit_scale * text_emb @ all_image.T       # [B, N*B]
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


class ClipObjective(Objective):
    """CLIP objective: holds the learnable logit scale (1 / tau; ``after_optimizer_step`` clamps it to
    [1, max_logit_scale]).

    ``forward(img, txt, batch) -> {"loss", "logit_scale"}`` using ``img.global_emb`` and
    ``txt.global_emb`` [B, d].
    """

    config_class = ClipConfig

    def __init__(self, cfg: ClipConfig, embed_dim: int, vision_width: int) -> None:
        super().__init__(cfg, embed_dim, vision_width)
        self.logit_scale = LogScale(1.0 / cfg.init_temperature, cfg.max_logit_scale)

    def forward(self, img: ImageFeatures, txt: TextFeatures, batch: dict) -> dict:
        with no_autocast(img.global_emb.device):
            scale = self.logit_scale()
            loss = clip_loss(full_precision(img.global_emb), full_precision(txt.global_emb), scale,
                             gather_with_grad=self.cfg.gather_with_grad)
        return {"loss": loss, "logit_scale": scale.detach()}
