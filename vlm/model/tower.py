"""The VLM's vision tower: any tower ``encoders.towers.load_vision_tower`` reads, frozen by default.

Accepts our stage-one checkpoints, MaskEmbed outputs and local HF CLIP / SigLIP / SigLIP 2 (vision) /
DINOv2 / ResNet / ConvNeXt / timm (``TimmWrapperModel``) dirs (``encoders.towers.TOWER_CLASSES``).
Frozen towers run under ``torch.no_grad`` and stay in eval mode whatever the parent's mode.

Which features the bridge gets follows HF LLaVA (``encoders.towers.vision_features``):
``hidden_states[feature_layer]`` (default -2, the penultimate block, before the final norm), then
``select_strategy`` "default" (drop token 0, CLIP's CLS) or "full" (keep it). A conv tower's
layers are its stages (-1: the last stage's output; an earlier one only when its grid is the patch
grid) and, without a CLS token, both strategies keep every patch. A trainable tower freezes the
parameters those features never use (later blocks or stages, final norm, SigLIP's head), so every
trainable parameter gets a gradient.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Optional

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from encoders.towers import (SIGLIP_TOWERS, ImageTransform, feature_layer_index, load_vision_tower, num_feature_tokens,
                             num_patches, tower_width, unused_feature_parameters, vision_features)


class VLMVisionTower(nn.Module):
    """Wraps a vision tower: ``forward(pixel_values [B,3,H,W]) -> features [B,N,w]``.

    feature_layer: index into the tower's ``hidden_states`` (None: the final post-norm output).
    select_strategy: "default" (drop token 0) or "full". See ``encoders.towers.vision_features``.
    """

    def __init__(self, tower: nn.Module, transform: ImageTransform, freeze: bool = True,
                 feature_layer: Optional[int] = -2, select_strategy: str = "default"):
        super().__init__()
        self.tower = tower
        self.transform = transform
        self.frozen = freeze
        feature_layer_index(tower, feature_layer)  # range check
        self.feature_layer = feature_layer
        self.select_strategy = select_strategy
        for p in self.tower.parameters():
            p.requires_grad_(not freeze)
        for p in unused_feature_parameters(tower, feature_layer):
            p.requires_grad_(False)
        if freeze:
            self.tower.eval()
        if isinstance(tower, SIGLIP_TOWERS) and select_strategy == "default":
            warnings.warn("vision_feature_select_strategy 'default' drops token 0, and a SigLIP tower has no CLS: "
                          "its first (top-left) patch is dropped, exactly as HF LLaVA does; set 'full' to keep "
                          "every patch (what HF's SigLIP-tower LLaVA configs use)", stacklevel=2)

    @classmethod
    def load(cls, path: str | Path, freeze: bool = True, feature_layer: Optional[int] = -2,
             select_strategy: str = "default") -> "VLMVisionTower":
        """Load the tower (and its image transform) from a local directory."""
        tower, transform = load_vision_tower(path)
        return cls(tower, transform, freeze=freeze, feature_layer=feature_layer, select_strategy=select_strategy)

    @property
    def width(self) -> int:
        """Hidden width w of the patch tokens."""
        return tower_width(self.tower)

    @property
    def num_patches(self) -> int:
        """P, the number of patch tokens per image."""
        return num_patches(self.tower)

    @property
    def num_tokens(self) -> int:
        """N, the feature tokens ``forward`` returns per image (CLIP: P, or 1+P with "full")."""
        return num_feature_tokens(self.tower, self.select_strategy)

    def train(self, mode: bool = True) -> "VLMVisionTower":
        """Set the mode; a frozen tower stays in eval mode."""
        super().train(mode)
        if self.frozen:
            self.tower.eval()
        return self

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B,3,H,W] -> features [B,N,w] (``feature_layer`` / ``select_strategy``)."""
        dtype = next(self.tower.parameters()).dtype
        pixel_values = pixel_values.to(dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return vision_features(self.tower, pixel_values, self.feature_layer, self.select_strategy)

    @property
    def has_lora(self) -> bool:
        """Whether LoRA adapters were injected (``add_lora``)."""
        return any(isinstance(m, LoraLayer) for m in self.tower.modules())

    def add_lora(self, r: int, alpha: int, dropout: float = 0.0) -> None:
        """Train the tower through LoRA adapters (peft's ``inject_adapter_in_model``, the class stays
        a stock tower) on every linear layer its features use; every other tower weight is frozen."""
        unused = {id(p) for p in unused_feature_parameters(self.tower, self.feature_layer)}
        targets = [name for name, m in self.tower.named_modules()
                   if isinstance(m, nn.Linear) and not any(id(p) in unused for p in m.parameters())]
        if not targets:
            raise ValueError(f"{type(self.tower).__name__}: no linear layer to put LoRA on (a conv tower has none)")
        config = PeftLoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
        inject_adapter_in_model(config, self.tower)
        self.frozen = False
        for name, p in self.tower.named_parameters():
            p.requires_grad_("lora_" in name)

    def merged_tower(self) -> nn.Module:
        """A copy of the tower with its LoRA adapters merged into the weights (the stock class and keys)."""
        tower = copy.deepcopy(self.tower)
        for name, module in list(tower.named_modules()):
            if isinstance(module, LoraLayer):
                module.merge()
                parent, _, child = name.rpartition(".")
                setattr(tower.get_submodule(parent) if parent else tower, child, module.get_base_layer())
        return tower

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the tower (stock ``transformers`` format, LoRA merged in) and its ``preprocessor_config.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (self.merged_tower() if self.has_lora else self.tower).save_pretrained(str(directory))
        self.transform.save_pretrained(directory)
