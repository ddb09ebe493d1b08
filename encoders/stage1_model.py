"""Stage-one model: a ``DualEncoder`` and an objective, one ``forward(batch) -> dict`` for the loop."""
from __future__ import annotations

from pathlib import Path
from typing import Union

from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from encoders.dual_encoder import DualEncoder
from encoders.objectives.base import Objective, ObjectiveConfig
from encoders.registry import build_objective, objective_config_class
from vlm.config import config_from_yaml_text, save_config

OBJECTIVE_STATE_FILE = "objective.safetensors"
OBJECTIVE_CONFIG_FILE = "objective.yaml"


class Stage1Model(nn.Module):
    """``forward(batch) -> dict`` of scalar loss terms with ``"loss"`` (the objective's output).

    batch: ``pixel_values`` [B,3,H,W], ``input_ids`` / ``attention_mask`` [B,L]; for FLAIR also
    ``sub_input_ids`` / ``sub_attention_mask`` [B,K,L], encoded as [B*K,L] (image-major) and
    passed to the objective as ``batch["sub_text"]``. Adds ``num_tokens`` (real caption tokens).
    """

    def __init__(self, encoder: DualEncoder, objective: Objective) -> None:
        super().__init__()
        self.encoder = encoder
        self.objective = objective
        # Separate local heads go unused by an objective that reads no local embeddings (Stage1Config
        # forbids it; a model assembled by hand may still do it), and so does SigLIP's pooling head
        # under any pool but "cls": DDP must then skip them.
        self.ddp_find_unused_parameters = bool(encoder.cfg.local_heads and not objective.cfg.uses_local_embeddings
                                               or encoder.unused_tower_head)

    @classmethod
    def build(cls, encoder: DualEncoder, objective_cfg: ObjectiveConfig) -> "Stage1Model":
        """Build the objective named by ``objective_cfg`` for ``encoder``'s widths."""
        objective = build_objective(objective_cfg, encoder.cfg.embed_dim, encoder.vision_width)
        return cls(encoder, objective)

    def forward(self, batch: dict) -> dict:
        for key in ("pixel_values", "input_ids", "attention_mask"):
            if key not in batch:
                raise KeyError(f"stage-one batch lacks {key!r}; has {sorted(batch)}")
        img = self.encoder.encode_image(batch["pixel_values"])
        txt = self.encoder.encode_text(batch["input_ids"], batch["attention_mask"])
        extra = dict(batch)
        if "sub_input_ids" in batch:
            sub_ids, sub_mask = batch["sub_input_ids"], batch["sub_attention_mask"]
            if sub_ids.dim() != 3 or sub_mask.shape != sub_ids.shape:
                raise ValueError(f"sub_input_ids / sub_attention_mask must be [B,K,L], got {tuple(sub_ids.shape)}"
                                 f" / {tuple(sub_mask.shape)}")
            extra["sub_text"] = self.encoder.encode_text(sub_ids.flatten(0, 1), sub_mask.flatten(0, 1))
        out = dict(self.objective(img, txt, extra))
        out["num_tokens"] = batch["attention_mask"].sum()
        return out

    def after_optimizer_step(self) -> None:
        """The training loop's post-step hook: the objective clamps its learned scales in place
        (open_clip's ``logit_scale.clamp_(0, math.log(100))`` after ``optimizer.step()``)."""
        self.objective.after_optimizer_step()

    def save_pretrained(self, directory: Union[str, Path]) -> Path:
        """The encoder's checkpoint plus ``objective.safetensors`` (learned temperature / bias, FLAIR's
        pooling) and ``objective.yaml`` (its config, e.g. a ``SparcConfig``)."""
        directory = self.encoder.save_pretrained(directory)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.objective.state_dict().items()}
        save_file(tensors, str(directory / OBJECTIVE_STATE_FILE))
        save_config(self.objective.cfg, directory / OBJECTIVE_CONFIG_FILE)
        return directory

    @classmethod
    def from_pretrained(cls, directory: Union[str, Path]) -> "Stage1Model":
        """Reload what ``save_pretrained`` wrote (encoder + objective with its learned state)."""
        directory = Path(directory)
        encoder = DualEncoder.from_pretrained(directory)
        cfg_path = directory / OBJECTIVE_CONFIG_FILE
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{directory}: no {OBJECTIVE_CONFIG_FILE}; saved without its objective")
        text = cfg_path.read_text()
        name = str(OmegaConf.create(text).get("name", ""))
        model = cls.build(encoder, config_from_yaml_text(objective_config_class(name), text))
        model.objective.load_state_dict(load_file(str(directory / OBJECTIVE_STATE_FILE)), strict=True)
        return model
