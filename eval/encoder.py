"""Encoder evals on the embedded world (../shared/METHODS.md, "Encoder evals").

``run(ckpt, out_dir, world, world_dir)`` measures, on the world's eval split (``limit`` images):

- **Zero-shot classification** (top-1). The label of an image is the shape with the most visible
  pixels in its class mask (ties: the earlier shape in ``SHAPES``): a single-shape image gets that
  shape, a mixed one its dominant shape. Each class is the prompt ``"a photo of a {shape}."``; the
  prediction is the prompt whose global text embedding has the highest cosine with the image's
  global embedding.
  A FLAIR checkpoint (its ``objective.yaml`` names flair) is scored by default as the reference's
  ``--inference-with-flair``: each (image, text) pair by cos(v_{i|t}, t), v_{i|t} the image's patch
  embeddings pooled by the text (the objective's learned pooling, ``objective.safetensors``);
  ``flair_scoring="global"`` scores it through the global embeddings instead, as every other
  objective (``summary["scoring"]``: "flair_conditioned" | "global"). The same score serves
  retrieval. ``zero_shot_multi_ceiling`` states this protocol's ceiling for a classifier that knows
  which shapes are present but not which dominates (the mean of 1/k over images with k shapes;
  ``presence_ceiling``), and ``zero_shot_multi_any_present`` is the fraction of predictions naming
  any shape present (that lenient protocol's ceiling is 1).
- **Single-object zero-shot** (shape and colour top-1): ``single_images`` held-out images of one
  object each (``single_object_world``: the same WorldConfig with min_objects = max_objects = 1, at
  indices after the eval split, so no image repeats a train or eval one; from the generator,
  through the export's JPEG encoding as the training images), scored like the multi-object protocol (FLAIR conditioned, as above) against the 64
  prompts ``PROMPT`` with "{colour} {shape}" (``pair_prompts``). The shape prediction is the argmax
  over shapes of the mean over colours of the score, the colour prediction symmetrically
  (``marginal_predictions``). Ceiling 1, chance 1/8 each.
- **Pointing accuracy** (``eval.pointing``): each shape word of the eval captions (the same
  ``short`` and ``detailed`` ones) points at the patch whose ``patch_emb`` has the largest dot
  product with its ``token_emb`` (averaged over the word's tokens); a hit when that patch's centre
  lies in an object of that shape. Reported with the number of words and the chance rate.
- **Retrieval** (image->text and text->image Recall@1/5/10) over the eval images and their
  ``short`` and ``detailed`` captions (two per image; an image's own captions are its positives).
  Ranks count ties against the query (``first_relevant_rank``): an encoder that scores
  everything equally gets chance-level recall, not a perfect one.
- **Zero-shot segmentation** (mIoU on the patch grid). Classes are ``CLASS_NAMES`` (background
  included), each with the prompt ``"a photo of a {name}."``. With local heads (SPARC) the patch
  embeddings live in the local space, so a class embedding is the mean local token embedding of
  the class-name tokens inside its prompt (the space SPARC aligns patches with); without them
  (CLIP, SigLIP, FLAIR) ``patch_emb`` is the global head applied per patch (MaskCLIP-style), so
  the prompt's global text embedding is used. Each patch takes the class of highest cosine.
- **Linear probe** (mIoU): a linear layer on the frozen, standardised ``patch_tokens`` trained
  with cross-entropy on ``probe_images`` train-split images (full batch, AdamW, ``probe_steps``).
- **Locality-alignment protocol**: multi-label patch classification (a patch is positive for a
  class if any of its pixels has that class), a small per-patch MLP head (one hidden layer of 128,
  GELU) trained with binary cross-entropy on the same frozen features, macro precision / recall /
  F1 at probability 0.5 on the eval split.

Ground truth. The class mask is resized (nearest) to the tower's input size and cut into the patch
grid; a patch's segmentation label is the majority class of its pixels (ties: the smaller class
id). mIoU and the macro scores average over classes present in the prediction or the ground truth
(a class absent from both is excluded, not counted as 0 or 1).

Checkpoints. A ``DualEncoder`` dir (``encoder.yaml``) gets every metric. A plain vision tower (a
MaskEmbed output, a local HF CLIP/SigLIP vision dir, or any dir ``load_vision_tower`` accepts)
gets the probe metrics only, the zero-shot and retrieval ones reported as n/a. With
``text_from=<DualEncoder dir>`` (a MaskEmbed student and its stage-one teacher) the student's tower
replaces the teacher's inside the teacher's DualEncoder, so its projections and text tower score
the student's tokens. That is sound only as a measurement of how compatible the student's final
tokens stay with the teacher's heads: MaskEmbed trains the student's patch tokens to *predict* the
teacher's features through a decoder, not to equal them, and it never trains CLS pooling, so a
drop in these numbers means drift, not worse features; the probe metrics are the comparable ones.
The summary records the mode (``"text_from"``).

Images come from ``world_dir/images/{index:08d}.jpg`` when that export exists (the JPEGs the
encoders were trained on), else from the generator directly (``summary["image_source"]``); the
masks, labels and captions always come from the generator (exact).

Outputs in ``out_dir``: ``summary.json``, ``summary.md`` (a Markdown table of every leaf, nested
keys joined by "/"), ``heatmaps.png`` (with a text side: SPARC alignment heatmaps of the first eval
images, ``eval.heatmaps``), ``predictions.jsonl`` (one line per eval image: zero-shot label and prediction,
its image->text rank, its captions' text->image ranks, per-image patch accuracy of the zero-shot and
probe segmentations; ``pointing``: its pointed words, each {caption, word, shape, patch, hit}),
``predictions_single.jsonl`` (one line per single-object image: index, shape, color, shape_pred,
color_pred). The summary: run facts (``ckpt``, ``mode``, ``text_from``, ``n_eval``,
``n_probe_train``, ``image_source``, ``probe_steps``, ``scoring``: how zero-shot and retrieval score a pair,
"global" | "flair_conditioned" | null without a text side, ``heatmaps``: "heatmaps.png" or null) and the groups ``zero_shot`` {top1},
``retrieval`` {i2t_r1, i2t_r5, i2t_r10, t2i_r1, t2i_r5, t2i_r10}, ``segmentation`` {zero_shot_miou,
probe_miou, zero_shot_class_embedding}, ``multilabel`` {precision, recall, f1}, ``per_class_iou``
{zero_shot, probe: {class name: IoU}}, and flat keys: ``patch_miou`` (= segmentation/zero_shot_miou),
``pointing_acc``, ``pointing_words``, ``pointing_chance``, ``zero_shot_single_top1`` (shape),
``zero_shot_single_color_top1``, ``zero_shot_single_n``, ``zero_shot_multi_ceiling``,
``zero_shot_multi_any_present``, ``zero_shot_multi_ceiling_note`` (a sentence); metrics that do not
apply are null (n/a in the table).
"""
from __future__ import annotations

import io
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from encoders.dual_encoder import CONFIG_FILE, DualEncoder
from encoders.objectives.flair import conditioned_similarity
from encoders.registry import build_objective, objective_config_class
from encoders.stage1_model import OBJECTIVE_CONFIG_FILE, OBJECTIVE_STATE_FILE
from encoders.towers import (ImageTransform, VisionTower, load_vision_tower, tower_forward, tower_image_size,
                             tower_patch_size, tower_width)
from eval.heatmaps import alignment_heatmaps
from eval.pointing import patch_centre_classes, point_words, pointing_records, pointing_summary
from eval.report import jsonable, summary_markdown, write_jsonl
from eval.report import write_summary as write_summary_files
from vlm.config import WorldConfig, config_from_yaml_text
from vlm.files import open_image
from vlm.world.export import jpeg_bytes
from vlm.world.generator import generate_sample, world_split
from vlm.world.vocab import CLASS_NAMES, COLORS, SHAPES

PROMPT = "a photo of a {}."
RETRIEVAL_CAPTION_KEYS = ("short", "detailed")
RECALL_KS = (1, 5, 10)
PROBE_HIDDEN = 128
# The headline metrics of the demo / ablation tables (every metric stays in summary.json).
REPORT_COLUMNS = [
    "zero_shot/top1", "retrieval/i2t_r1", "retrieval/t2i_r1", "retrieval/i2t_r5", "retrieval/t2i_r5",
    "segmentation/zero_shot_miou", "segmentation/probe_miou", "pointing_acc", "pointing_chance",
    "zero_shot_single_top1", "zero_shot_single_color_top1", "multilabel/f1", "multilabel/precision",
    "multilabel/recall",
]
SINGLE_IMAGES = 256  # held-out single-object images of the single-object zero-shot
MULTI_CEILING_NOTE = ("zero_shot/top1 labels a 1-4 object image by its dominant shape (most visible pixels); "
                      "a classifier that knows exactly which shapes are present but not which dominates, "
                      "picking uniformly among them, scores zero_shot_multi_ceiling on average; "
                      "zero_shot_single_top1 (one object per image) has ceiling 1")

# ----------------------------------------------------------------------------------------------
# Pure metrics
# ----------------------------------------------------------------------------------------------


def top1_accuracy(pred: Sequence[int] | torch.Tensor, target: Sequence[int] | torch.Tensor) -> float:
    """Fraction of equal entries. pred, target [N] ints -> float in [0, 1]; N = 0 raises."""
    pred, target = torch.as_tensor(pred), torch.as_tensor(target)
    if pred.shape != target.shape or pred.dim() != 1:
        raise ValueError(f"pred and target must be equal-length 1-d, got {tuple(pred.shape)}, {tuple(target.shape)}")
    if pred.numel() == 0:
        raise ValueError("top1_accuracy of zero examples")
    return float((pred == target).double().mean())


def first_relevant_rank(sim: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """0-based rank of each query's best relevant item. sim [Q,N] scores, relevant [Q,N] bool -> [Q] long.

    rank = number of irrelevant items scoring >= the best relevant item (ties count against the
    query, so constant scores give chance-level recall). Every query needs a relevant item.
    """
    if sim.shape != relevant.shape or sim.dim() != 2:
        raise ValueError(f"sim and relevant must both be [Q,N], got {tuple(sim.shape)}, {tuple(relevant.shape)}")
    relevant = relevant.bool()
    if not bool(relevant.any(dim=1).all()):
        raise ValueError("every query needs at least one relevant item")
    best = sim.masked_fill(~relevant, float("-inf")).max(dim=1, keepdim=True).values
    return ((sim >= best) & ~relevant).sum(dim=1)


def recall_at_k(sim: torch.Tensor, relevant: torch.Tensor, ks: Sequence[int] = RECALL_KS) -> dict[int, float]:
    """Recall@k: fraction of queries with a relevant item in the top k. sim, relevant [Q,N] -> {k: float}."""
    ranks = first_relevant_rank(sim, relevant)
    return {int(k): float((ranks < k).double().mean()) for k in ks}


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C,C] counts, rows = ground truth, columns = prediction. pred, target: int tensors of one shape."""
    pred, target = torch.as_tensor(pred).reshape(-1).long(), torch.as_tensor(target).reshape(-1).long()
    if pred.shape != target.shape:
        raise ValueError(f"pred has {pred.numel()} entries, target {target.numel()}")
    for name, t in (("pred", pred), ("target", target)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            raise ValueError(f"{name} has labels outside [0, {num_classes})")
    return torch.bincount(target * num_classes + pred, minlength=num_classes ** 2).view(num_classes, num_classes)


def mean_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> tuple[float, list[float]]:
    """(mIoU, per-class IoU) over label maps of any equal shape. A class absent from both pred and
    target has IoU nan and is excluded from the mean; mIoU is nan if every class is absent."""
    cm = confusion_matrix(pred, target, num_classes).double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    present = ~torch.isnan(iou)
    miou = float(iou[present].mean()) if bool(present.any()) else float("nan")
    return miou, iou.tolist()


def multilabel_prf(pred: torch.Tensor, target: torch.Tensor) -> dict:
    """Macro precision / recall / F1 of bool [N,C] predictions vs bool [N,C] targets.

    Per class: P = tp/(tp+fp), R = tp/(tp+fn), each 0 when its denominator is 0, F1 = 2PR/(P+R)
    (0 when P+R = 0). Classes with no positive in pred or target are excluded from the macro means
    (the F1 is the mean of per-class F1s). Returns dict(precision, recall, f1, per_class: list of
    (P, R, F1) or None for excluded classes); nan means if every class is excluded.
    """
    pred, target = torch.as_tensor(pred).bool(), torch.as_tensor(target).bool()
    if pred.shape != target.shape or pred.dim() != 2:
        raise ValueError(f"pred and target must both be [N,C] bool, got {tuple(pred.shape)}, {tuple(target.shape)}")
    tp = (pred & target).sum(0).double()
    fp = (pred & ~target).sum(0).double()
    fn = (~pred & target).sum(0).double()
    per_class, kept = [], []
    for c in range(pred.shape[1]):
        if tp[c] + fp[c] + fn[c] == 0:
            per_class.append(None)
            continue
        p = float(tp[c] / (tp[c] + fp[c])) if tp[c] + fp[c] > 0 else 0.0
        r = float(tp[c] / (tp[c] + fn[c])) if tp[c] + fn[c] > 0 else 0.0
        f = 2 * p * r / (p + r) if p + r > 0 else 0.0
        per_class.append((p, r, f))
        kept.append((p, r, f))
    if not kept:
        return {"precision": float("nan"), "recall": float("nan"), "f1": float("nan"), "per_class": per_class}
    arr = np.array(kept, dtype=np.float64)
    return {"precision": float(arr[:, 0].mean()), "recall": float(arr[:, 1].mean()), "f1": float(arr[:, 2].mean()),
            "per_class": per_class}


def _patch_blocks(class_mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    h, w = class_mask.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"mask {h}x{w} is not divisible by patch_size {patch_size}")
    gh, gw = h // patch_size, w // patch_size
    return class_mask.reshape(gh, patch_size, gw, patch_size).permute(0, 2, 1, 3).reshape(gh * gw, -1)


def majority_downsample(class_mask: Union[np.ndarray, torch.Tensor], patch_size: int, num_classes: int) -> torch.Tensor:
    """Class mask [H,W] ints -> [H/ps * W/ps] (row-major patch grid): each patch's most frequent
    class (ties: the smaller id)."""
    blocks = _patch_blocks(torch.as_tensor(np.asarray(class_mask)).long(), patch_size)
    counts = F.one_hot(blocks, num_classes).sum(1)  # [P, C]
    return counts.argmax(dim=1)  # argmax returns the first maximum: the smaller id wins ties


def patch_presence(class_mask: Union[np.ndarray, torch.Tensor], patch_size: int, num_classes: int) -> torch.Tensor:
    """Class mask [H,W] -> [P, C] bool: True where any pixel of the patch has class c."""
    blocks = _patch_blocks(torch.as_tensor(np.asarray(class_mask)).long(), patch_size)
    return F.one_hot(blocks, num_classes).sum(1) > 0


def dominant_shape(class_mask: np.ndarray, num_shapes: int) -> Optional[int]:
    """Index into ``SHAPES`` of the shape with most visible pixels (ties: the smaller), None if no object."""
    counts = np.bincount(np.asarray(class_mask).reshape(-1), minlength=num_shapes + 1)[1:num_shapes + 1]
    return int(counts.argmax()) if counts.sum() > 0 else None


def presence_ceiling(present: torch.Tensor) -> float:
    """present [N,S] bool (the shapes in each image; every row has one) -> mean of 1/k over images,
    k = shapes present: the expected top-1 of the multi-object protocol for a classifier that
    knows which shapes are present but not which dominates (it picks uniformly among them)."""
    counts = present.bool().sum(dim=1).double()
    if present.dim() != 2 or present.shape[0] == 0 or bool((counts == 0).any()):
        raise ValueError("presence_ceiling needs [N,S] with N >= 1 and a shape in every row")
    return float((1.0 / counts).mean())


def pair_prompts() -> list[str]:
    """The single-object zero-shot prompts: ``PROMPT`` with "{colour} {shape}" for every pair,
    shape-major (prompt s * len(COLORS) + c is colour c, shape s)."""
    return [PROMPT.format(f"{color} {shape}") for shape in SHAPES for color in COLORS]


def marginal_predictions(scores: torch.Tensor, n_shapes: int, n_colors: int) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [N, n_shapes * n_colors] over shape-major pairs -> (shape [N]: argmax over shapes of
    the mean over colours; colour [N]: argmax over colours of the mean over shapes)."""
    grid = scores.reshape(scores.shape[0], n_shapes, n_colors)
    return grid.mean(dim=2).argmax(dim=1), grid.mean(dim=1).argmax(dim=1)


def single_object_world(world: WorldConfig, n: int) -> tuple[WorldConfig, range]:
    """The held-out single-object images: ``world`` with min_objects = max_objects = 1, at indices
    n_train + n_eval .. n_train + n_eval + n - 1 of the same seed. No train or eval image has such
    an index, and a sample's randomness is ``default_rng([seed, index])``, so none of these images
    repeats one the encoder was trained (or probed) on."""
    start = world.n_train + world.n_eval
    return replace(world, min_objects=1, max_objects=1), range(start, start + n)


# ----------------------------------------------------------------------------------------------
# Probes on frozen features
# ----------------------------------------------------------------------------------------------


def _standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean, std = train.mean(0, keepdim=True), train.std(0, keepdim=True).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]


def train_probe(features: torch.Tensor, targets: torch.Tensor, num_classes: int, steps: int, multilabel: bool,
                lr: float = 1e-2, seed: int = 0) -> nn.Module:
    """Fit a head on frozen features [N,w] (full batch, AdamW). ``multilabel``: an MLP (w -> 128 -> C,
    GELU) with BCE on bool targets [N,C]; else a linear layer with cross-entropy on long targets [N].
    Deterministic given ``seed`` (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        w = features.shape[1]
        head = (nn.Sequential(nn.Linear(w, PROBE_HIDDEN), nn.GELU(), nn.Linear(PROBE_HIDDEN, num_classes))
                if multilabel else nn.Linear(w, num_classes)).to(features.device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(steps):
        logits = head(features)
        loss = (F.binary_cross_entropy_with_logits(logits, targets.float()) if multilabel
                else F.cross_entropy(logits, targets))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return head.eval()


# ----------------------------------------------------------------------------------------------
# Loading a checkpoint
# ----------------------------------------------------------------------------------------------


@dataclass
class LoadedEncoder:
    """What an eval can use: the vision tower and its transform, and the DualEncoder (None for a
    plain tower) whose heads and text tower score it. ``mode``: dual_encoder | vision_tower | text_from.
    ``flair_pooling``: the text-conditioned pooling of a FLAIR checkpoint (the DualEncoder's dir
    holds its objective), else None."""

    vision: VisionTower
    transform: ImageTransform
    dual: Optional[DualEncoder]
    mode: str
    flair_pooling: Optional[nn.Module] = None


def load_flair_pooling(directory: Union[str, Path], dual: DualEncoder) -> Optional[nn.Module]:
    """The learned ``TextConditionedPooling`` of a FLAIR checkpoint dir (``objective.yaml`` names
    flair, ``objective.safetensors`` holds it), in eval mode; None for any other directory."""
    directory = Path(directory)
    cfg_path = directory / OBJECTIVE_CONFIG_FILE
    if not cfg_path.is_file() or str(OmegaConf.create(cfg_path.read_text()).get("name", "")) != "flair":
        return None
    cfg = config_from_yaml_text(objective_config_class("flair"), cfg_path.read_text())
    objective = build_objective(cfg, dual.cfg.embed_dim, dual.vision_width)
    objective.load_state_dict(load_file(str(directory / OBJECTIVE_STATE_FILE)), strict=True)
    return objective.pooling.eval()


def load_encoder(ckpt: Union[str, Path], text_from: Optional[Union[str, Path]] = None) -> LoadedEncoder:
    """A DualEncoder dir, or a vision-tower dir (optionally scored with ``text_from``'s DualEncoder)."""
    ckpt = Path(ckpt)
    if (ckpt / CONFIG_FILE).is_file():
        if text_from is not None:
            raise ValueError(f"{ckpt} is a DualEncoder checkpoint; text_from is only for plain vision towers")
        dual = DualEncoder.from_pretrained(ckpt).eval()
        return LoadedEncoder(dual.vision, dual.transform, dual, "dual_encoder", load_flair_pooling(ckpt, dual))
    vision, transform = load_vision_tower(ckpt)
    if text_from is None:
        return LoadedEncoder(vision.eval(), transform, None, "vision_tower")
    dual = DualEncoder.from_pretrained(text_from).eval()
    for key, size in (("hidden_size", tower_width), ("image_size", tower_image_size), ("patch_size", tower_patch_size)):
        a, b = size(vision), size(dual.vision)
        if a != b:
            raise ValueError(f"{ckpt} has {key}={a} but the text_from encoder's tower has {b}; they must match")
    if type(vision) is not type(dual.vision):
        raise ValueError(f"{ckpt} is a {type(vision).__name__}, text_from's tower a {type(dual.vision).__name__}")
    dual.vision = vision.eval()
    dual.transform = transform
    return LoadedEncoder(vision.eval(), transform, dual, "text_from", load_flair_pooling(text_from, dual))


# ----------------------------------------------------------------------------------------------
# Text embeddings of the class prompts
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def class_embeddings(dual: DualEncoder, names: Sequence[str], local: bool) -> torch.Tensor:
    """One embedding per class name -> [C, d]: the global embedding of ``PROMPT.format(name)``, or
    with ``local`` the mean local token embedding of the name's tokens inside that prompt (located
    through the tokenizer's offsets; all word tokens if the tokenizer gives none)."""
    prompts = [PROMPT.format(n) for n in names]
    feats = dual.encode_texts(prompts)
    if not local:
        return feats.global_emb
    enc = dual.tokenizer(prompts, padding="longest", truncation=True, max_length=feats.token_emb.shape[1],
                         return_offsets_mapping=True, return_tensors="pt")
    out = []
    for i, name in enumerate(names):
        start = PROMPT.index("{}")
        end = start + len(name)
        offsets = enc["offset_mapping"][i]
        in_name = (offsets[:, 0] < end) & (offsets[:, 1] > start) & feats.token_mask[i].cpu()
        sel = in_name if bool(in_name.any()) else feats.token_mask[i].cpu()
        out.append(feats.token_emb[i][sel.to(feats.token_emb.device)].mean(0))
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


@dataclass
class _Split:
    indices: list[int]
    pixels: torch.Tensor  # [N,3,S,S]
    seg_labels: torch.Tensor  # [N,P] long
    presence: torch.Tensor  # [N,P,C] bool
    labels: list[Optional[int]]  # dominant shape per image
    captions: list[list[str]]
    centre_classes: torch.Tensor  # [N,P] long: the class at each patch centre (eval.pointing)


def _world_image(sample, world_dir: Optional[Path]):
    """(image, True) from ``world_dir/images/KEY.jpg`` when exported, else (the generated image, False)."""
    path = world_dir / "images" / f"{sample.key}.jpg" if world_dir is not None else None
    if path is not None and path.is_file():
        return open_image(path), True
    return sample.image, False


def _load_split(indices: list[int], world: WorldConfig, world_dir: Optional[Path], transform: ImageTransform,
                patch_size: int, num_classes: int, with_text: bool, progress: bool, desc: str) -> tuple[_Split, str]:
    """The world images at ``indices`` through ``transform`` with their patch-grid labels (and captions
    when ``with_text``) -> (split, "world_dir" when any image came from the export else "generator")."""
    size = transform.image_size
    pixels, seg, presence, labels, captions, centres = [], [], [], [], [], []
    source = "generator"
    for index in tqdm(indices, desc=desc, disable=not progress, leave=False):
        sample = generate_sample(index, world.seed, world)
        image, from_dir = _world_image(sample, world_dir)
        if from_dir:
            source = "world_dir"
        pixels.append(transform(image))
        mask = sample.class_mask
        if mask.shape[0] != mask.shape[1]:
            raise ValueError(f"world images must be square for the patch-grid masks, got {mask.shape}")
        if mask.shape[0] != size:
            mask = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((size, size), Image.NEAREST))
        seg.append(majority_downsample(mask, patch_size, num_classes))
        presence.append(patch_presence(mask, patch_size, num_classes))
        labels.append(dominant_shape(sample.class_mask, len(SHAPES)))
        centres.append(patch_centre_classes(sample.class_mask, size // patch_size, size // patch_size))
        if with_text:
            captions.append([sample.captions[k] for k in RETRIEVAL_CAPTION_KEYS if sample.captions.get(k)])
    split = _Split(indices, torch.stack(pixels), torch.stack(seg), torch.stack(presence), labels, captions,
                   torch.stack(centres))
    return split, source


@torch.no_grad()
def _image_features(loaded: LoadedEncoder, pixels: torch.Tensor, batch_size: int, progress: bool,
                    desc: str) -> dict[str, torch.Tensor]:
    """patch_tokens [N,P,w] and, with a DualEncoder, global_emb [N,d] and patch_emb [N,P,d]."""
    out: dict[str, list] = {"patch_tokens": [], "global_emb": [], "patch_emb": []}
    device = next(loaded.vision.parameters()).device
    for start in tqdm(range(0, len(pixels), batch_size), desc=desc, disable=not progress, leave=False):
        x = pixels[start:start + batch_size].to(device)
        if loaded.dual is not None:
            feats = loaded.dual.encode_image(x)
            out["patch_tokens"].append(feats.patch_tokens.cpu())
            out["global_emb"].append(feats.global_emb.cpu())
            out["patch_emb"].append(feats.patch_emb.cpu())
        else:
            out["patch_tokens"].append(tower_forward(loaded.vision, x)[0].cpu())
    return {k: torch.cat(v) for k, v in out.items() if v}


@torch.no_grad()
def _text_features(dual: DualEncoder, texts: list[str], batch_size: int) -> torch.Tensor:
    return torch.cat([dual.encode_texts(texts[i:i + batch_size]).global_emb.cpu()
                      for i in range(0, len(texts), batch_size)])


def write_summary(out_dir: Path, summary: dict, title: str = "Encoder eval") -> dict:
    """``summary.json`` and ``summary.md`` (one row per leaf, nested keys joined by "/", None and
    NaN shown as n/a); returns the JSON-clean summary (NaN -> None)."""
    clean = jsonable(summary)
    write_summary_files(out_dir, clean, summary_markdown(title, clean), indent=1, newline=False)
    return clean


def _empty_summary(ckpt, loaded: LoadedEncoder, text_from, n_eval: int, n_train: int, source: str,
                   probe_steps: int) -> dict:
    """The summary's run facts and its metric groups, every metric None until measured."""
    return {"ckpt": str(ckpt), "mode": loaded.mode, "text_from": str(text_from) if text_from else None,
            "n_eval": n_eval, "n_probe_train": n_train, "image_source": source,
            "probe_steps": probe_steps, "scoring": None,
            "zero_shot": {"top1": None},
            "retrieval": {f"{d}_r{k}": None for d in ("i2t", "t2i") for k in RECALL_KS},
            "segmentation": {"zero_shot_miou": None, "probe_miou": None},
            "patch_miou": None, "pointing_acc": None, "pointing_words": None, "pointing_chance": None,
            "zero_shot_single_top1": None, "zero_shot_single_color_top1": None, "zero_shot_single_n": None,
            "zero_shot_multi_ceiling": None, "zero_shot_multi_any_present": None,
            "zero_shot_multi_ceiling_note": MULTI_CEILING_NOTE,
            "multilabel": {}, "per_class_iou": {}}


class _Scorer:
    """Scores of the eval images against texts: ``scorer(text_emb [M,d] raw) -> [N,M]``. Global:
    cosine with the global image embeddings; FLAIR conditioned (``pooling`` given): cos(v_{i|t}, t)
    with the images' patch embeddings pooled by each text (``conditioned_similarity``)."""

    def __init__(self, img_global: torch.Tensor, patch_emb: torch.Tensor, pooling: Optional[nn.Module],
                 device: torch.device, batch_size: int) -> None:
        self.img_global = F.normalize(img_global.float(), dim=-1)
        self.patch_emb, self.pooling, self.device, self.batch_size = patch_emb, pooling, device, batch_size
        self.name = "flair_conditioned" if pooling is not None else "global"

    @torch.no_grad()
    def __call__(self, text_emb: torch.Tensor) -> torch.Tensor:
        if self.pooling is None:
            return self.img_global @ F.normalize(text_emb.cpu().float(), dim=-1).T
        pooling = self.pooling.to(self.device).float()
        text = text_emb.to(self.device).float()
        rows = [conditioned_similarity(pooling, self.patch_emb[i:i + self.batch_size].to(self.device).float(), text)
                for i in range(0, len(self.patch_emb), self.batch_size)]
        return torch.cat(rows).cpu()


def _zero_shot(dual: DualEncoder, ev: _Split, score: _Scorer, summary: dict, records: list[dict]) -> None:
    """Zero-shot shape classification of the eval images (``score``: see ``_Scorer``)."""
    zs_pred = score(class_embeddings(dual, SHAPES, local=False)).argmax(1)
    labelled = [i for i, lab in enumerate(ev.labels) if lab is not None]
    if labelled:
        summary["zero_shot"]["top1"] = top1_accuracy(zs_pred[labelled], torch.tensor([ev.labels[i] for i in labelled]))
        present = ev.presence.any(dim=1)[labelled, 1:len(SHAPES) + 1]  # [N_labelled, S]
        summary["zero_shot_multi_ceiling"] = presence_ceiling(present)
        summary["zero_shot_multi_any_present"] = float(present.gather(1, zs_pred[labelled].unsqueeze(1)).double().mean())
    for i, rec in enumerate(records):
        rec["zero_shot_label"] = SHAPES[ev.labels[i]] if ev.labels[i] is not None else None
        rec["zero_shot_pred"] = SHAPES[int(zs_pred[i])]


def _retrieval(dual: DualEncoder, ev: _Split, score: _Scorer, batch_size: int, summary: dict,
               records: list[dict]) -> None:
    """Image->text and text->image Recall@k over the eval images (``score``) and their captions."""
    texts = [c for caps in ev.captions for c in caps]
    if not texts:
        return
    owner = torch.tensor([i for i, caps in enumerate(ev.captions) for _ in caps])
    sim = score(_text_features(dual, texts, batch_size))  # [N_img, N_txt]
    relevant = owner.unsqueeze(0) == torch.arange(len(records)).unsqueeze(1)
    for direction, (s, r) in {"i2t": (sim, relevant), "t2i": (sim.T, relevant.T)}.items():
        for k, recall in recall_at_k(s, r).items():
            summary["retrieval"][f"{direction}_r{k}"] = recall
    i2t_ranks = first_relevant_rank(sim, relevant)
    t2i_ranks = first_relevant_rank(sim.T, relevant.T)
    for i, rec in enumerate(records):
        rec["i2t_rank"] = int(i2t_ranks[i])
        rec["captions"] = ev.captions[i]
        rec["t2i_ranks"] = [int(r) for r in t2i_ranks[owner == i]]


def _zero_shot_segmentation(dual: DualEncoder, ev: _Split, patch_emb: torch.Tensor, summary: dict) -> torch.Tensor:
    """Each patch ([N,P,d] embeddings) takes the class of highest cosine -> predictions [N,P]."""
    local = bool(dual.cfg.local_heads)
    cls_emb = F.normalize(class_embeddings(dual, CLASS_NAMES, local=local).cpu().float(), dim=-1)
    pred = torch.einsum("npd,cd->npc", F.normalize(patch_emb.float(), dim=-1), cls_emb).argmax(-1)  # [N,P]
    miou, per_class = mean_iou(pred, ev.seg_labels, len(CLASS_NAMES))
    summary["segmentation"]["zero_shot_miou"] = miou
    summary["per_class_iou"]["zero_shot"] = dict(zip(CLASS_NAMES, per_class))
    summary["segmentation"]["zero_shot_class_embedding"] = "local tokens of the class name" if local else "global prompt"
    return pred


def _pointing(dual: DualEncoder, ev: _Split, patch_emb: torch.Tensor, batch_size: int, summary: dict,
              records: list[dict]) -> None:
    """Pointing accuracy of the eval captions' shape words over the images' patches [N,P,d] (``eval.pointing``)."""
    words, in_mask = point_words(dual, ev.captions, patch_emb, ev.centre_classes, ev.presence.any(dim=1), batch_size)
    result = pointing_summary(torch.tensor([w.hit for w in words], dtype=torch.bool), in_mask)
    summary.update(pointing_acc=result["acc"], pointing_words=result["words"], pointing_chance=result["chance"])
    for rec, pointed in zip(records, pointing_records(words, len(records))):
        rec["pointing"] = pointed


def _zero_shot_single(loaded: LoadedEncoder, world: WorldConfig, n: int, pooling: Optional[nn.Module],
                      dev: torch.device, batch_size: int, progress: bool, summary: dict) -> list[dict]:
    """Shape and colour zero-shot on ``n`` held-out single-object images (``single_object_world``),
    scored as the multi-object protocol (``_Scorer`` with ``pooling``) against ``pair_prompts``;
    -> one record per image (index, shape, colour, predictions)."""
    single, indices = single_object_world(world, n)
    samples = [generate_sample(i, single.seed, single) for i in indices]
    # Through the export's JPEG encoding, as every image the encoders were trained on.
    pixels = torch.stack([loaded.transform(Image.open(io.BytesIO(jpeg_bytes(s.image))).convert("RGB")) for s in samples])
    feats = _image_features(loaded, pixels, batch_size, progress, "encode single-object")
    score = _Scorer(feats["global_emb"], feats["patch_emb"], pooling, dev, batch_size)
    shape_pred, color_pred = marginal_predictions(score(_text_features(loaded.dual, pair_prompts(), batch_size)),
                                                  len(SHAPES), len(COLORS))
    shapes = torch.tensor([SHAPES.index(s.objects[0].shape) for s in samples])
    colors = torch.tensor([list(COLORS).index(s.objects[0].color) for s in samples])
    summary.update(zero_shot_single_top1=top1_accuracy(shape_pred, shapes),
                   zero_shot_single_color_top1=top1_accuracy(color_pred, colors), zero_shot_single_n=n)
    return [{"index": i, "shape": s.objects[0].shape, "color": s.objects[0].color, "shape_pred": SHAPES[int(sp)],
             "color_pred": list(COLORS)[int(cp)]} for i, s, sp, cp in zip(indices, samples, shape_pred, color_pred)]


def _probes(tr: _Split, ev: _Split, tr_tokens: torch.Tensor, ev_tokens: torch.Tensor, steps: int,
            dev: torch.device, summary: dict) -> torch.Tensor:
    """The linear segmentation probe and the multi-label MLP on frozen patch tokens [N,P,w]
    -> the probe's segmentation [N_eval,P]."""
    num_classes = len(CLASS_NAMES)
    n_ev, n_patches = ev.seg_labels.shape
    width = tr_tokens.shape[-1]
    x_tr, x_ev = _standardise(tr_tokens.reshape(-1, width).float().to(dev), ev_tokens.reshape(-1, width).float().to(dev))
    probe = train_probe(x_tr, tr.seg_labels.reshape(-1).to(dev), num_classes, steps, multilabel=False)
    with torch.no_grad():
        probe_pred = probe(x_ev).argmax(-1).view(n_ev, n_patches).cpu()
    miou, per_class = mean_iou(probe_pred, ev.seg_labels, num_classes)
    summary["segmentation"]["probe_miou"] = miou
    summary["per_class_iou"]["probe"] = dict(zip(CLASS_NAMES, per_class))
    head = train_probe(x_tr, tr.presence.reshape(-1, num_classes).to(dev), num_classes, steps, multilabel=True)
    with torch.no_grad():
        ml_pred = (torch.sigmoid(head(x_ev)) > 0.5).cpu()
    prf = multilabel_prf(ml_pred, ev.presence.reshape(-1, num_classes))
    summary["multilabel"] = {"precision": prf["precision"], "recall": prf["recall"], "f1": prf["f1"]}
    return probe_pred


def _resolve_device(device: str) -> torch.device:
    """"auto" (CUDA when available) | "cpu" | "cuda" -> the torch device."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    return torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")


def _heatmaps(dual: DualEncoder, world: WorldConfig, world_dir: Optional[Path], indices: list[int],
              out_png: Path) -> None:
    """SPARC alignment heatmaps of the world images at ``indices`` and their short captions."""
    samples = [generate_sample(i, world.seed, world) for i in indices]
    alignment_heatmaps(dual, [_world_image(s, world_dir)[0] for s in samples], [s.captions["short"] for s in samples],
                       out_png)


def _text_side(loaded: LoadedEncoder, ev, ev_feats: dict, pooling: Optional[nn.Module], dev: torch.device,
               batch_size: int, summary: dict, records: list[dict]) -> torch.Tensor:
    """The metrics that need the text side, into ``summary`` / ``records``: zero-shot
    classification, retrieval, zero-shot segmentation (``patch_miou``) and pointing. Returns the
    zero-shot segmentation's patch predictions [N,P]."""
    dual = loaded.dual
    score = _Scorer(ev_feats["global_emb"], ev_feats["patch_emb"], pooling, dev, batch_size)
    summary["scoring"] = score.name
    _zero_shot(dual, ev, score, summary, records)
    _retrieval(dual, ev, score, batch_size, summary, records)
    zs_seg_pred = _zero_shot_segmentation(dual, ev, ev_feats["patch_emb"], summary)
    summary["patch_miou"] = summary["segmentation"]["zero_shot_miou"]
    _pointing(dual, ev, ev_feats["patch_emb"], batch_size, summary, records)
    return zs_seg_pred


def _patch_accuracies(records: list[dict], seg_labels: torch.Tensor, zero_shot: Optional[torch.Tensor],
                      probe: torch.Tensor) -> None:
    """Per image, the fraction of patches each segmentation labels right ([N,P] predictions vs labels)."""
    for i, rec in enumerate(records):
        if zero_shot is not None:
            rec["seg_zero_shot_patch_acc"] = float((zero_shot[i] == seg_labels[i]).double().mean())
        rec["seg_probe_patch_acc"] = float((probe[i] == seg_labels[i]).double().mean())


def run(ckpt: Union[str, Path], out_dir: Union[str, Path], world: WorldConfig,
        world_dir: Optional[Union[str, Path]] = None, probe_steps: int = 300, limit: Optional[int] = None,
        text_from: Optional[Union[str, Path]] = None, probe_images: int = 512, batch_size: int = 64,
        progress: bool = True, device: str = "auto", heatmap_images: int = 4,
        flair_scoring: str = "conditioned", single_images: int = SINGLE_IMAGES) -> dict:
    """Evaluate ``ckpt`` (see the module docstring); writes ``out_dir/{summary.json,summary.md,
    predictions.jsonl}`` and returns the summary dict (None for metrics that do not apply).
    ``device``: auto (CUDA when available) | cpu | cuda; the encoder and the probes run there.
    With a text side and ``heatmap_images`` > 0 it also draws the SPARC alignment heatmaps of the
    first ``heatmap_images`` eval images and their short captions (``eval.heatmaps``) to
    ``out_dir/heatmaps.png`` (``summary["heatmaps"]``; None when not drawn).
    ``flair_scoring``: conditioned (default, the reference's ``--inference-with-flair``) | global;
    how a FLAIR checkpoint's zero-shot and retrieval score a pair (other objectives: global).
    ``single_images``: how many held-out single-object images the single-object zero-shot uses
    (0: skip it); their predictions go to ``out_dir/predictions_single.jsonl``."""
    if flair_scoring not in ("conditioned", "global"):
        raise ValueError(f"flair_scoring must be conditioned or global, got {flair_scoring!r}")
    if probe_steps < 1 or probe_images < 1 or single_images < 0:
        raise ValueError(f"probe_steps and probe_images must be >= 1 and single_images >= 0, got {probe_steps}, "
                         f"{probe_images}, {single_images}")
    out_dir = Path(out_dir)
    world_dir = Path(world_dir) if world_dir is not None else None
    dev = _resolve_device(device)
    loaded = load_encoder(ckpt, text_from)
    (loaded.dual if loaded.dual is not None else loaded.vision).to(dev)
    patch_size, num_classes = tower_patch_size(loaded.vision), len(CLASS_NAMES)
    train_idx, eval_idx = world_split(world)
    train_idx, eval_idx = list(train_idx)[:probe_images], list(eval_idx)[:limit]
    if not eval_idx:
        raise ValueError("the world has no eval images (world.n_eval = 0 or limit = 0)")

    dual = loaded.dual
    ev, source = _load_split(eval_idx, world, world_dir, loaded.transform, patch_size, num_classes, dual is not None,
                             progress, "eval images")
    tr, _ = _load_split(train_idx, world, world_dir, loaded.transform, patch_size, num_classes, False,
                        progress, "probe images")
    ev_feats = _image_features(loaded, ev.pixels, batch_size, progress, "encode eval")
    tr_feats = _image_features(loaded, tr.pixels, batch_size, progress, "encode probe")
    summary = _empty_summary(ckpt, loaded, text_from, len(eval_idx), len(train_idx), source, probe_steps)
    records = [{"index": i} for i in eval_idx]

    zs_seg_pred = None
    if dual is not None:  # zero-shot classification, retrieval and segmentation need the text side
        pooling = loaded.flair_pooling if flair_scoring == "conditioned" else None
        zs_seg_pred = _text_side(loaded, ev, ev_feats, pooling, dev, batch_size, summary, records)
        if single_images:
            single_records = _zero_shot_single(loaded, world, single_images, pooling, dev, batch_size, progress,
                                               summary)
            write_jsonl(out_dir / "predictions_single.jsonl", single_records)
    probe_pred = _probes(tr, ev, tr_feats["patch_tokens"], ev_feats["patch_tokens"], probe_steps, dev, summary)
    _patch_accuracies(records, ev.seg_labels, zs_seg_pred, probe_pred)
    summary["heatmaps"] = None
    if dual is not None and heatmap_images > 0:
        _heatmaps(dual, world, world_dir, eval_idx[:heatmap_images], out_dir / "heatmaps.png")
        summary["heatmaps"] = "heatmaps.png"
    write_jsonl(out_dir / "predictions.jsonl", records)
    return write_summary(out_dir, summary)


__all__ = ["REPORT_COLUMNS", "LoadedEncoder", "class_embeddings", "confusion_matrix", "dominant_shape",
           "first_relevant_rank", "load_encoder", "load_flair_pooling", "majority_downsample", "marginal_predictions",
           "mean_iou", "multilabel_prf", "pair_prompts", "patch_presence", "presence_ceiling", "recall_at_k", "run",
           "single_object_world", "top1_accuracy", "train_probe", "write_summary"]
