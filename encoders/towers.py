"""Vision towers: build one from sizes, load one from a local directory, read its patch tokens.

Towers are stock ``transformers`` models, so a tower saved here loads with stock code and any local
HF checkpoint of these classes loads here: ViTs (``CLIPVisionModel``, ``SiglipVisionModel``,
``Siglip2VisionModel``, ``Dinov2Model``, timm ViTs through ``TimmWrapperModel``) and convolutional
towers (``ResNetModel``, ``ConvNextModel``); ``TOWER_CLASSES`` has one entry (config.json
``model_type``) per family.

Patch tokens (``patch_tokens``) are the last layer's per-patch hidden states after the tower's
final norm, without CLS:
- CLIP: ``last_hidden_state`` is [B, 1+P, w] *before* ``post_layernorm`` (stock CLIP applies that
  norm to the pooled CLS only), so the CLS row is dropped and ``post_layernorm`` is applied to
  the patch rows here.
- SigLIP: there is no CLS token and ``last_hidden_state`` [B, P, w] is already post-LayerNorm.
- SigLIP 2 (NaFlex) takes patchified pixels with a mask and each image's patch grid; ours get the
  full fixed square grid of their [B,3,S,S] input (``siglip2_inputs``), then as SigLIP.
- timm (``TimmWrapperModel``, ViT-style models): ``forward_features`` is already normed; its prefix
  tokens (CLS, registers: ``num_prefix_tokens``) are dropped.
- Conv towers: the last stage's feature map [B, C, h, w] flattened row-major to [B, h*w, C] (so
  patch k is grid cell (k // w, k % w), as a ViT's), then the tower's final norm. ConvNeXt has one:
  its stock ``layernorm`` over channels, which stock code applies to the pooled vector only (as
  CLIP's ``post_layernorm``), applied here to every patch. ResNet has none (its blocks end in
  BatchNorm, residual add, ReLU); its final norm is the identity, so the tower's own weights are the
  whole patch path and stage one, the evals, MaskEmbed and stage two read the same tokens from a
  stock ``ResNetModel``. A conv tower's total stride is its ``patch_size`` (``tower_patch_size``);
  ``config.json`` carries ``image_size`` (ConvNeXt's own field; an extra key for ResNet).

Stage two reads other features (``vision_features``, as HF LLaVA's ``get_image_features``):
``hidden_states[vision_feature_layer]`` (before the final norm), CLS dropped or kept. A conv
tower's ``hidden_states`` are the stem's output then each stage's (NCHW, flattened here).

``ImageTransform`` reproduces ``CLIPImageProcessor`` (shortest-edge bicubic resize, centre crop,
rescale to [0, 1], normalise) without torchvision and saves itself as a ``CLIPImageProcessor``
config, so stock code preprocesses our towers' inputs identically.
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import transformers
from PIL import Image
from torch import nn
from transformers import (CLIPVisionConfig, CLIPVisionModel, ConvNextConfig, ConvNextModel, Dinov2Config, Dinov2Model,
                          ResNetConfig, ResNetModel, Siglip2VisionModel, SiglipVisionConfig, SiglipVisionModel,
                          TimmWrapperModel)

from vlm.config import CONV_STEM_STRIDE, VisionTowerConfig
from vlm.extras import require
from vlm.files import loading_weights, read_json

VisionTower = Union[CLIPVisionModel, SiglipVisionModel, Siglip2VisionModel, Dinov2Model, ResNetModel, ConvNextModel,
                    TimmWrapperModel]
ConvTower = Union[ResNetModel, ConvNextModel]
CONV_TOWERS = (ResNetModel, ConvNextModel)
# config.json model_type -> stock class (a full CLIP / SigLIP dir loads its vision half)
TOWER_CLASSES = {"clip": CLIPVisionModel, "clip_vision_model": CLIPVisionModel, "siglip": SiglipVisionModel,
                 "siglip_vision_model": SiglipVisionModel, "dinov2": Dinov2Model, "resnet": ResNetModel,
                 "convnext": ConvNextModel, "siglip2": Siglip2VisionModel, "siglip2_vision_model": Siglip2VisionModel,
                 "timm_wrapper": TimmWrapperModel}
SIGLIP_TOWERS = (SiglipVisionModel, Siglip2VisionModel)  # no CLS; last_hidden_state already post-LayerNorm

# OpenAI CLIP's statistics; SigLIP towers use 0.5 / 0.5 (what their checkpoints ship with).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # what HF's ResNet / ConvNeXt processors ship with
IMAGENET_STD = (0.229, 0.224, 0.225)

PREPROCESSOR_FILE = "preprocessor_config.json"


class ImageTransform:
    """PIL image or uint8 array [H,W,3] -> float tensor [3, image_size, image_size].

    Equal to ``CLIPImageProcessor(size={"shortest_edge": s}, crop_size=s, resample=...)``: resize
    the shorter side to ``image_size``, centre-crop a square, scale to [0, 1], normalise with
    ``mean`` / ``std``. With ``square_resize`` (SigLIP's processors: ``size={"height": s, "width": s}``,
    no crop) the image is resized to s x s directly. ``resample`` is a PIL filter code (3 = bicubic,
    CLIP's; 2 = bilinear, SigLIP's). ``resize_edge`` (default s) is the side the shorter edge is
    resized to before the s x s centre crop (ImageNet-style ``crop_pct``: ConvNeXt / ResNet
    processors resize to int(s / crop_pct)). Greyscale / RGBA inputs are converted to RGB.
    """

    def __init__(self, image_size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 resample: int = 3, square_resize: bool = False, resize_edge: Optional[int] = None):
        if image_size <= 0:
            raise ValueError(f"image_size must be > 0, got {image_size}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values each (std > 0), got {mean}, {std}")
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.resample = int(resample)
        self.square_resize = bool(square_resize)
        self.resize_edge = self.image_size if resize_edge is None else int(resize_edge)
        if self.resize_edge < self.image_size:
            raise ValueError(f"resize_edge {self.resize_edge} is smaller than the {self.image_size}-px crop")
        self._mean = torch.tensor(self.mean).view(3, 1, 1)
        self._std = torch.tensor(self.std).view(3, 1, 1)

    def __repr__(self) -> str:
        return (f"ImageTransform(image_size={self.image_size}, mean={self.mean}, std={self.std}, "
                f"resample={self.resample}, square_resize={self.square_resize}, resize_edge={self.resize_edge})")

    def _resize_crop(self, image: Image.Image) -> Image.Image:
        s = self.image_size
        w, h = image.size
        if self.square_resize:
            return image if (w, h) == (s, s) else image.resize((s, s), resample=self.resample)
        r = self.resize_edge
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(r * long / short)  # as transformers' shortest-edge rule
        new_w, new_h = (r, new_long) if w <= h else (new_long, r)
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), resample=self.resample)
        top, left = (new_h - s) // 2, (new_w - s) // 2
        if (new_w, new_h) != (s, s):
            image = image.crop((left, top, left + s, top + s))
        return image

    def _at_size(self, image: object) -> bool:
        """Whether ``image`` is a uint8 array [S,S,3] already at the input size (nothing to resize or crop)."""
        s = self.image_size
        return isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.shape == (s, s, 3)

    def _normalise(self, pixels: np.ndarray) -> torch.Tensor:
        """uint8 [..., S, S, 3] -> float [..., 3, S, S]: scaled to [0, 1], then normalised."""
        x = torch.from_numpy(np.array(pixels)).movedim(-1, -3).float() / 255.0
        return (x - self._mean) / self._std

    def __call__(self, image: Union[Image.Image, np.ndarray]) -> torch.Tensor:
        if self._at_size(image):
            return self._normalise(image)  # what the PIL path gives when there is no resize or crop
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"expected a uint8 array [H,W,3], got {image.dtype} {image.shape}")
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL image or uint8 array, got {type(image).__name__}")
        if image.mode != "RGB":
            image = image.convert("RGB")
        return self._normalise(np.asarray(self._resize_crop(image), dtype=np.uint8))

    def batch(self, images: Sequence[Union[Image.Image, np.ndarray]]) -> torch.Tensor:
        """A list of images -> [B, 3, image_size, image_size]. uint8 arrays already at the input size
        (the world's pre-decoded arrays) are normalised together in one vectorised pass."""
        if images and all(self._at_size(im) for im in images):
            return self._normalise(np.stack(images))
        return torch.stack([self(im) for im in images])

    def processor_config(self) -> dict:
        """The equivalent ``CLIPImageProcessor`` arguments."""
        s = self.image_size
        size = {"height": s, "width": s} if self.square_resize else {"shortest_edge": self.resize_edge}
        return dict(do_resize=True, size=size, resample=self.resample, do_center_crop=not self.square_resize,
                    crop_size={"height": s, "width": s}, do_rescale=True, rescale_factor=1 / 255,
                    do_normalize=True, image_mean=list(self.mean), image_std=list(self.std),
                    do_convert_rgb=True)

    def image_processor(self):
        """The equivalent ``transformers.CLIPImageProcessor``. Where torchvision is absent,
        transformers' PIL backend (``CLIPImageProcessorPil``, which saves the same file with
        ``image_processor_type: CLIPImageProcessor``) is used directly, avoiding the fallback warning."""
        processor_cls = getattr(transformers, "CLIPImageProcessorPil", None)
        if processor_cls is None or importlib.util.find_spec("torchvision") is not None:
            processor_cls = transformers.CLIPImageProcessor
        return processor_cls(**self.processor_config())

    def save_pretrained(self, directory: Union[str, Path]) -> None:
        """Write ``directory/preprocessor_config.json`` (``image_processor``)."""
        self.image_processor().save_pretrained(str(directory))

    @classmethod
    def from_pretrained(cls, directory: Union[str, Path]) -> "ImageTransform":
        """Read ``directory/preprocessor_config.json`` (a CLIP or SigLIP image-processor config).

        Supports ``size`` as ``{"shortest_edge": r}`` with a square ``crop_size`` of s <= r (CLIP:
        s = r), ``{"height": s, "width": s}`` without a crop (SigLIP: a plain square resize), and
        ConvNeXt's processor (also ResNet's): ``{"shortest_edge": s}`` with ``crop_pct``, resized to
        int(s / crop_pct) then cropped to s (s >= 384: a square resize). Other layouts raise
        ``ValueError``.
        """
        path = Path(directory) / PREPROCESSOR_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no {PREPROCESSOR_FILE} in {directory}")
        cfg = json.loads(path.read_text())
        size = cfg.get("size", {})
        square, resize_edge = False, None
        if isinstance(size, int):
            side = size
        elif "shortest_edge" in size and "crop_pct" in cfg:  # ConvNextImageProcessor's own resize rule
            side = size["shortest_edge"]
            square = side >= 384
            resize_edge = None if square else int(side / cfg["crop_pct"])
        elif "shortest_edge" in size:
            side = resize_edge = size["shortest_edge"]
            crop = cfg.get("crop_size") or {"height": side, "width": side}
            if cfg.get("do_center_crop", True):
                if crop.get("height") != crop.get("width") or crop.get("height", side) > side:
                    raise ValueError(f"{path}: crop_size {crop} is not a square within shortest_edge {side}; "
                                     "unsupported")
                side = crop["height"]
        elif "height" in size and size.get("height") == size.get("width"):
            side, square = size["height"], True
            crop = cfg.get("crop_size") or {"height": side, "width": side}
            if cfg.get("do_center_crop", False) and (crop.get("height") != side or crop.get("width") != side):
                raise ValueError(f"{path}: crop_size {crop} differs from size {size}; unsupported")
        else:
            raise ValueError(f"{path}: unsupported size {size}")
        mean = cfg.get("image_mean", CLIP_MEAN)
        std = cfg.get("image_std", CLIP_STD)
        if not cfg.get("do_normalize", True):
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        return cls(int(side), mean, std, resample=int(cfg.get("resample", 3)), square_resize=square,
                   resize_edge=resize_edge)


def _build_vit(cfg: VisionTowerConfig) -> VisionTower:
    """``CLIPVisionModel`` or ``SiglipVisionModel`` (with its attention-pooling head) from sizes; sdpa."""
    common = dict(hidden_size=cfg.hidden_size, intermediate_size=cfg.hidden_size * cfg.mlp_ratio,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_channels=3,
                  image_size=cfg.image_size, patch_size=cfg.patch_size)
    if cfg.arch == "clip":
        config = CLIPVisionConfig(**common, hidden_act="quick_gelu")
        config._attn_implementation = "sdpa"
        return CLIPVisionModel(config)
    if cfg.arch == "dinov2":  # CLS + patches, LayerScale blocks, a final layernorm applied in its forward
        config = Dinov2Config(**{k: v for k, v in common.items() if k != "intermediate_size"}, mlp_ratio=cfg.mlp_ratio)
        config._attn_implementation = "sdpa"
        return Dinov2Model(config)
    config = SiglipVisionConfig(**common, vision_use_head=True)
    config._attn_implementation = "sdpa"
    return SiglipVisionModel(config)


def _build_resnet(cfg: VisionTowerConfig) -> ResNetModel:
    """``ResNetModel`` with basic blocks (ResNet-18 style): stem of width ``stage_widths[0]``, then
    ``stage_depths[i]`` blocks of ``stage_widths[i]`` channels per stage. ``image_size`` is an extra
    ``config.json`` key (ResNetConfig has none; stock ``from_pretrained`` keeps it)."""
    config = ResNetConfig(embedding_size=cfg.stage_widths[0], hidden_sizes=list(cfg.stage_widths),
                          depths=list(cfg.stage_depths), layer_type="basic", image_size=cfg.image_size)
    return ResNetModel(config)


def _build_convnext(cfg: VisionTowerConfig) -> ConvNextModel:
    """``ConvNextModel``: a 4x4 stride-4 patchify stem, then ``stage_depths[i]`` ConvNeXt blocks of
    ``stage_widths[i]`` channels per stage (stock init: LayerScale 1e-6, no stochastic depth)."""
    config = ConvNextConfig(patch_size=CONV_STEM_STRIDE, num_stages=len(cfg.stage_widths),
                            hidden_sizes=list(cfg.stage_widths), depths=list(cfg.stage_depths),
                            image_size=cfg.image_size)
    return ConvNextModel(config)


TOWER_BUILDERS = {"clip": _build_vit, "siglip": _build_vit, "dinov2": _build_vit, "resnet": _build_resnet,
                  "convnext": _build_convnext}


def build_vision_tower(cfg: VisionTowerConfig) -> VisionTower:
    """A randomly initialised (or, with ``cfg.pretrained``, loaded) vision tower, by ``cfg.arch``:
    clip -> ``CLIPVisionModel``, siglip -> ``SiglipVisionModel``, resnet -> ``ResNetModel``,
    convnext -> ``ConvNextModel``."""
    if cfg.pretrained:
        return load_vision_tower(cfg.pretrained)[0]
    if cfg.arch not in TOWER_BUILDERS:
        raise ValueError(f"unknown vision arch {cfg.arch!r}; valid: {sorted(TOWER_BUILDERS)}")
    tower = TOWER_BUILDERS[cfg.arch](cfg)
    if tower_patch_size(tower) != cfg.patch_size:
        raise ValueError(f"vision.patch_size={cfg.patch_size} but the built {cfg.arch} tower has total stride "
                         f"{tower_patch_size(tower)}")
    return tower


def is_conv_tower(tower: nn.Module) -> bool:
    """True for a convolutional tower (``ResNetModel``, ``ConvNextModel``): no CLS, NCHW feature maps."""
    return isinstance(tower, CONV_TOWERS)


def _conv_strides(tower: ConvTower) -> list[int]:
    """Stride in pixels of each entry of a conv tower's ``hidden_states``: the stem's output, then
    each stage's. ResNet's stem is a stride-2 conv and a stride-2 max-pool; ConvNeXt's a patchify
    conv of stride ``config.patch_size``; each later stage (and, with ``downsample_in_first_stage``,
    ResNet's first) halves the grid."""
    c = tower.config
    if isinstance(tower, ResNetModel):
        stem, halvings = 4, [i + int(c.downsample_in_first_stage) for i in range(len(c.depths))]
    else:
        stem, halvings = int(c.patch_size), list(range(int(c.num_stages)))
    return [stem] + [stem * 2 ** k for k in halvings]


def tower_patch_size(tower: VisionTower) -> int:
    """Pixels per patch-grid cell: a ViT's ``patch_size``, a conv tower's total stride (a timm model's
    last feature's ``reduction``)."""
    if isinstance(tower, TimmWrapperModel):
        return int(tower.timm_model.feature_info[-1]["reduction"])
    return _conv_strides(tower)[-1] if is_conv_tower(tower) else int(tower.config.patch_size)


def tower_image_size(tower: VisionTower) -> int:
    """The input side the tower is built for (``config.image_size``; a timm ViT's ``patch_embed.img_size``;
    SigLIP 2: the side of its square ``num_patches`` grid)."""
    size = getattr(tower.config, "image_size", None)
    if size is None and isinstance(tower, TimmWrapperModel):
        size = getattr(getattr(tower.timm_model, "patch_embed", None), "img_size", (None,))[-1]
    if size is None and isinstance(tower, Siglip2VisionModel):
        size = math.isqrt(int(tower.config.num_patches)) * int(tower.config.patch_size)
    if size is None:
        raise ValueError(f"{type(tower).__name__} config has no image_size; ours write it to config.json (a "
                         "stock checkpoint needs a preprocessor_config.json beside it to give the size)")
    return int(size)


def default_transform(tower: VisionTower) -> ImageTransform:
    """The tower's input size with the usual statistics of its family (CLIP, SigLIP, or ImageNet's
    for ResNet / ConvNeXt), CLIP-style resize and crop except SigLIP's square resize."""
    if isinstance(tower, SIGLIP_TOWERS):
        return ImageTransform(tower_image_size(tower), SIGLIP_MEAN, SIGLIP_STD, resample=2, square_resize=True)
    if isinstance(tower, TimmWrapperModel):  # the statistics its pretrained_cfg names (ImageNet's by default)
        data = tower.timm_model.pretrained_cfg
        return ImageTransform(tower_image_size(tower), data.get("mean", IMAGENET_MEAN), data.get("std", IMAGENET_STD),
                              resample=2 if data.get("interpolation") == "bilinear" else 3)
    if is_conv_tower(tower) or isinstance(tower, Dinov2Model):
        return ImageTransform(tower_image_size(tower), IMAGENET_MEAN, IMAGENET_STD)
    return ImageTransform(tower.config.image_size, CLIP_MEAN, CLIP_STD)


def _resolve_vision_dir(path: Path) -> Path:
    """The directory holding the vision ``config.json``: ``path/vision`` for our checkpoints."""
    if (path / "vision" / "config.json").is_file():
        return path / "vision"
    if (path / "config.json").is_file():
        return path
    raise FileNotFoundError(f"{path}: no config.json here or in {path / 'vision'}; expected a stage-one / "
                            "MaskEmbed checkpoint dir or a local HF vision model dir (TOWER_CLASSES)")


def load_vision_tower(path: Union[str, Path]) -> tuple[VisionTower, ImageTransform]:
    """Load a tower and its preprocessing from a local directory.

    Accepts our stage-one checkpoint (``path/vision``), a MaskEmbed output dir (a plain vision
    dir), or any local HF directory whose ``model_type`` is in ``TOWER_CLASSES`` (clip,
    clip_vision_model, siglip, siglip_vision_model, siglip2, siglip2_vision_model, dinov2, resnet,
    convnext, timm_wrapper (needs the ``timm`` extra); a full CLIP/SigLIP dir loads its vision half).
    The transform comes from ``preprocessor_config.json`` when present (``_read_transform``), else the
    family default at the config's size; a stock ResNet dir without our ``image_size`` key takes the
    preprocessor's size. Never executes remote code.
    """
    directory = _resolve_vision_dir(Path(path))
    model_type = read_json(directory / "config.json", "model config").get("model_type", "")
    if model_type not in TOWER_CLASSES:
        raise ValueError(f"{directory}/config.json: model_type {model_type!r} is not a supported vision tower "
                         f"(supported: {', '.join(TOWER_CLASSES)})")
    tower_cls = TOWER_CLASSES[model_type]
    if tower_cls is TimmWrapperModel:
        require("timm", "timm", f"{directory} (a timm vision tower)")
    kwargs = {} if tower_cls in CONV_TOWERS else dict(attn_implementation="sdpa")
    with loading_weights(directory, "vision tower"):
        tower = tower_cls.from_pretrained(str(directory), use_safetensors=True, **kwargs)
    transform = _read_transform(directory, tower) if (directory / PREPROCESSOR_FILE).is_file() else None
    if getattr(tower.config, "image_size", None) is None and transform is not None:
        tower.config.image_size = transform.image_size
    transform = transform or default_transform(tower)
    if transform.image_size != tower_image_size(tower):
        raise ValueError(f"{directory}: preprocessor size {transform.image_size} != tower image_size "
                         f"{tower_image_size(tower)}")
    if tower_image_size(tower) % tower_patch_size(tower):
        raise ValueError(f"{directory}: image_size {tower_image_size(tower)} is not a multiple of the tower's "
                         f"patch size (total stride) {tower_patch_size(tower)}")
    return tower, transform


def _read_transform(directory: Path, tower: VisionTower) -> Optional[ImageTransform]:
    """The ``ImageTransform`` of ``directory/preprocessor_config.json``. Two stock processors are not
    CLIP-style: ``Siglip2ImageProcessor`` (NaFlex: up to ``max_num_patches`` patches at the image's
    aspect ratio) becomes a square resize to the grid of ``isqrt(max_num_patches)`` patches a side,
    which is what NaFlex gives a square image; ``TimmWrapperImageProcessor`` (the model's
    ``pretrained_cfg``) becomes ``default_transform``."""
    cfg = read_json(directory / PREPROCESSOR_FILE, "image processor config")
    if "max_num_patches" in cfg:
        side = math.isqrt(int(cfg["max_num_patches"])) * int(cfg.get("patch_size", tower_patch_size(tower)))
        return ImageTransform(side, cfg.get("image_mean", SIGLIP_MEAN), cfg.get("image_std", SIGLIP_STD),
                              resample=int(cfg.get("resample", 2)), square_resize=True)
    if cfg.get("image_processor_type") == "TimmWrapperImageProcessor":
        return None
    return ImageTransform.from_pretrained(directory)


def pool_patch_grid(patches: torch.Tensor, how: str) -> torch.Tensor:
    """Patch tokens [B,P,w] -> [B,w]: their channel-wise "max" or their "mean"."""
    if how == "max":
        return patches.amax(dim=1)
    if how == "mean":
        return patches.mean(dim=1)
    raise ValueError(f"pool_patch_grid pools by 'max' or 'mean', got {how!r}")


def tower_width(tower: VisionTower) -> int:
    """Hidden width w of the tower's tokens (a conv tower's last-stage channels)."""
    if isinstance(tower, TimmWrapperModel):
        return int(tower.timm_model.num_features)
    return int(tower.config.hidden_sizes[-1]) if is_conv_tower(tower) else int(tower.config.hidden_size)


def grid_side(tower: VisionTower) -> int:
    """Patches per side of the grid: image_size / patch_size (total stride for a conv tower)."""
    return tower_image_size(tower) // tower_patch_size(tower)


def num_patches(tower: VisionTower) -> int:
    """Number of patch tokens P = (image_size / patch_size)^2."""
    return grid_side(tower) ** 2


def final_norm(tower: VisionTower) -> nn.Module:
    """The norm the tower's patch tokens end with: CLIP's / SigLIP's ``post_layernorm``, ConvNeXt's
    ``layernorm`` (over channels), and for ResNet, which has none after its last stage, the identity."""
    if isinstance(tower, ResNetModel):
        return nn.Identity()
    if isinstance(tower, (ConvNextModel, Dinov2Model)):
        return tower.layernorm
    if isinstance(tower, TimmWrapperModel):
        return tower.timm_model.norm
    return getattr(tower, "vision_model", tower).post_layernorm  # transformers 5 flattened CLIPVisionModel


def grid_tokens(tower: VisionTower, feature_map: torch.Tensor) -> torch.Tensor:
    """A conv tower's feature map [B,C,h,w] -> tokens [B,h*w,C] (row-major, as a ViT's patch order).
    Raises ``ValueError`` unless h = w = ``grid_side(tower)`` (inputs of ``image_size`` pixels)."""
    side = grid_side(tower)
    if feature_map.dim() != 4 or tuple(feature_map.shape[-2:]) != (side, side):
        raise ValueError(f"feature map {tuple(feature_map.shape)} is not the tower's {side}x{side} patch grid "
                         f"(image_size {tower_image_size(tower)} / patch_size {tower_patch_size(tower)}); "
                         f"feed {tower_image_size(tower)}-px images")
    return feature_map.flatten(2).transpose(1, 2)


def _check_pixels(pixel_values: torch.Tensor) -> None:
    if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"pixel_values must be [B,3,H,W], got {tuple(pixel_values.shape)}")


def siglip2_inputs(tower: Siglip2VisionModel, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
    """pixel_values [B,3,H,W] -> SigLIP 2's NaFlex inputs for a full, fixed grid of h x w patches:
    ``pixel_values`` [B, h*w, p*p*3] (row-major patches, each flattened (row, column, channel) as
    ``Siglip2ImageProcessor``'s ``convert_image_to_patches``), ``pixel_attention_mask`` all ones and
    ``spatial_shapes`` [[h, w]] * B (the tower interpolates its position grid to h x w)."""
    b, c, height, width = pixel_values.shape
    p = int(tower.config.patch_size)
    h, w = height // p, width // p
    patches = pixel_values.reshape(b, c, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(b, h * w, p * p * c)
    mask = torch.ones(b, h * w, dtype=torch.long, device=patches.device)
    return dict(pixel_values=patches, pixel_attention_mask=mask,
                spatial_shapes=torch.tensor([[h, w]] * b, dtype=torch.long, device=patches.device))


def _run_tower(tower: VisionTower, pixel_values: torch.Tensor, output_hidden_states: bool = False):
    """The tower's own forward on [B,3,H,W] pixels (SigLIP 2's through ``siglip2_inputs``)."""
    if isinstance(tower, Siglip2VisionModel):
        return tower(**siglip2_inputs(tower, pixel_values), output_hidden_states=output_hidden_states)
    return tower(pixel_values=pixel_values, output_hidden_states=output_hidden_states)


def tower_forward(tower: VisionTower, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass -> (patch_tokens [B,P,w] after the final norm without CLS, pooled [B,w]).

    pooled is the tower's own pooled output: CLIP's post-LayerNorm CLS token, SigLIP's
    attention-pooling head (the mean of patch tokens if the head is disabled), a conv tower's
    ``pooler_output`` (ResNet: the average of the last feature map; ConvNeXt: its layernorm of
    that average).
    """
    _check_pixels(pixel_values)
    out = _run_tower(tower, pixel_values)
    if is_conv_tower(tower):
        patches = final_norm(tower)(grid_tokens(tower, out.last_hidden_state))
        return patches, out.pooler_output.flatten(1)
    if isinstance(tower, TimmWrapperModel):  # forward_features: already normed, prefix (CLS, register) tokens first
        feats = out.last_hidden_state
        patches = grid_tokens(tower, feats) if feats.dim() == 4 else feats[:, tower.timm_model.num_prefix_tokens:]
        return patches, out.pooler_output
    if isinstance(tower, SIGLIP_TOWERS):
        patches = out.last_hidden_state
        pooled = out.pooler_output if out.pooler_output is not None else patches.mean(dim=1)
        return patches, pooled
    if isinstance(tower, Dinov2Model):  # its last_hidden_state is already layernormed; pooled = that CLS
        return out.last_hidden_state[:, 1:], out.pooler_output
    patches = final_norm(tower)(out.last_hidden_state[:, 1:, :])
    return patches, out.pooler_output


def patch_tokens(tower: VisionTower, pixel_values: torch.Tensor) -> torch.Tensor:
    """pixel_values [B,3,H,W] -> patch tokens [B,P,w]: no CLS, after the final norm."""
    return tower_forward(tower, pixel_values)[0]


# ----------------------------------------------------------------------------------------------
# Stage-two features (HF LLaVA's ``vision_feature_layer`` / ``vision_feature_select_strategy``)
# ----------------------------------------------------------------------------------------------

FEATURE_SELECT_STRATEGIES = ("default", "full")


def _tower_parts(tower: VisionTower) -> tuple[nn.ModuleList, nn.Module, Optional[nn.Module]]:
    """(blocks whose outputs are ``hidden_states[1:]``, final norm, SigLIP's pooling head or None):
    a ViT's encoder layers, a conv tower's stages."""
    if is_conv_tower(tower):
        return tower.encoder.stages, final_norm(tower), None
    if isinstance(tower, Dinov2Model):
        return tower.encoder.layer, tower.layernorm, None
    if isinstance(tower, TimmWrapperModel):
        if not hasattr(tower.timm_model, "blocks"):
            raise ValueError(f"timm model {type(tower.timm_model).__name__} has no `blocks`; a timm tower must be a "
                             "ViT-style model (blocks, norm, forward_intermediates)")
        return tower.timm_model.blocks, tower.timm_model.norm, None
    core = getattr(tower, "vision_model", tower)  # transformers 5 flattened CLIPVisionModel
    return core.encoder.layers, core.post_layernorm, getattr(core, "head", None)


def feature_layer_index(tower: VisionTower, layer: Optional[int]) -> Optional[int]:
    """``layer`` as a non-negative index into ``hidden_states`` (L+1 entries: embeddings, then each
    of the L blocks' outputs; a conv tower's: the stem's, then each stage's); None stays None.
    Raises ``ValueError`` when out of range, or, for a conv tower, when that entry's grid is not the
    patch grid (the stage-two token count is P)."""
    if layer is None:
        return None
    n = len(_tower_parts(tower)[0]) + 1
    if not -n <= layer < n:
        raise ValueError(f"vision_feature_layer={layer} is out of range for a tower with {n - 1} blocks "
                         f"(hidden_states has {n} entries: {-n}..{n - 1})")
    if is_conv_tower(tower):
        strides = _conv_strides(tower)
        if strides[layer] != strides[-1]:
            side = tower_image_size(tower) // strides[layer]
            raise ValueError(f"vision_feature_layer={layer} selects a {side}x{side} feature map of this "
                             f"{type(tower).__name__}, not its {grid_side(tower)}x{grid_side(tower)} patch grid; "
                             "use -1 (the last stage's output) or a layer with the same stride")
    return layer % n


def vision_features(tower: VisionTower, pixel_values: torch.Tensor, layer: Optional[int] = -2,
                    strategy: str = "default") -> torch.Tensor:
    """pixel_values [B,3,H,W] -> image features [B,N,w] for a stage-two bridge, as HF LLaVA.

    Follows ``transformers.models.llava.modeling_llava.LlavaModel.get_image_features``:
    ``tower(pixel_values, output_hidden_states=True).hidden_states[layer]`` (index 0 is the
    embedding output, -1 the last block's output, -2 the penultimate block's: all *before* the
    tower's final LayerNorm), then ``strategy`` "default" drops the first token ``[:, 1:]`` and
    "full" keeps every token.

    - CLIP: token 0 is CLS, so "default" gives the P patch tokens and "full" 1+P tokens.
    - SigLIP has no CLS token. HF applies ``[:, 1:]`` regardless of the tower, so "default"
      drops SigLIP's first (top-left) *patch* (P-1 tokens); "full" keeps all P patches and is
      what HF's SigLIP-tower LLaVA-style configs use. Both are reproduced exactly here.
    - Conv towers (no HF LLaVA counterpart): ``hidden_states`` are the stem's and each stage's
      feature maps, flattened to [B, h*w, C]; -1 is the last stage's output (before ConvNeXt's
      final layernorm), -2 the stage before, accepted only when its grid is the patch grid
      (``feature_layer_index``). There is no CLS token, so both strategies keep all P patches.
    - SigLIP 2: as SigLIP. timm: ``hidden_states`` are ``forward_intermediates``' block outputs
      (NCHW, prefix tokens removed), so layer k >= 1 is block k's output as for the other ViTs and
      0 (the embeddings) is refused; both strategies keep all P patches.
    - ``layer=None`` (checkpoints written before these options existed): the tower's final
      output after its final norm (CLIP: ``post_layernorm`` on every row of the last block's
      output; SigLIP: ``last_hidden_state``; conv: ``patch_tokens``), then ``strategy`` as above.
      ``None`` with "default" on CLIP, with "full" on SigLIP and with either on a conv tower
      equals ``patch_tokens``.
    """
    if strategy not in FEATURE_SELECT_STRATEGIES:
        raise ValueError(f"vision_feature_select_strategy {strategy!r} is not one of {list(FEATURE_SELECT_STRATEGIES)}")
    _check_pixels(pixel_values)
    index = feature_layer_index(tower, layer)
    if isinstance(tower, TimmWrapperModel):
        if index is None:
            return tower_forward(tower, pixel_values)[0]
        if index == 0:
            raise ValueError("vision_feature_layer 0 (the embeddings) is not available from a timm tower "
                             "(forward_intermediates gives each block's output); use a block, e.g. -2")
        return grid_tokens(tower, _run_tower(tower, pixel_values, True).hidden_states[index - 1])
    out = _run_tower(tower, pixel_values, True)
    if is_conv_tower(tower):
        if index is None:
            return final_norm(tower)(grid_tokens(tower, out.hidden_states[-1]))
        return grid_tokens(tower, out.hidden_states[index])
    if index is None:
        feats = _tower_parts(tower)[1](out.hidden_states[-1])
    else:
        feats = out.hidden_states[index]
    return feats[:, 1:] if strategy == "default" else feats


def num_feature_tokens(tower: VisionTower, strategy: str = "default") -> int:
    """N, the tokens per image ``vision_features`` returns: P (+1 for CLIP's CLS), minus 1 for
    "default"; a conv tower's P for either strategy."""
    if is_conv_tower(tower) or isinstance(tower, TimmWrapperModel):
        return num_patches(tower)
    tokens = num_patches(tower) + (0 if isinstance(tower, SIGLIP_TOWERS) else 1)
    return tokens - 1 if strategy == "default" else tokens


def unused_feature_parameters(tower: VisionTower, layer: Optional[int]) -> list[nn.Parameter]:
    """Parameters that ``vision_features(tower, ., layer)`` never uses (they get no gradient).

    The blocks (a conv tower's stages) after ``layer``, the final norm (unless ``layer`` is None)
    and SigLIP's pooling head. A trainable tower freezes these, so every trainable parameter gets
    a gradient (what DDP without ``find_unused_parameters`` needs).
    """
    layers, norm, head = _tower_parts(tower)
    index = feature_layer_index(tower, layer)
    unused: list[nn.Module] = [] if index is None else [*layers[index:], norm]
    if head is not None:
        unused.append(head)
    return [p for m in unused for p in m.parameters()]


def tower_model_type(path: Union[str, Path]) -> str:
    """The ``model_type`` of the vision tower ``load_vision_tower(path)`` would load (e.g. "clip",
    "siglip_vision_model", "resnet"), read from its ``config.json`` without loading weights."""
    return str(read_json(_resolve_vision_dir(Path(path)) / "config.json", "model config").get("model_type", ""))
