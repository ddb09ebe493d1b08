"""MaskEmbed locality alignment (Covert et al., 2024): post-train a ViT so each patch embedding
holds that patch's semantic contribution (../shared/METHODS.md, "Locality alignment"; checked
term by term against iancovert/locality-alignment: teacher_utils.py, student_utils.py,
model_utils.py, scripts/train.py).

Pieces, each a pure function or a small module:

- ``sample_patch_masks``: per image, the number of kept patches is uniform over 0..P and the kept
  positions are a uniformly random subset (True = kept).
- ``expand_views``: every image is used three times, with its mask, the complementary mask and the
  full view (all True), so a batch of B images gives 3B training views.
- ``apply_pixel_mask``: dropped patches are blanked in pixel space by setting their normalised
  pixels to 0 (the reference's ``MaskLayer``: normalised pixels times the upsampled mask).
- ``drop_last_blocks`` / ``final_tokens`` / ``maskembed_targets``: the target is the frozen teacher
  with its last ``skip_blocks`` blocks removed (reference ``convert_to_teacher_model``:
  ``model.blocks = model.blocks[:-skip_blocks]``; here ``skip_blocks = -1 - cfg.teacher_layer``,
  1 by default) run on the pixel-masked image, THEN the teacher's final norm (HF
  ``post_layernorm``, timm's ``norm`` in ``forward_features``), keeping every token: CLIP's CLS
  row included ([B, 1+P, w]); SigLIP has no CLS/prefix token, so all P patch tokens ([B, P, w]).
  Stock HF CLIP applies ``post_layernorm`` to the pooled CLS only, so ``final_tokens`` applies it
  to every row itself.
- ``MaskEmbedModel``: teacher f (frozen, always in eval mode, its last blocks removed), student g
  (a deep copy of the full f, its final norm re-initialised to weight 1 / bias 0 as the reference's
  ``convert_to_student_model`` resets ``model.norm``), the reference's zero-initialised linear
  output head on the student's tokens (``model.head`` there; training scaffold, not exported), and
  the decoder h (``MaskEmbedDecoder``). Prediction = h(m * head(g(x))) on all token rows: the
  student sees the *unmasked* image; dropped patches AND the CLS position are zeroed at the
  decoder's input (reference ``MaskEmbedDecoder.forward`` pads the mask with 0 for prefix tokens),
  and the decoder predicts every target row, the CLS row included. Loss: MSE over all elements.

Target scale. Targets are divided by the population std (ddof = 0) of the raw targets over a pass
of data, as the reference's ``get_baseline_loss`` (running mean / sum of squares over the whole
eval loader, ``sum_squares / n``). Our data is a stream, so the "pass" is the first
``cfg.calibration_batches`` micro-batches (default 8; each with its mask, complement and full
view, masks from a generator with a fixed seed). ``calibrate(batches)`` accumulates count, mean
and sum of squared deviations in float64 (Chan's merge) and stores the std in the buffer
``target_scale``; it is deterministic given the teacher and the batches, so a resumed run
recomputes the same value. ``forward`` refuses to run uncalibrated.

Conv towers (ResNet, ConvNeXt) take the same path on their patch grid: no prefix token, the
teacher loses the last residual blocks of its last stage, targets are its ``patch_tokens``, the
student's final norm is ConvNeXt's ``layernorm`` (ResNet has none to re-initialise), and a dropped
patch is the ``patch_size`` (total stride) square of pixels behind its grid cell.

The student is exported as a plain ``CLIPVisionModel`` / ``SiglipVisionModel`` / ``ResNetModel`` /
``ConvNextModel`` directory (its re-initialised-then-trained final norm included). SigLIP's
attention-pooling head plays no part (the reference sets ``attn_pool = None``); it stays frozen,
equal to the teacher's, so the export remains a stock tower.
"""
from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Dinov2Model, Siglip2VisionModel, SiglipVisionModel, TimmWrapperModel
from transformers.activations import ACT2FN

from encoders.towers import (ImageTransform, VisionTower, final_norm, is_conv_tower, num_patches, patch_tokens,
                             tower_patch_size, tower_width)
from vlm.config import MaskEmbedConfig

CALIBRATION_SEED = 1234
LAYER_SCALE_INIT = 1e-6  # reference scripts/train.py --decoder-init-values


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


def _core(tower: VisionTower) -> nn.Module:
    """The module holding embeddings / encoder / post_layernorm (transformers 5 flattened the
    vision models; older versions nest them under ``vision_model``). DINOv2 (``encoder.layer``,
    ``layernorm``) is not wired into MaskEmbed: ``ValueError``."""
    if isinstance(tower, (Dinov2Model, Siglip2VisionModel, TimmWrapperModel)):
        raise ValueError(f"MaskEmbed supports CLIP, SigLIP, ResNet and ConvNeXt towers; a {type(tower).__name__} "
                         "(DINOv2, SigLIP 2, timm) tower is not wired into it (stage one and stage two take it)")
    return getattr(tower, "vision_model", tower)


def num_prefix_tokens(tower: VisionTower) -> int:
    """Tokens before the patch tokens: CLIP's CLS (1); SigLIP and conv towers have none (0)."""
    return 0 if isinstance(tower, SiglipVisionModel) or is_conv_tower(tower) else 1


def siglip_pooling_head(tower: VisionTower) -> Optional[nn.Module]:
    """SigLIP's attention-pooling head (``tower.head`` in transformers 5, ``tower.vision_model.head``
    before), or None for CLIP / a head-less SigLIP."""
    if not isinstance(tower, SiglipVisionModel):
        return None
    return getattr(_core(tower), "head", None)


def drop_last_blocks(tower: VisionTower, skip_blocks: int) -> VisionTower:
    """Remove the tower's last ``skip_blocks`` transformer blocks IN PLACE and return it (reference
    ``convert_to_teacher_model``: ``model.blocks = model.blocks[:-skip_blocks]``). The config's
    ``num_hidden_layers`` follows. ``skip_blocks = 0`` leaves the tower unchanged. A conv tower
    loses the last residual blocks of its last stage (its first block stays: the patch grid does
    not change) and ``config.depths[-1]`` follows."""
    if is_conv_tower(tower):
        return _drop_last_conv_blocks(tower, skip_blocks)
    encoder = _core(tower).encoder
    depth = len(encoder.layers)
    if not 0 <= skip_blocks < depth:
        raise ValueError(f"skip_blocks must be in [0, {depth - 1}] for a {depth}-block tower, got {skip_blocks}")
    if skip_blocks:
        encoder.layers = nn.ModuleList(list(encoder.layers)[:depth - skip_blocks])
        tower.config.num_hidden_layers = depth - skip_blocks
    return tower


def _drop_last_conv_blocks(tower: VisionTower, skip_blocks: int) -> VisionTower:
    """``drop_last_blocks`` for a ResNet / ConvNeXt: the last stage's ``layers`` lose their tail."""
    stage = tower.encoder.stages[-1]
    depth = len(stage.layers)
    if not 0 <= skip_blocks < depth:
        raise ValueError(f"skip_blocks must be in [0, {depth - 1}] for a last stage of {depth} blocks, "
                         f"got {skip_blocks}")
    if skip_blocks:
        stage.layers = stage.layers[:depth - skip_blocks]
        tower.config.depths = [*tower.config.depths[:-1], depth - skip_blocks]
    return tower


def final_tokens(tower: VisionTower, pixel_values: torch.Tensor) -> torch.Tensor:
    """pixels [B,3,H,W] -> every token after the tower's blocks and its final norm: [B, prefix+P, w].

    embeddings (+ CLIP's ``pre_layrnorm``) -> all blocks of ``encoder.layers`` -> ``post_layernorm``
    on every row (timm's ``forward_features``). CLIP: CLS row first; SigLIP: patch rows only. The
    SigLIP pooling head is not run. A conv tower: its ``patch_tokens`` (the last stage's grid after
    its final norm, ConvNeXt's layernorm or ResNet's none), [B, P, w]."""
    if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"pixel_values must be [B,3,H,W], got {tuple(pixel_values.shape)}")
    if is_conv_tower(tower):
        return patch_tokens(tower, pixel_values)
    core = _core(tower)
    hidden = core.embeddings(pixel_values)
    pre = getattr(core, "pre_layrnorm", None)
    if pre is not None:
        hidden = pre(hidden)
    hidden = core.encoder(inputs_embeds=hidden).last_hidden_state
    return core.post_layernorm(hidden)


def maskembed_targets(teacher: VisionTower, pixel_values: torch.Tensor, mask: torch.Tensor, patch_size: int,
                      scale: Union[float, torch.Tensor] = 1.0) -> torch.Tensor:
    """Targets [B, prefix+P, w]: ``final_tokens`` of ``teacher`` (already cut by ``drop_last_blocks``)
    on the image with dropped patches blanked, / ``scale``. pixels [B,3,H,W], mask [B,P] bool.
    Computed without gradients."""
    with torch.no_grad():
        masked = apply_pixel_mask(pixel_values, mask, patch_size)
        return final_tokens(teacher, masked) / scale


def maskembed_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements: views, token rows (CLS included) and channels.
    [N,T,w], [N,T,w] -> scalar."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ")
    return F.mse_loss(prediction.float(), target.float())


class LayerScale(nn.Module):
    """x * gamma, gamma a per-channel vector initialised to ``init_values`` (timm ``LayerScale``)."""

    def __init__(self, dim: int, init_values: float = LAYER_SCALE_INIT):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DecoderBlock(nn.Module):
    """timm ``Block`` with LayerScale: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))); MLP of
    4w with the tower's activation; qkv with bias (the reference inherits qkv_bias from the student,
    which CLIP and SigLIP have); no dropout."""

    def __init__(self, width: int, num_heads: int, act: str = "gelu", init_values: float = LAYER_SCALE_INIT):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, num_heads, dropout=0.0, bias=True, batch_first=True)
        self.ls1 = LayerScale(width, init_values)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), ACT2FN[act], nn.Linear(4 * width, width))
        self.ls2 = LayerScale(width, init_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.ls1(self.attn(y, y, y, need_weights=False)[0])
        return x + self.ls2(self.mlp(self.norm2(x)))


class MaskEmbedDecoder(nn.Module):
    """h: (tokens [N, prefix+P, w], keep-mask [N,P] bool) -> predictions [N, prefix+P, out_dim].

    Reference ``model_utils.MaskEmbedDecoder``: the input is multiplied by the keep-mask padded
    with 0 for the prefix tokens (the CLS position enters with its input zeroed), then learned
    position embeddings (randn * 0.02), ``num_layers`` LayerScale blocks (init 1e-6), a final
    LayerNorm and a linear head, zero-initialised (METHODS.md), so h predicts 0 at init.
    """

    def __init__(self, width: int, num_patches: int, num_prefix: int, num_layers: int, num_heads: int,
                 out_dim: int, act: str = "gelu", init_values: float = LAYER_SCALE_INIT):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"decoder width {width} is not divisible by maskembed.decoder_heads={num_heads}")
        self.num_prefix = num_prefix
        self.pos_emb = nn.Parameter(torch.randn(1, num_prefix + num_patches, width) * 0.02)
        self.blocks = nn.ModuleList([DecoderBlock(width, num_heads, act, init_values) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, out_dim)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        if keep.dim() != 2 or x.shape[:2] != (keep.shape[0], self.num_prefix + keep.shape[1]):
            raise ValueError(f"tokens {tuple(x.shape)} do not match keep-mask {tuple(keep.shape)} with "
                             f"{self.num_prefix} prefix token(s)")
        keep = F.pad(keep.to(x.dtype), (self.num_prefix, 0), value=0.0)
        x = x * keep.unsqueeze(-1) + self.pos_emb
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class MaskEmbedModel(nn.Module):
    """Teacher f (frozen, last blocks removed), student g = deepcopy(f) with its final norm
    re-initialised, zero-init student head, decoder h (module docstring).

    ``teacher`` is cut IN PLACE by ``drop_last_blocks`` (after the student is copied from it).
    ``forward(batch)``: batch ``pixel_values`` [B,3,H,W] and optionally ``patch_mask`` [B,P] bool
    (sampled with the global RNG when absent) -> dict(loss, target_var). Call ``calibrate`` first.
    """

    def __init__(self, teacher: VisionTower, cfg: MaskEmbedConfig, transform: Optional[ImageTransform] = None):
        super().__init__()
        self.cfg = cfg
        self.transform = transform  # the teacher's preprocessing, saved beside the student
        self.student = copy.deepcopy(teacher)
        self.student.requires_grad_(True)
        norm = final_norm(self.student)  # student_utils: reset output norms (ResNet has none)
        if hasattr(norm, "reset_parameters"):
            norm.reset_parameters()
        pooling_head = siglip_pooling_head(self.student)
        if pooling_head is not None:
            pooling_head.requires_grad_(False)  # the reference drops attn_pool; kept frozen for export
        self.skip_blocks = -1 - cfg.teacher_layer
        self.teacher = drop_last_blocks(teacher, self.skip_blocks)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        width = tower_width(teacher)
        self.patch_size = tower_patch_size(teacher)
        self.num_patches = num_patches(teacher)
        self.num_prefix = num_prefix_tokens(teacher)
        self.student_head = nn.Linear(width, width)  # student_utils: model.head, zero-initialised
        nn.init.zeros_(self.student_head.weight)
        nn.init.zeros_(self.student_head.bias)
        act = str(getattr(teacher.config, "hidden_act", "gelu"))
        self.decoder = MaskEmbedDecoder(width, self.num_patches, self.num_prefix, cfg.decoder_layers,
                                        cfg.decoder_heads, width, act=act if act in ACT2FN else "gelu")
        self.register_buffer("target_scale", torch.tensor(float("nan")))

    def train(self, mode: bool = True) -> "MaskEmbedModel":
        """As ``nn.Module.train`` but the teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def raw_targets(self, pixel_values: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """Unscaled teacher targets [N, prefix+P, w] for pixels [N,3,H,W] and keep-masks [N,P]."""
        return maskembed_targets(self.teacher, pixel_values, views, self.patch_size, 1.0)

    def targets(self, pixel_values: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """Scaled teacher targets [N, prefix+P, w] for pixels [N,3,H,W] and keep-masks [N,P]."""
        return maskembed_targets(self.teacher, pixel_values, views, self.patch_size, self.target_scale)

    @torch.no_grad()
    def calibrate(self, batches: Union[torch.Tensor, Iterable[Union[torch.Tensor, dict]]]) -> float:
        """Set ``target_scale`` to the population std (ddof 0) of the unscaled targets over the first
        ``cfg.calibration_batches`` micro-batches of ``batches`` (pixel tensors [B,3,H,W] or batch
        dicts with ``pixel_values``; one tensor counts as one batch), each with its mask, complement
        and full view, masks drawn in order from one generator seeded ``CALIBRATION_SEED``.
        Returns the scale. Reference: scripts/train.py ``get_baseline_loss``."""
        if isinstance(batches, (torch.Tensor, dict)):
            batches = [batches]
        g = torch.Generator().manual_seed(CALIBRATION_SEED)
        device = self.target_scale.device
        count, mean, m2 = 0, 0.0, 0.0
        for batch in itertools.islice(batches, self.cfg.calibration_batches):
            pixel_values = (batch["pixel_values"] if isinstance(batch, dict) else batch).to(device)
            mask = sample_patch_masks(pixel_values.shape[0], self.num_patches, g).to(device)
            pixels, views = expand_views(pixel_values, mask)
            raw = self.raw_targets(pixels, views).double()
            n_b = raw.numel()
            mean_b = float(raw.mean())
            m2_b = float(((raw - mean_b) ** 2).sum())
            total = count + n_b  # Chan et al.'s merge of (count, mean, M2)
            delta = mean_b - mean
            mean += delta * n_b / total
            m2 += m2_b + delta * delta * count * n_b / total
            count = total
        if count == 0:
            raise ValueError("calibrate got no batches")
        scale = math.sqrt(m2 / count)
        if not scale > 0:
            raise ValueError(f"teacher targets have std {scale}; cannot rescale to unit variance")
        self.target_scale.fill_(scale)
        return scale

    def student_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """head(g(x)): pixels [B,3,H,W] -> [B, prefix+P, w], every token after the student's final norm."""
        return self.student_head(final_tokens(self.student, pixel_values))

    def predict(self, pixel_values: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """h(m * head(g(x))): pixels [B,3,H,W] (unmasked), keep-masks [kB,P] -> predictions [kB, prefix+P, w].

        The student sees the unmasked image, so its tokens are computed once per image and shared
        by that image's k views (``expand_views`` order: view v of image i is row v * B + i).
        """
        b, n = pixel_values.shape[0], views.shape[0]
        if n % b:
            raise ValueError(f"{n} views are not a whole number of views of {b} images")
        student = self.student_tokens(pixel_values).repeat(n // b, 1, 1)
        return self.decoder(student, views)

    def forward(self, batch: dict) -> dict:
        if not torch.isfinite(self.target_scale):
            raise RuntimeError("MaskEmbedModel.calibrate(batches) must run before training")
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


__all__ = ["CALIBRATION_SEED", "LAYER_SCALE_INIT", "DecoderBlock", "LayerScale", "MaskEmbedDecoder",
           "MaskEmbedModel", "apply_pixel_mask", "drop_last_blocks", "expand_views", "final_tokens",
           "maskembed_loss", "maskembed_targets", "num_prefix_tokens", "sample_patch_masks",
           "siglip_pooling_head"]
