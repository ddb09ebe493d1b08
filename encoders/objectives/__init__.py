"""Stage-one objectives: pure loss functions plus thin modules holding the learnable scalars, each
next to its config dataclass (the paper's defaults)."""

from encoders.objectives.base import Objective, ObjectiveConfig
from encoders.objectives.clip import ClipConfig, ClipObjective, clip_loss
from encoders.objectives.flair import (FlairConfig, FlairObjective, TextConditionedPooling, flair_loss, flair_mps_loss,
                                       flair_tcs_loss, sample_subcaptions)
from encoders.objectives.gather import gather_features
from encoders.objectives.siglip import SiglipConfig, SiglipObjective, siglip_loss
from encoders.objectives.sparc import (SparcConfig, SparcObjective, sparc_alignment_weights, sparc_fine_grained_loss,
                                       sparc_grouped_embeddings, sparc_loss, sparc_similarity)

__all__ = [
    "ClipConfig", "ClipObjective", "FlairConfig", "FlairObjective", "Objective", "ObjectiveConfig", "SiglipConfig",
    "SiglipObjective", "SparcConfig", "SparcObjective", "TextConditionedPooling",
    "clip_loss", "flair_loss", "flair_mps_loss", "flair_tcs_loss", "gather_features", "sample_subcaptions",
    "siglip_loss", "sparc_alignment_weights", "sparc_fine_grained_loss", "sparc_grouped_embeddings",
    "sparc_loss", "sparc_similarity",
]
