"""Typed configs for every runnable recipe (stage one's is ``encoders.config.Stage1Config``).

Each recipe is a dataclass tree (model, data, optim, run) that round-trips to YAML through
OmegaConf structured configs. ``load_config`` merges, in order: the dataclass defaults, a YAML
file, then dotted ``key=value`` overrides from the command line. Unknown keys, wrong types and bad
values raise ``ConfigError`` before any work starts. ``save_config`` writes the resolved config
beside a run's outputs.

Sections chosen by name. A recipe field declared with ``chosen_by_name(choose, default)`` holds one
of several dataclasses, picked by the section's ``name`` key: ``load_config`` reads the last
``<field>.name`` the YAML or the overrides give (else the default's), calls ``choose(name)`` for the
dataclass and merges the layers onto *its* defaults, so keys of another choice are unknown keys.
Stage one's ``objective`` is such a field: its dataclasses live next to each loss
(``encoders/objectives/*.py``) and ``Stage1Config`` in ``encoders/config.py``, a layer up.

This module is at the bottom of the import graph: it imports only ``vlm.files`` (``VlmError``, atomic writes).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vlm.files import DEFAULT_MAX_IMAGE_PIXELS, VlmError, atomic_write_text

T = TypeVar("T")

# Registry keys are checked here (not by importing the registries, which live higher up) so that a
# typo fails before any model is built. Tests check these tuples equal the registries' keys.
OBJECTIVE_NAMES = ("clip", "siglip", "sparc", "flair")  # the pipelines' objective lists
VISION_ARCHS = ("clip", "siglip", "dinov2", "resnet", "convnext")
CONV_ARCHS = ("resnet", "convnext")  # convolutional towers: no CLS token, a stem of stride CONV_STEM_STRIDE
CONV_STEM_STRIDE = 4  # ResNet: stride-2 conv + stride-2 max-pool; ConvNeXt: a 4x4 stride-4 patchify conv
POOLS = ("cls", "mean", "max", "map")
BRIDGE_NAMES = ("projector", "flamingo")
PRECISIONS = ("fp32", "bf16")
# Kinds of turn in the world's LLaVA conversations and LM documents (``vlm.world.mix``); the
# short-answer kinds are answered with one word (Yes/No, True/False, a number).
LLAVA_TURN_KINDS = ("caption", "detail", "exist", "count", "spatial", "grounding")
SHORT_ANSWER_KINDS = ("exist", "count", "spatial")
# Weights of each kind per turn: yes/no, counts and true/false carry ~1/3 of the answer tokens
# (captions are ~15-50 tokens each, a box 9, a short answer 1 plus the end of turn).
DEFAULT_LLAVA_MIX = {"caption": 0.5, "detail": 0.5, "exist": 6.0, "count": 2.0, "spatial": 4.0, "grounding": 2.0}
LM_DOCUMENT_FORMATS = ("image", "standalone")
DOCUMENT_CONTEXTS = ("short", "long", "layout")  # the LM's image-document contexts (vlm.world.mix.CONTEXTS)
DISTRIBUTED = ("ddp", "fsdp")


class ConfigError(VlmError, ValueError):
    """A config file, override or value is invalid. The message names the key."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _one_of(value: str, key: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, key, f"{value!r} is not one of {list(choices)}")


def _check_turn_mix(mix: dict[str, float], key: str) -> None:
    """A turn-kind mix: keys in ``LLAVA_TURN_KINDS``, weights >= 0 with a positive sum."""
    unknown = sorted(set(mix) - set(LLAVA_TURN_KINDS))
    _check(not unknown, key, f"unknown kind(s) {unknown}; valid: {', '.join(LLAVA_TURN_KINDS)}")
    _check(all(w >= 0 for w in mix.values()) and sum(mix.values()) > 0, key, "weights must be >= 0 with a positive sum")


def _positive(cfg: Any, prefix: str, *names: str) -> None:
    """Each named field of ``cfg`` must be > 0 (checked before any division by it)."""
    for name in names:
        value = getattr(cfg, name)
        _check(value > 0, f"{prefix}.{name}", f"must be > 0, got {value}")


# ----------------------------------------------------------------------------------------------
# Shared pieces: optimisation and run bookkeeping (used by every training recipe)
# ----------------------------------------------------------------------------------------------


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``min_lr_ratio * lr``."""

    lr: float = 1e-3
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 50
    max_steps: int = 500
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    batch_size: int = 64  # per process, per micro-step
    # Adds up grad_accum batches of batch_size: a contrastive loss sees each batch's negatives only.
    grad_accum: int = 1
    # Stage one only: each batch of batch_size is split into accum_freq micro-batches, as open_clip's
    # accum_freq (features of all cached without grad, each recomputed with grad against the rest), so
    # the loss and gradient are the whole batch's with 1/accum_freq of the towers' activation memory.
    accum_freq: int = 1

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "optim.beta1/beta2", "must be in [0, 1)")
        _check(self.eps > 0, "optim.eps", f"must be > 0, got {self.eps}")
        _check(self.max_steps > 0, "optim.max_steps", f"must be > 0, got {self.max_steps}")
        _check(0 <= self.warmup_steps <= self.max_steps, "optim.warmup_steps", "must be in [0, max_steps]")
        _check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
        _check(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0")
        _check(self.batch_size > 0, "optim.batch_size", f"must be > 0, got {self.batch_size}")
        _check(self.grad_accum > 0, "optim.grad_accum", "must be > 0")
        _check(self.accum_freq > 0, "optim.accum_freq", f"must be > 0, got {self.accum_freq}")
        _check(self.batch_size % self.accum_freq == 0, "optim.accum_freq",
               f"must divide optim.batch_size={self.batch_size}, got {self.accum_freq}")


@dataclass
class RunConfig:
    """Where a run writes, how often it logs and checkpoints, and on what device."""

    out_dir: str = "runs/unnamed"
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 100  # steps between checkpoints (the final step is always saved)
    keep_last: int = 2  # checkpoints kept on disk
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "bf16"  # bf16 autocast on CUDA; on CPU only with cpu_bf16
    # Also autocast bf16 on CPU: pays only on CPUs with native bf16 matmuls (AMX / AVX512-BF16); on
    # the 2-core dev machine it halved samples/s (world LM 266 -> 143, SPARC stage one 222 -> 116).
    cpu_bf16: bool = False
    distributed: str = "ddp"  # ddp | fsdp (FSDP2 per layer, sharded checkpoints), used when launched under torchrun
    tensorboard: bool = True  # out_dir/tb
    wandb: bool = False  # Weights & Biases (the `wandb` extra), in wandb_project / wandb_entity
    wandb_project: str = "sparc-vlm"
    wandb_entity: str = ""  # "" = the W&B account's default entity
    run_name: str = ""  # the W&B run's name; "" = the out_dir's last folder
    progress: bool = True  # tqdm bar
    resume: bool = False  # continue from the latest checkpoint in out_dir/checkpoints

    def __post_init__(self) -> None:
        _check(bool(self.out_dir), "run.out_dir", "must not be empty")
        _check(bool(self.wandb_project) or not self.wandb, "run.wandb_project", "must not be empty with run.wandb")
        _check(self.log_every > 0, "run.log_every", "must be > 0")
        _check(self.ckpt_every > 0, "run.ckpt_every", "must be > 0")
        _check(self.keep_last >= 1, "run.keep_last", "must be >= 1")
        _one_of(self.device, "run.device", ("auto", "cpu", "cuda"))
        _one_of(self.precision, "run.precision", PRECISIONS)
        _one_of(self.distributed, "run.distributed", DISTRIBUTED)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


@dataclass
class WorldConfig:
    """The procedural synthetic world (see ``vlm.world``)."""

    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 4
    texture_prob: float = 0.5  # chance of a textured background
    # An object's square side as a fraction of the image side, [lo, hi], per size word.
    small_size: list[float] = field(default_factory=lambda: [0.16, 0.22])
    large_size: list[float] = field(default_factory=lambda: [0.30, 0.40])
    # Also export each train image's twin (one object's shape or colour changed) for image-side
    # hard negatives in stage one (``data.twin_fraction``).
    twins: bool = False
    n_train: int = 20000
    n_eval: int = 500
    seed: int = 0
    # The LLaVA export (and the world LM's documents): each conversation is ``llava_turns`` turns,
    # each of a kind drawn with these weights (keys ``LLAVA_TURN_KINDS``; 0 leaves a kind out).
    llava_mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LLAVA_MIX))
    llava_turns: int = 3
    llava_conversations: int = 2  # per train image

    def __post_init__(self) -> None:
        _check(16 <= self.image_size <= 224, "world.image_size", "must be in [16, 224]")
        _check(1 <= self.min_objects <= self.max_objects <= 8, "world.min_objects/max_objects",
               "need 1 <= min_objects <= max_objects <= 8")
        _check(0 <= self.texture_prob <= 1, "world.texture_prob", "must be in [0, 1]")
        for key in ("small_size", "large_size"):
            lo_hi = list(getattr(self, key))
            _check(len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1] <= 1, f"world.{key}",
                   f"must be [lo, hi] with 0 < lo <= hi <= 1, got {lo_hi}")
        _check(self.small_size[1] <= self.large_size[0], "world.small_size/large_size",
               "small objects must not be larger than large ones")
        _check(self.n_train > 0 and self.n_eval >= 0, "world.n_train/n_eval", "n_train > 0, n_eval >= 0")
        _check_turn_mix(self.llava_mix, "world.llava_mix")
        _check(self.llava_turns >= 1 and self.llava_conversations >= 1, "world.llava_turns/llava_conversations",
               "must be >= 1")


@dataclass
class ShardDataConfig:
    """Image-text pairs from img2dataset-style webdataset shards (stage one, MaskEmbed)."""

    shards: str = ""  # brace/glob pattern of .tar shards; "" = the embedded world's train shards
    world_dir: str = "runs/world"  # where the embedded world lives (exported on first use)
    shuffle_buffer: int = 1000
    num_workers: int = 0
    # Draw shards with replacement per rank and worker, no epochs (webdataset's resampled=True).
    resampled: bool = False
    max_text_len: int = 64
    # The embedded world's pre-decoded train arrays instead of its shards (same pixels, ~10x cheaper
    # to read; ignored when ``shards`` is set).
    world_arrays: bool = True
    # Fraction of each batch made of image-side twins (needs world.twins and world_arrays).
    twin_fraction: float = 0.0

    def __post_init__(self) -> None:
        _check(self.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0")
        _check(0 <= self.twin_fraction < 1, "data.twin_fraction", "must be in [0, 1)")
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _check(self.max_text_len > 1, "data.max_text_len", "must be > 1")


@dataclass
class LlavaDataConfig:
    """LLaVA-format conversation json plus an image folder (stage two)."""

    json: str = ""  # path to a LLaVA json; "" = the embedded world's llava/train.json
    image_root: str = ""  # folder the json's "image" paths are relative to
    world_dir: str = "runs/world"
    max_len: int = 160  # tokens, image tokens included
    num_workers: int = 0
    group_by_length: int = 0  # >0: batches of similar length from megabatches of this many batches (LLaVA's
    # group_by_modality_length): less padding, same examples per epoch; 0 = plain shuffle
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # larger images (by their header) are skipped and counted

    def __post_init__(self) -> None:
        _check(self.max_len > 8, "data.max_len", "must be > 8")
        _check(self.max_image_pixels > 0, "data.max_image_pixels", "must be > 0")
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _check(self.group_by_length >= 0, "data.group_by_length", "must be >= 0")


@dataclass
class TextDataConfig:
    """Plain text for pretraining the world's tiny LLM."""

    world_dir: str = "runs/world"
    text_files: list[str] = field(default_factory=list)  # extra .txt files, one document per line
    block_size: int = 96
    # Use the texts of only the first N train images (0 = all): the world's text is templated, so a
    # few thousand images give more tokens than a short LM run sees, at a fraction of the cost.
    max_world_samples: int = 0
    # "image": one document per image conversation (its caption, then questions with answers, in
    # stage two's text format with the caption where the image goes; ``vlm.world.mix``), packed whole
    # into blocks; "standalone": every text its own document, shuffled and cut into blocks.
    documents: str = "image"
    documents_per_image: int = 2
    turns_per_document: int = 4
    # Image documents: the contexts cycle over the corpus's documents (image i's document d takes
    # contexts[(i * documents_per_image + d) % len]): "short" / "long" caption, or "layout" (every
    # object with its box; adds grounding turns and every spatial statement; ``vlm.world.mix``).
    # Each document only asks what its context decides.
    contexts: list[str] = field(default_factory=lambda: ["short", "long"])
    # Image documents: what the BPE is trained on. "documents": their texts only (boxes and stage
    # two's other prompts, which they never hold, then tokenise one character at a time); "world":
    # also every text of the same world samples (a box is 9 tokens; ``training.lm.tokenizer_texts``).
    tokenizer_corpus: str = "documents"
    # Image documents: predict only the answers ("answers", as instruction tuning does: the loss
    # is then all on what must be read from the context) or every token ("all").
    loss_on: str = "answers"
    pack: bool = True  # image documents: several whole documents per block (False: one per block)
    # Image documents: the turn kinds' weights (``vlm.world.mix``); empty = the world's ``llava_mix``.
    # A document only draws the kinds its context decides (a box needs the layout context, a
    # detailed caption is never decided), so a mix may name them all.
    mix: dict[str, float] = field(default_factory=dict)
    group_by_length: int = 0  # >0: blocks of similar length per batch (see LlavaDataConfig); with pack=False

    def __post_init__(self) -> None:
        _one_of(self.documents, "data.documents", LM_DOCUMENT_FORMATS)
        _one_of(self.tokenizer_corpus, "data.tokenizer_corpus", ("documents", "world"))
        _check(len(self.contexts) > 0, "data.contexts", "needs at least one context")
        for c in self.contexts:
            _one_of(c, "data.contexts", DOCUMENT_CONTEXTS)
        _check(self.group_by_length >= 0, "data.group_by_length", "must be >= 0")
        if self.mix:
            _check_turn_mix(self.mix, "data.mix")
        _one_of(self.loss_on, "data.loss_on", ("answers", "all"))
        _check(self.documents_per_image >= 1 and self.turns_per_document >= 1,
               "data.documents_per_image/turns_per_document", "must be >= 1")
        _check(self.block_size >= 2, "data.block_size", "must be >= 2")
        _check(self.max_world_samples >= 0, "data.max_world_samples", "must be >= 0 (0 = all)")


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


@dataclass
class VisionTowerConfig:
    """A vision tower built from sizes, or loaded from a local HF checkpoint directory.

    ViTs (arch clip -> ``CLIPVisionModel``, siglip -> ``SiglipVisionModel``, dinov2 -> ``Dinov2Model``) read ``hidden_size``,
    ``num_layers``, ``num_heads``, ``mlp_ratio``. Convolutional towers (resnet -> ``ResNetModel`` with
    basic blocks, convnext -> ``ConvNextModel``) read ``stage_widths`` / ``stage_depths`` (channels and
    residual blocks per stage): a stem of stride 4, then every stage after the first halves the grid,
    so the total stride is 4 * 2^(stages - 1) and must equal ``patch_size`` (8 px: two stages; a
    64-px image then gives an 8x8 patch grid). The patch grid is image_size / patch_size per side.
    """

    arch: str = "clip"  # clip | siglip | dinov2 | resnet | convnext
    pretrained: str = ""  # local path; when set, the sizes below are ignored
    image_size: int = 64
    patch_size: int = 8  # ViT: the patch side; conv towers: the total stride (pixels per grid cell)
    hidden_size: int = 128  # ViT only
    num_layers: int = 4  # ViT only
    num_heads: int = 4  # ViT only
    mlp_ratio: int = 4  # ViT only
    stage_widths: list[int] = field(default_factory=lambda: [64, 128])  # conv towers only
    stage_depths: list[int] = field(default_factory=lambda: [2, 2])  # conv towers only

    def __post_init__(self) -> None:
        _one_of(self.arch, "vision.arch", VISION_ARCHS)
        if self.pretrained:
            return
        _positive(self, "vision", "image_size", "patch_size")
        _check(self.image_size % self.patch_size == 0, "vision.patch_size",
               f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if self.arch in CONV_ARCHS:
            self._check_stages()
        else:
            _positive(self, "vision", "hidden_size", "num_layers", "num_heads", "mlp_ratio")
            _check(self.hidden_size % self.num_heads == 0, "vision.num_heads",
                   "hidden_size must be divisible by num_heads")

    def _check_stages(self) -> None:
        n = len(self.stage_widths)
        _check(n >= 1 and len(self.stage_depths) == n, "vision.stage_widths/stage_depths",
               f"need one width and one depth per stage, got {list(self.stage_widths)} / {list(self.stage_depths)}")
        _check(min(self.stage_widths) > 0 and min(self.stage_depths) > 0, "vision.stage_widths/stage_depths",
               "must all be > 0")
        stride = CONV_STEM_STRIDE * 2 ** (n - 1)
        _check(self.patch_size == stride, "vision.patch_size",
               f"a {self.arch} tower with {n} stage(s) has total stride {CONV_STEM_STRIDE} * 2^{n - 1} = {stride}, "
               f"not {self.patch_size}; set patch_size={stride} or change the number of stages")


@dataclass
class TextTowerConfig:
    """A transformer text encoder and its tokenizer (a BPE trained on the world when not loaded)."""

    pretrained: str = ""  # local path of a text tower + tokenizer
    vocab_size: int = 1024
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    max_len: int = 64

    def __post_init__(self) -> None:
        if not self.pretrained:
            _positive(self, "text", "hidden_size", "num_layers", "num_heads", "max_len")
            _check(self.hidden_size % self.num_heads == 0, "text.num_heads",
                   "hidden_size must be divisible by num_heads")
            _check(self.vocab_size >= 64, "text.vocab_size", "must be >= 64")


ENCODER_CHOICES = ("pool", "global_mlp", "local_heads")  # the EncoderConfig fields an objective sets


@dataclass
class EncoderConfig:
    """The dual encoder (``encoders.dual_encoder``). ``pool``, ``global_mlp`` and ``local_heads`` left
    null are set by the stage-one objective (its paper's choice, see ``encoders.config``); a
    ``DualEncoder`` needs all three set."""

    vision: VisionTowerConfig = field(default_factory=VisionTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    embed_dim: int = 128  # width of the global and local projections
    # Global embeddings. "cls": the vision tower's pooled output (CLIP: post-LayerNorm CLS; SigLIP:
    # its attention-pooling head) and the text's last real token (CLIP's EOS pooling); "mean":
    # average of the patch tokens / of the non-padding text tokens (SPARC: no CLS).
    # "max": the max over patch tokens; "map": an attention-pooling head as SigLIP's (a learned probe
    # attending over the patch tokens, owned by the DualEncoder's heads). The text side pools with
    # its last token for "cls" and the mean of its tokens otherwise. A conv tower has no CLS token,
    # so "cls" with vision.arch resnet / convnext is an error.
    pool: Optional[str] = None
    map_heads: int = 4  # attention heads of the "map" pooling head (must divide the tower width)
    global_mlp: Optional[bool] = None  # one non-linear layer (Linear+GELU) before the image global projection
    # Separate per-patch / per-token linear adapters. False: the global heads are applied per token,
    # so patch_emb / token_emb still live in the shared space.
    local_heads: Optional[bool] = None

    def __post_init__(self) -> None:
        if self.pool is not None:
            _one_of(self.pool, "model.pool", POOLS)
        _check(not (self.pool == "cls" and self.vision.arch in CONV_ARCHS), "model.pool",
               f"'cls' with vision.arch={self.vision.arch}: a convolutional tower has no CLS token; set "
               "model.pool to mean, max or map")
        _check(self.embed_dim > 0, "model.embed_dim", "must be > 0")
        _check(self.map_heads > 0, "model.map_heads", "must be > 0")

    def unset(self) -> list[str]:
        """Keys of the objective-dependent choices still null, e.g. ``["model.pool"]``."""
        return [f"model.{k}" for k in ENCODER_CHOICES if getattr(self, k) is None]


@dataclass
class MaskEmbedConfig:
    """Locality alignment (MaskEmbed) post-training of a vision tower."""

    teacher: str = ""  # checkpoint dir of ours (stage one) or a local HF CLIP/SigLIP vision model
    decoder_layers: int = 2
    decoder_heads: int = 4
    # targets: the teacher minus its last -1-teacher_layer blocks (a conv tower: of its last stage), then its final norm
    teacher_layer: int = -2
    calibration_batches: int = 8  # micro-batches whose targets give the population std (target scale)

    def __post_init__(self) -> None:
        _check(self.decoder_layers >= 1, "maskembed.decoder_layers", "must be >= 1")
        _positive(self, "maskembed", "decoder_heads", "calibration_batches")
        _check(self.teacher_layer <= -1, "maskembed.teacher_layer",
               f"must be <= -1 (-2 = the last block removed), got {self.teacher_layer}")


@dataclass
class LoraConfig:
    enabled: bool = True
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])

    def __post_init__(self) -> None:
        _check(self.r > 0, "lora.r", "must be > 0")
        _check(self.alpha > 0, "lora.alpha", "must be > 0")
        _check(0 <= self.dropout < 1, "lora.dropout", f"must be in [0, 1), got {self.dropout}")
        _check(bool(self.target_modules), "lora.target_modules", "must name at least one module (or all-linear)")


@dataclass
class BridgeConfig:
    name: str = "projector"  # projector | flamingo
    num_latents: int = 16  # flamingo: perceiver resampler latents M
    # flamingo: perceiver resampler layers; 0: no resampler, the gated blocks attend to the P
    # projected patch tokens (Llama 3.2 Vision's cross-attention; num_latents is then unused)
    resampler_layers: int = 2
    xattn_every: int = 1  # flamingo: a gated cross-attention block before every k-th decoder layer
    num_heads: int = 4
    # projector: add a learned embedding per image token (the grid position) to the projected
    # tokens. A ViT's patch tokens carry their position; a conv tower's grid does not (only the
    # LLM's RoPE order tells the tokens apart), which left/right, above/below and boxes need.
    position_embedding: bool = False

    def __post_init__(self) -> None:
        _one_of(self.name, "bridge.name", BRIDGE_NAMES)
        _check(self.num_latents > 0 and self.xattn_every > 0, "bridge", "num_latents, xattn_every > 0")
        _check(self.resampler_layers >= 0, "bridge.resampler_layers", "must be >= 0")
        _positive(self, "bridge", "num_heads")
        _check(not self.position_embedding or self.name == "projector", "bridge.position_embedding",
               "is a projector option")


TRAIN_MODES = ("frozen", "lora", "full")


@dataclass
class ModuleTraining:
    """How stage two trains one module (``model.train.{tower,bridge,llm}``): ``mode`` frozen | lora |
    full ("" = the module's default: the tower as ``freeze_vision``, the bridge full, the LLM as
    ``lora.enabled``), and its own ``lr`` / ``weight_decay`` (null: ``optim.lr`` / ``optim.weight_decay``).
    LoRA adapters take ``model.lora``'s r, alpha and dropout."""

    mode: str = ""
    lr: Optional[float] = None
    weight_decay: Optional[float] = None

    def check(self, key: str, modes: tuple[str, ...]) -> None:
        """``ConfigError`` naming ``key`` on a mode outside ``modes`` or a non-positive lr / negative decay."""
        if self.mode:
            _one_of(self.mode, f"{key}.mode", modes)
        _check(self.lr is None or self.lr > 0, f"{key}.lr", f"must be > 0 or null, got {self.lr}")
        _check(self.weight_decay is None or self.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0 or null")


@dataclass
class TrainingControl:
    """Per-module training of stage two: the tower, the bridge (frozen | full) and the LLM."""

    tower: ModuleTraining = field(default_factory=ModuleTraining)
    bridge: ModuleTraining = field(default_factory=ModuleTraining)
    llm: ModuleTraining = field(default_factory=ModuleTraining)


@dataclass
class VLMConfig:
    """Stage two: vision tower + bridge + frozen causal LLM with LoRA."""

    vision_tower: str = "runs/stage1/sparc/final"  # our stage-one/MaskEmbed ckpt, a local HF vision dir, or "oracle"
    llm: str = "runs/lm/final"  # any local AutoModelForCausalLM directory
    bridge: BridgeConfig = field(default_factory=BridgeConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    freeze_vision: bool = True
    load_in_4bit: bool = False  # QLoRA via bitsandbytes; needs CUDA
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 (gpu extra)
    llm_dtype: str = "fp32"  # storage dtype of the frozen LLM weights: fp32 | bf16 (LoRA and bridge stay fp32)
    # As HF LLaVA: hidden_states[layer] of the tower (-2: penultimate block, before the final norm;
    # null: the tower's final post-norm output, what checkpoints saved before this field used)
    vision_feature_layer: Optional[int] = -2
    vision_feature_select_strategy: str = "default"  # default: drop the first (CLS) token | full: keep it
    # vision_tower=oracle (vlm.model.oracle): the world export whose annotations it reads ("" = stage
    # two's data.world_dir)
    oracle_world: str = ""
    # Box coordinates as tokens: "0.00" ... "1.00" added to the LLM's tokenizer (one id per coordinate, as
    # Kosmos-2's and PaliGemma's location tokens), their embedding rows (input and tied output) trained
    # with the LoRA adapter (peft trainable_token_indices); every other LLM weight stays frozen
    coordinate_tokens: bool = False
    # Per-module modes, lr and weight decay; an explicit tower / LLM mode also sets freeze_vision /
    # lora.enabled, so the two never disagree in a saved vlm.yaml.
    train: TrainingControl = field(default_factory=TrainingControl)

    def __post_init__(self) -> None:
        t = self.train
        t.tower.check("model.train.tower", TRAIN_MODES)
        t.bridge.check("model.train.bridge", ("frozen", "full"))
        t.llm.check("model.train.llm", TRAIN_MODES)
        if t.tower.mode:
            self.freeze_vision = t.tower.mode == "frozen"
        if t.llm.mode:
            self.lora = dataclasses.replace(self.lora, enabled=t.llm.mode == "lora")
        _check(not (self.load_in_4bit and self.module_mode("llm") == "full"), "model.train.llm.mode",
               "full training needs full-precision LLM weights; set model.load_in_4bit=false")
        _check(bool(self.vision_tower), "model.vision_tower", "must name a checkpoint directory or be 'oracle'")
        _check(bool(self.llm), "model.llm", "must name a local LLM directory")

        _one_of(self.vision_feature_select_strategy, "model.vision_feature_select_strategy", ("default", "full"))
        _one_of(self.attn_implementation, "model.attn_implementation", ("sdpa", "eager", "flash_attention_2"))
        _one_of(self.llm_dtype, "model.llm_dtype", ("fp32", "bf16"))


    def module_mode(self, module: str) -> str:
        """The training mode of "tower", "bridge" or "llm": ``train.<module>.mode`` when set, else the
        tower as ``freeze_vision`` says, the bridge "full", the LLM as ``lora.enabled`` says."""
        mode = getattr(self.train, module).mode
        if mode:
            return mode
        return {"tower": "frozen" if self.freeze_vision else "full", "bridge": "full",
                "llm": "lora" if self.lora.enabled else "frozen"}[module]


@dataclass
class LMModelConfig:
    """The world's tiny Llama-architecture causal LM."""

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    max_position: int = 256

    def __post_init__(self) -> None:
        _positive(self, "model", "hidden_size", "intermediate_size", "num_layers", "num_heads", "max_position")
        _check(self.vocab_size >= 64, "model.vocab_size", "must be >= 64")
        _check(self.hidden_size % self.num_heads == 0, "model.num_heads", "hidden_size must be divisible by num_heads")


# ----------------------------------------------------------------------------------------------
# Recipes: one per `vlm train ...` subcommand (stage one's, ``Stage1Config``, is in encoders/config.py)
# ----------------------------------------------------------------------------------------------


@dataclass
class MaskEmbedRunConfig:
    maskembed: MaskEmbedConfig = field(default_factory=MaskEmbedConfig)
    data: ShardDataConfig = field(default_factory=ShardDataConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="runs/maskembed"))


@dataclass
class TowerPretrainConfig:
    """``vlm train tower``: supervised pretraining of a vision tower on the world's labels (which
    shapes and which colours an image holds), the shared starting point of stage one's objectives
    (``model.vision.pretrained``), as real towers start from an ImageNet-pretrained backbone."""

    model: VisionTowerConfig = field(default_factory=VisionTowerConfig)
    pool: str = "max"  # how the classifier pools the patch grid: max | mean
    data: ShardDataConfig = field(default_factory=ShardDataConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="runs/tower"))

    def __post_init__(self) -> None:
        _one_of(self.pool, "pool", ("max", "mean"))


@dataclass
class LMConfig:
    model: LMModelConfig = field(default_factory=LMModelConfig)
    data: TextDataConfig = field(default_factory=TextDataConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="runs/lm"))


@dataclass
class Stage2Config:
    model: VLMConfig = field(default_factory=VLMConfig)
    data: LlavaDataConfig = field(default_factory=LlavaDataConfig)
    world: WorldConfig = field(default_factory=WorldConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="runs/stage2/projector"))


# ----------------------------------------------------------------------------------------------
# Pipelines: the demo and the ablation grid (run by ``vlm demo`` / ``vlm ablate``)
# ----------------------------------------------------------------------------------------------

VLM_TASK_NAMES = ("caption", "chair", "grounding_attention", "pope", "refcoco", "vsr")
# Run only when asked for (``--tasks``, ``vlm_tasks``): grounding_attention needs the projector bridge.
VLM_DIAGNOSTIC_TASKS = ("grounding_attention",)
VLM_DEFAULT_TASKS = tuple(t for t in VLM_TASK_NAMES if t not in VLM_DIAGNOSTIC_TASKS)


@dataclass
class PipelineConfig:
    """Which recipes a pipeline runs and how they are shortened; shared by demo and ablation.

    Each stage loads its recipe YAML (``{objective}``/``{bridge}`` are filled in), then the
    pipeline's own overrides: the world, the output dir, the seed, and the ``*_overrides`` lists.
    """

    out_dir: str = "runs/demo"
    # Objects of 16-31 px on 64 px images (the default world's are 10-26 px): see README, stage one.
    # Grounding turns at weight 1 (the default mix's 2): with the demo LLM's tokenizer a grounding
    # turn is ~98 tokens (its prompt is spelled out character by character), 41% of stage two's text
    # at weight 2, and no stage two learns boxes in the demo's budget (RefCOCO 0.00-0.02, also the
    # oracle tower with the whole LLM trained), so half of them buy the others' steps.
    world: WorldConfig = field(default_factory=lambda: WorldConfig(
        n_train=20000, n_eval=300, small_size=[0.25, 0.32], large_size=[0.38, 0.48],
        llava_mix={**DEFAULT_LLAVA_MIX, "grounding": 1.0}))
    lm_config: str = "configs/lm/tiny_world.yaml"
    # The shared starting point of every stage-one objective: a tower pretrained on the world's
    # labels (``vlm train tower``); null = every objective starts from random weights.
    tower_config: Optional[str] = "configs/tower/resnet_world.yaml"
    tower_overrides: list[str] = field(default_factory=list)
    stage1_config: str = "configs/stage1/{objective}_resnet_tiny.yaml"
    maskembed_config: str = "configs/posttrain/maskembed_tiny.yaml"
    stage2_config: str = "configs/stage2/{bridge}_tiny.yaml"
    lm_overrides: list[str] = field(default_factory=list)
    stage1_overrides: list[str] = field(default_factory=list)
    maskembed_overrides: list[str] = field(default_factory=list)
    stage2_overrides: list[str] = field(default_factory=list)
    eval_limit: Optional[int] = 200  # examples per VLM task and images per encoder eval; None = all
    vlm_tasks: list[str] = field(default_factory=lambda: list(VLM_DEFAULT_TASKS))
    threads: int = 0  # torch threads, and at most as many world render workers; 0 = the defaults

    def __post_init__(self) -> None:
        for t in self.vlm_tasks:
            _one_of(t, "vlm_tasks", VLM_TASK_NAMES)
        _check(self.eval_limit is None or self.eval_limit > 0, "eval_limit", "must be > 0 or null")
        _check(self.threads >= 0, "threads", "must be >= 0")


@dataclass
class DemoConfig(PipelineConfig):
    """``vlm demo``: the objectives through stage one, MaskEmbed on one tower, stage two on one."""

    # CLIP and SPARC fit the demo's 15 minutes; `objectives=[clip,siglip,sparc,flair]` adds the others.
    objectives: list[str] = field(default_factory=lambda: ["clip", "sparc"])
    # Objectives also trained from random weights with the same recipe and budget (reported as
    # "<objective>_scratch" beside the pretrained-tower runs: what the shared tower buys); needs
    # tower_config. Not in the default demo (its 15 minutes): `from_scratch=[sparc]` adds SPARC's (~90 s).
    from_scratch: list[str] = field(default_factory=list)
    maskembed_teacher: str = "sparc"  # which stage-one tower MaskEmbed post-trains
    stage2_tower: str = "sparc"  # which stage-one tower stage two uses
    bridges: list[str] = field(default_factory=lambda: ["projector"])
    heatmap_objectives: list[str] = field(default_factory=lambda: ["clip", "sparc"])
    # Controls of the headline VLM: the same model with blank images, and the oracle-tower VLM
    # (model.vision_tower=oracle, the stage-two recipe of oracle_bridge plus oracle_overrides)
    blank_tasks: list[str] = field(default_factory=lambda: ["pope", "vsr", "refcoco"])
    oracle_bridge: Optional[str] = "projector"  # null: no oracle stage
    oracle_tasks: list[str] = field(default_factory=lambda: ["pope", "vsr"])
    # The oracle's clean grid needs a fifth of the headline's stage-two steps (POPE 0.99 at 500 x 16, 0.78 at 300)
    oracle_overrides: list[str] = field(default_factory=lambda: ["optim.max_steps=500"])
    # The headline VLM's grounding_attention (eval/grounding_attention.py; a projector bridge only): where its
    # LLM looks while it writes a box, drawn in the report (~5 s on 2 cores)
    grounding_attention: bool = True
    # Stages and evals at once, each in its own process with threads/jobs torch threads and its
    # own log (`vlm.cli.jobs`); 1 = one after another in this process. On the 2-core dev machine
    # two jobs gained nothing (fresh-clone demo 989 s vs 995 s): every stage ran 1.8-2x slower on
    # one thread (LM 332 s vs 177, stage two 576 vs 321). For machines whose cores a stage leaves idle.
    jobs: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.jobs >= 1, "jobs", "must be >= 1")
        for o in self.objectives:
            _one_of(o, "objectives", OBJECTIVE_NAMES)
        _one_of(self.maskembed_teacher, "maskembed_teacher", tuple(self.objectives))
        _one_of(self.stage2_tower, "stage2_tower", tuple(self.objectives))
        for o in self.from_scratch:
            _one_of(o, "from_scratch", tuple(self.objectives))
        _check(self.tower_config is not None or not self.from_scratch, "from_scratch",
               "needs tower_config (without it every objective already starts from random weights)")
        _check(bool(self.bridges), "bridges", "must list at least one bridge")
        for b in self.bridges:
            _one_of(b, "bridges", BRIDGE_NAMES)
        if self.oracle_bridge is not None:
            _one_of(self.oracle_bridge, "oracle_bridge", BRIDGE_NAMES)
        for t in [*self.blank_tasks, *self.oracle_tasks]:
            _one_of(t, "blank_tasks/oracle_tasks", VLM_TASK_NAMES)

    @property
    def headline_bridge(self) -> str:
        """The bridge of the report's headline VLM: the projector when it is run, else the first."""
        return "projector" if "projector" in self.bridges else self.bridges[0]


@dataclass
class AblateConfig(PipelineConfig):
    """``vlm ablate``: objectives x (with/without MaskEmbed) x bridges x seeds, each cell fully evaluated."""

    out_dir: str = "runs/ablate"
    objectives: list[str] = field(default_factory=lambda: list(OBJECTIVE_NAMES))
    maskembed: list[bool] = field(default_factory=lambda: [False, True])
    bridges: list[str] = field(default_factory=lambda: list(BRIDGE_NAMES))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    stage2: bool = True  # False = encoder-level grid only (no VLMs)

    def __post_init__(self) -> None:
        super().__post_init__()
        for o in self.objectives:
            _one_of(o, "objectives", OBJECTIVE_NAMES)
        for b in self.bridges:
            _one_of(b, "bridges", BRIDGE_NAMES)
        _check(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds), "seeds",
               "must be a non-empty list of distinct seeds (>= 3 for confidence intervals)")
        _check(bool(self.maskembed), "maskembed", "must list at least one of false/true")


# ----------------------------------------------------------------------------------------------
# Loading and saving
# ----------------------------------------------------------------------------------------------


CHOOSE_BY_NAME = "choose_by_name"  # dataclass field metadata key, see chosen_by_name


def chosen_by_name(choose: Callable[[str], type], default: Callable[[], Any]) -> Any:
    """A recipe field holding one of several config dataclasses, picked by its ``name`` key.

    ``choose(name) -> dataclass type`` raises ``ConfigError`` for an unknown name; ``default()``
    builds the field's default. Only fields of a recipe's top level are resolved this way (see
    the module docstring).
    """
    return field(default_factory=default, metadata={CHOOSE_BY_NAME: choose})


def _chosen_name(key: str, layers: list[DictConfig], default: str) -> str:
    """The last ``<key>.name`` the layers set, else ``default``."""
    for layer in reversed(layers):
        name = OmegaConf.select(layer, f"{key}.name", default=None)
        if name is not None:
            return str(name)
    return default


def _structured_base(cls: type, layers: list[DictConfig]) -> DictConfig:
    """``cls``'s defaults as a structured config, each chosen-by-name field set to the dataclass
    its ``name`` (from ``layers``) chooses."""
    base = OmegaConf.structured(cls)
    for f in dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ():
        choose = f.metadata.get(CHOOSE_BY_NAME)
        if choose is not None:
            name = _chosen_name(f.name, layers, default=str(base[f.name].name))
            base[f.name] = OmegaConf.structured(choose(name))
    return base


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and friends: say which file
        raise ConfigError(f"{path}: not valid YAML: {_first_line(e)}{_yaml_line(e)}") from e
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys, got a list")
    return loaded


def configs_dir() -> Path:
    """The recipe YAMLs installed with the package: ``vlm/configs``, a link to the top-level
    ``configs/`` in a checkout (and an editable install), a copy of it in a wheel."""
    return Path(__file__).resolve().parent / "configs"


def config_names() -> list[str]:
    """Every shipped config by name (``stage1/sparc_tiny``, ...), sorted."""
    root = configs_dir()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A config file from a path (absolute or relative to the working directory) or a shipped
    config's name: ``stage1/sparc_tiny``, ``stage1/sparc_tiny.yaml`` or ``configs/stage1/sparc_tiny.yaml``
    (the name is looked up in ``configs_dir()``, so it works from any folder)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = path.as_posix()
    name = name[len("configs/"):] if name.startswith("configs/") else name
    shipped = configs_dir() / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    if shipped.is_file():
        return shipped
    raise ConfigError(f"config not found: {name_or_path} is neither a file nor a shipped config name "
                      f"(names: {', '.join(config_names())})")


def portable_path(target: str | Path, directory: str | Path) -> str:
    """``target`` as a config saved in ``directory`` records it. A path given relative (a run's
    sibling in the user's tree of runs) is written relative to ``directory``, so the tree can be
    moved as a whole; an absolute one (a model store outside the runs) stays absolute."""
    target = Path(target)
    if target.is_absolute():
        return str(target)
    return os.path.relpath(target.resolve(), Path(directory).resolve())


def saved_path(directory: str | Path, value: str) -> Path:
    """A path read from a config saved in ``directory``: relative to it when it exists there (what
    ``portable_path`` writes), else as written (older checkpoints: relative to the working dir)."""
    inside = Path(directory) / value
    return inside if inside.exists() else Path(value)


def load_config(cls: type[T], path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> T:
    """Build a ``cls`` from its defaults, then a YAML file (a path or a shipped config's name,
    ``resolve_config_path``), then ``key.sub=value`` overrides.

    Raises ``ConfigError`` naming the offending key for unknown keys, wrong types and values that
    fail a dataclass's checks, and names the file for unreadable YAML.
    """
    layers = [] if path is None else [_read_yaml(resolve_config_path(path))]
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    if overrides:
        layers.append(_parse_overrides(list(overrides)))
    try:
        merged = OmegaConf.merge(_structured_base(cls, layers), *layers)
        return OmegaConf.to_object(merged)  # runs every dataclass's __post_init__ checks
    except ConfigError:
        raise
    except OmegaConfBaseException as e:
        where = f" (from {path})" if path is not None else ""
        raise ConfigError(f"{_omegaconf_message(e)}{where}") from e


def _parse_overrides(overrides: list[str]) -> DictConfig:
    """The dotted overrides as one layer; a YAML syntax error in a value (``seed=[1,2``) is a
    ``ConfigError`` naming that override."""
    for item in overrides:
        try:
            OmegaConf.from_dotlist([item])
        except (OmegaConfBaseException, yaml.YAMLError) as e:
            raise ConfigError(f"override {item!r}: not valid YAML: {_first_line(e)}") from e
    try:
        return OmegaConf.from_dotlist(overrides)
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise ConfigError(f"bad override: {_first_line(e)}") from e


def _yaml_line(e: BaseException) -> str:
    """`` (line N)`` where a YAML error knows its position, else ""."""
    mark = getattr(e, "problem_mark", None)
    return f" (line {mark.line + 1})" if mark is not None else ""


def _first_line(e: BaseException) -> str:
    """The first non-empty line of ``e``'s message (YAML errors span several)."""
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)


def _omegaconf_message(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    msg = str(e).splitlines()[0]
    return f"{key}: {msg}" if key else msg


def to_yaml(cfg: Any) -> str:
    """The YAML text of a config dataclass (every field, resolved)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Any, path: str | Path) -> None:
    """Write ``cfg`` as YAML to ``path`` atomically (parents created)."""
    atomic_write_text(path, to_yaml(cfg))


def config_from_yaml_text(cls: type[T], text: str) -> T:
    """Parse a config saved by ``save_config`` (e.g. beside a checkpoint) back into ``cls``."""
    try:
        saved = OmegaConf.create(text)
        return OmegaConf.to_object(OmegaConf.merge(_structured_base(cls, [saved]), saved))
    except OmegaConfBaseException as e:
        raise ConfigError(_omegaconf_message(e)) from e


def replace(cfg: T, **changes: Any) -> T:
    """``dataclasses.replace`` re-exported for recipes that derive one config from another."""
    return dataclasses.replace(cfg, **changes)
