"""The VLM's vision tower: any tower ``encoders.towers.load_vision_tower`` reads, frozen by default.

Accepts our stage-one checkpoints, MaskEmbed outputs and local HF CLIP / SigLIP (vision) dirs.
Frozen towers run under ``torch.no_grad`` and stay in eval mode whatever the parent's mode.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from encoders.towers import ImageTransform, load_vision_tower, num_patches, patch_tokens, tower_width


class VLMVisionTower(nn.Module):
    """Wraps a CLIP/SigLIP vision model: ``forward(pixel_values [B,3,H,W]) -> patch tokens [B,P,w]``."""

    def __init__(self, tower: nn.Module, transform: ImageTransform, freeze: bool = True):
        super().__init__()
        self.tower = tower
        self.transform = transform
        self.frozen = freeze
        for p in self.tower.parameters():
            p.requires_grad_(not freeze)
        if freeze:
            self.tower.eval()

    @classmethod
    def load(cls, path: str | Path, freeze: bool = True) -> "VLMVisionTower":
        """Load the tower (and its image transform) from a local directory."""
        tower, transform = load_vision_tower(path)
        return cls(tower, transform, freeze=freeze)

    @property
    def width(self) -> int:
        """Hidden width w of the patch tokens."""
        return tower_width(self.tower)

    @property
    def num_patches(self) -> int:
        """P, the number of patch tokens per image."""
        return num_patches(self.tower)

    def train(self, mode: bool = True) -> "VLMVisionTower":
        """Set the mode; a frozen tower stays in eval mode."""
        super().train(mode)
        if self.frozen:
            self.tower.eval()
        return self

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B,3,H,W] -> patch tokens [B,P,w] (no CLS, post-LayerNorm)."""
        dtype = next(self.tower.parameters()).dtype
        pixel_values = pixel_values.to(dtype)
        if self.frozen:
            with torch.no_grad():
                return patch_tokens(self.tower, pixel_values)
        return patch_tokens(self.tower, pixel_values)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the tower (stock ``transformers`` format) and its ``preprocessor_config.json``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tower.save_pretrained(str(directory))
        self.transform.save_pretrained(directory)
