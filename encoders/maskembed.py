"""MaskEmbed locality alignment (Covert et al., 2024): post-train a ViT so each patch embedding
holds that patch's semantic contribution (../shared/METHODS.md, "Locality alignment").

Pieces, each a pure function or a small module:

- ``sample_patch_masks``: per image, the number of kept patches is uniform over 0..P and the kept
  positions are a uniformly random subset (True = kept).
- ``expand_views``: every image is used three times, with its mask, the complementary mask and the
  full view (all True), so a batch of B images gives 3B training views.
- ``apply_pixel_mask``: dropped patches are blanked in pixel space by setting their normalised
  pixels to 0, i.e. the dataset mean colour (the transform normalises with the mean, so 0 after
  normalisation is the mean before it; this is the "blank" the teacher sees).
- ``teacher_layer_tokens`` / ``maskembed_targets``: the frozen teacher's output tokens of block
  ``teacher_layer`` (``hidden_states[teacher_layer]``; -2 = the penultimate block), patch tokens
  only (CLIP's CLS row dropped), on the masked image, divided by a fixed scale so the targets have
  unit variance.
- ``MaskEmbedModel``: teacher f (frozen, always in eval mode, never receives gradients), student g
  (a deep copy of f, trained), a zero-initialised linear head on the student's patch tokens, and
  the decoder h (learned position embeddings + ``decoder_layers`` pre-norm transformer blocks +
  LayerNorm + linear head to the teacher width). Prediction = h(m * head(g(x))): the student sees
  the *unmasked* image, dropped patches are zeroed after the head, and the decoder must predict
  the teacher's view of the masked image from the kept patches alone. Loss: MSE.

Target scale. "Rescaled to unit variance" uses one scalar per model: the standard deviation of the
teacher targets over a calibration batch (``calibrate``: all three views of the given images, masks
from a generator with a fixed seed), stored in the buffer ``target_scale``. It is estimated once,
before training, from the first batch of the data stream; being deterministic given the teacher
and that batch, a resumed run recomputes exactly the same value. ``forward`` refuses to run
uncalibrated so a silently unscaled loss cannot happen.

The student's patch tokens are what the exported tower gives (``encoders.towers.patch_tokens``: the
last layer, post-LayerNorm, no CLS); the zero-initialised head belongs to the training scaffold and
is not exported. The export is a plain ``CLIPVisionModel`` / ``SiglipVisionModel`` directory.
SigLIP's attention-pooling head is not used by patch tokens and stays frozen (equal to the teacher's).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import SiglipVisionModel

from encoders.towers import ImageTransform, VisionTower, patch_tokens, tower_width
from vlm.config import MaskEmbedConfig

CALIBRATION_SEED = 1234


def sample_patch_masks(batch_size: int, num_patches: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random keep-masks [B, P] bool: per row, k ~ Uniform{0..P} patches kept at random positions."""
    if batch_size < 1 or num_patches < 1:
        raise ValueError(f"need batch_size >= 1 and num_patches >= 1, got {batch_size}, {num_patches}")
    counts = torch.randint(0, num_patches + 1, (batch_size, 1), generator=generator)
    # The rank of each position in a random permutation; keep the first k ranks.
    order = torch.rand(batch_size, num_patches, generator=generator).argsort(dim=1).argsort(dim=1)
    return order < counts


def expand_views(pixel_values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels [B,3,H,W], mask [B,P]) -> (pixels [3B,3,H,W], masks [3B,P]): mask, complement, full view."""
    if mask.dtype != torch.bool or mask.dim() != 2 or mask.shape[0] != pixel_values.shape[0]:
        raise ValueError(f"mask must be bool [B,P] with B = {pixel_values.shape[0]}, got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    views = torch.cat([mask, ~mask, torch.ones_like(mask)], dim=0)
    return pixel_values.repeat(3, 1, 1, 1), views


def apply_pixel_mask(pixel_values: torch.Tensor, mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Blank dropped patches: pixels [B,3,H,W] (normalised), mask [B,P] bool (True = kept, row-major
    patch grid of H/ps x W/ps) -> pixels [B,3,H,W] with every dropped patch set to 0 (the mean colour)."""
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must be [B,3,H,W], got {tuple(pixel_values.shape)}")
    b, _, h, w = pixel_values.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image {h}x{w} is not divisible by patch_size {patch_size}")
    gh, gw = h // patch_size, w // patch_size
    if mask.shape != (b, gh * gw):
        raise ValueError(f"mask must be [B, P] = [{b}, {gh * gw}], got {tuple(mask.shape)}")
    grid = mask.view(b, 1, gh, 1, gw, 1).to(pixel_values.dtype)
    pixel_grid = pixel_values.view(b, 3, gh, patch_size, gw, patch_size)
    return (pixel_grid * grid).view(b, 3, h, w)


def _patch_rows(tower: VisionTower, hidden: torch.Tensor) -> torch.Tensor:
    """Hidden states [B, (1+)P, w] -> patch rows [B, P, w] (CLIP's CLS row dropped; SigLIP has none)."""
    return hidden if isinstance(tower, SiglipVisionModel) else hidden[:, 1:, :]


def siglip_pooling_head(tower: VisionTower) -> Optional[nn.Module]:
    """SigLIP's attention-pooling head (``tower.head`` in transformers 5, ``tower.vision_model.head``
    before), or None for CLIP / a head-less SigLIP."""
    if not isinstance(tower, SiglipVisionModel):
        return None
    core = getattr(tower, "vision_model", tower)
    return getattr(core, "head", None)


def teacher_layer_tokens(teacher: VisionTower, pixel_values: torch.Tensor, layer: int) -> torch.Tensor:
    """pixels [B,3,H,W] -> the output tokens of block ``layer`` (``hidden_states[layer]``; 0 = the
    embeddings, -1 = the last block, before any final LayerNorm), patch tokens only: [B,P,w]."""
    out = teacher(pixel_values=pixel_values, output_hidden_states=True)
    states = out.hidden_states
    if not -len(states) <= layer < len(states):
        raise ValueError(f"teacher_layer {layer} out of range for {len(states)} hidden states")
    return _patch_rows(teacher, states[layer])


def maskembed_targets(teacher: VisionTower, pixel_values: torch.Tensor, mask: torch.Tensor, patch_size: int,
                      layer: int = -2, scale: Union[float, torch.Tensor] = 1.0) -> torch.Tensor:
    """Targets [B,P,w]: ``teacher_layer_tokens`` of the image with dropped patches blanked, / ``scale``.
    pixels [B,3,H,W], mask [B,P] bool. Computed without gradients."""
    with torch.no_grad():
        masked = apply_pixel_mask(pixel_values, mask, patch_size)
        return teacher_layer_tokens(teacher, masked, layer) / scale


def maskembed_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over views, patches and channels. [N,P,w], [N,P,w] -> scalar."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ")
    return F.mse_loss(prediction.float(), target.float())


class MaskEmbedDecoder(nn.Module):
    """h: masked patch embeddings [N,P,w] -> predictions [N,P,out_dim].

    Learned position embeddings (dropped patches arrive as zeros, so positions must be given
    explicitly), ``num_layers`` pre-norm transformer blocks (GELU MLP of 4w, no dropout), a final
    LayerNorm and a linear head.
    """

    def __init__(self, width: int, num_patches: int, num_layers: int, num_heads: int, out_dim: int):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"decoder width {width} is not divisible by maskembed.decoder_heads={num_heads}")
        self.pos_emb = nn.Parameter(torch.randn(1, num_patches, width) * 0.02)
        self.blocks = nn.ModuleList([
            nn.TransformerEncoderLayer(width, num_heads, dim_feedforward=4 * width, dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(num_layers)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_emb
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class MaskEmbedModel(nn.Module):
    """Teacher f (frozen), student g = deepcopy(f), zero-init head, decoder h (module docstring).

    ``forward(batch)``: batch ``pixel_values`` [B,3,H,W] and optionally ``patch_mask`` [B,P] bool
    (sampled with the global RNG when absent) -> dict(loss, target_var). Call ``calibrate`` first.
    """

    def __init__(self, teacher: VisionTower, cfg: MaskEmbedConfig, transform: Optional[ImageTransform] = None):
        super().__init__()
        self.cfg = cfg
        self.transform = transform  # the teacher's preprocessing, saved beside the student
        self.teacher = teacher
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.student = copy.deepcopy(teacher)
        self.student.requires_grad_(True)
        pooling_head = siglip_pooling_head(self.student)
        if pooling_head is not None:
            pooling_head.requires_grad_(False)  # the pooling head plays no part here
        width = tower_width(teacher)
        self.patch_size = int(teacher.config.patch_size)
        self.num_patches = (int(teacher.config.image_size) // self.patch_size) ** 2
        self.student_head = nn.Linear(width, width)
        nn.init.zeros_(self.student_head.weight)
        nn.init.zeros_(self.student_head.bias)
        self.decoder = MaskEmbedDecoder(width, self.num_patches, cfg.decoder_layers, cfg.decoder_heads, width)
        self.register_buffer("target_scale", torch.tensor(float("nan")))

    def train(self, mode: bool = True) -> "MaskEmbedModel":
        """As ``nn.Module.train`` but the teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def targets(self, pixel_values: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """Scaled teacher targets [N,P,w] for pixels [N,3,H,W] and keep-masks [N,P]."""
        return maskembed_targets(self.teacher, pixel_values, views, self.patch_size, self.cfg.teacher_layer,
                                 self.target_scale)

    @torch.no_grad()
    def calibrate(self, pixel_values: torch.Tensor) -> float:
        """Set ``target_scale`` to the std of the unscaled targets of the three views of ``pixel_values``
        [B,3,H,W] (masks from a fixed-seed generator); returns it."""
        g = torch.Generator().manual_seed(CALIBRATION_SEED)
        mask = sample_patch_masks(pixel_values.shape[0], self.num_patches, g).to(pixel_values.device)
        pixels, views = expand_views(pixel_values, mask)
        raw = maskembed_targets(self.teacher, pixels, views, self.patch_size, self.cfg.teacher_layer, 1.0)
        scale = float(raw.float().std())
        if not scale > 0:
            raise ValueError(f"teacher targets have std {scale}; cannot rescale to unit variance")
        self.target_scale.fill_(scale)
        return scale

    def predict(self, pixel_values: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """h(m * head(g(x))): pixels [B,3,H,W] (unmasked), keep-masks [kB,P] -> predictions [kB,P,w].

        The student sees the unmasked image, so its tokens are computed once per image and shared
        by that image's k views (``expand_views`` order: view v of image i is row v * B + i).
        """
        b, n = pixel_values.shape[0], views.shape[0]
        if n % b:
            raise ValueError(f"{n} views are not a whole number of views of {b} images")
        student = self.student_head(patch_tokens(self.student, pixel_values))
        student = student.repeat(n // b, 1, 1)
        return self.decoder(student * views.unsqueeze(-1).to(student.dtype))

    def forward(self, batch: dict) -> dict:
        if not torch.isfinite(self.target_scale):
            raise RuntimeError("MaskEmbedModel.calibrate(pixel_values) must run before training")
        pixel_values = batch["pixel_values"]
        mask = batch.get("patch_mask")
        if mask is None:
            mask = sample_patch_masks(pixel_values.shape[0], self.num_patches).to(pixel_values.device)
        pixels, views = expand_views(pixel_values, mask.bool())
        target = self.targets(pixels, views)
        prediction = self.predict(pixel_values, views)
        loss = maskembed_loss(prediction, target)
        return {"loss": loss, "target_var": target.detach().float().var()}

    def save_pretrained(self, directory: Union[str, Path]) -> Path:
        """Write the student as a stock HF vision-tower directory (+ the teacher's
        ``preprocessor_config.json`` when the model was built with its ``transform``)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.student.save_pretrained(str(directory))
        if self.transform is not None:
            self.transform.save_pretrained(directory)
        return directory


__all__ = ["MaskEmbedDecoder", "MaskEmbedModel", "apply_pixel_mask", "expand_views", "maskembed_loss",
           "maskembed_targets", "sample_patch_masks", "siglip_pooling_head", "teacher_layer_tokens"]
