"""Encoder evals on real images: zero-shot classification from an ImageFolder, retrieval from COCO captions.

``run_real(ckpt, out_dir, imagefolder=..., captions=..., images=...)`` scores a DualEncoder
checkpoint (a text side is needed) as ``eval.encoder`` scores it on the world, with the same
``_Scorer`` (global cosine, or FLAIR's text-conditioned pooling) and the same ranking metrics:

- **Zero-shot classification** (top-1, top-5, mean per-class accuracy) on an ImageFolder-style
  directory: one sub-folder per class (sorted by name: the class order), its images inside (any
  depth). Class names: ``classnames`` (a text file, one name per line in the folders' order, or a
  json mapping folder -> name), else the folder names with ``_`` read as spaces. Prompt
  templates: ``templates`` (a text file, one template per line, ``{}`` or ``{c}`` where the name
  goes), else ``eval.encoder.PROMPT``. A class's text embedding is the mean of its templates'
  normalised global embeddings, renormalised (open_clip's ``build_zero_shot_classifier``).
- **Retrieval** (image->text and text->image Recall@1/5/10) over the images of a COCO captions
  json (``captions``) under ``images``; an image's own captions are its positives, ties count
  against the query (``eval.encoder.first_relevant_rank``).

``limit`` keeps the first N images (ImageFolder: in sorted path order; COCO: in the json's order).
Outputs in ``out_dir``: ``summary.json`` / ``summary.md`` and, per example as for the world,
``predictions_zero_shot.jsonl`` ({image, label, pred, top5}) and ``predictions_retrieval.jsonl``
({image, captions, i2t_rank, t2i_ranks}; ranks 0-based, as for the world).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from PIL import Image

from eval.encoder import (PROMPT, RECALL_KS, LoadedEncoder, _resolve_device, _Scorer, _text_features,
                          first_relevant_rank, load_encoder, recall_at_k, top1_accuracy, write_summary)
from eval.report import write_jsonl
from vlm.data.formats import read_coco_captions

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
PathLike = Union[str, Path]


@dataclass
class ImageFolderData:
    """An ImageFolder: ``paths[i]`` is an image of class ``labels[i]``; ``classes`` are the folder names."""

    root: Path
    classes: list[str]
    paths: list[Path]
    labels: list[int]


def read_imagefolder(root: PathLike, limit: Optional[int] = None) -> ImageFolderData:
    """The images of ``root/<class>/**`` with their class indices (classes sorted by folder name)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--imagefolder {root}: not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"--imagefolder {root}: no class sub-folders (expected ROOT/<class>/<image>)")
    items = [(p, c) for c, name in enumerate(classes) for p in sorted((root / name).rglob("*"))
             if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if not items:
        raise ValueError(f"--imagefolder {root}: no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    items = items[:limit] if limit is not None else items
    return ImageFolderData(root, classes, [p for p, _ in items], [c for _, c in items])


def read_classnames(path: Optional[PathLike], folders: Sequence[str]) -> list[str]:
    """Class names in folder order: from ``path`` (one per line, or a json {folder: name}), else the
    folder names with underscores as spaces."""
    if path is None:
        return [f.replace("_", " ") for f in folders]
    text = Path(path).read_text()
    if Path(path).suffix == ".json":
        mapping = json.loads(text)
        missing = [f for f in folders if f not in mapping]
        if missing:
            raise ValueError(f"--classnames {path}: no name for folder(s) {missing[:5]}")
        return [str(mapping[f]) for f in folders]
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != len(folders):
        raise ValueError(f"--classnames {path}: {len(names)} names for {len(folders)} class folders")
    return names


def read_templates(path: Optional[PathLike]) -> list[str]:
    """Prompt templates (``{}`` or ``{c}`` where the class name goes), one per line; default ``PROMPT``."""
    if path is None:
        return [PROMPT]
    templates = [line.strip().replace("{c}", "{}") for line in Path(path).read_text().splitlines() if line.strip()]
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(f"--templates {path}: each line needs one {{}} (or {{c}}) for the class name; bad: {bad[:3]}")
    return templates


@torch.no_grad()
def classifier_embeddings(loaded: LoadedEncoder, names: Sequence[str], templates: Sequence[str],
                          batch_size: int) -> torch.Tensor:
    """[C,d]: per class, the mean of its templates' normalised global text embeddings, renormalised."""
    texts = [t.format(name) for name in names for t in templates]
    emb = F.normalize(_text_features(loaded.dual, texts, batch_size).float(), dim=-1)
    return F.normalize(emb.view(len(names), len(templates), -1).mean(1), dim=-1)


@torch.no_grad()
def encode_images(loaded: LoadedEncoder, paths: Sequence[Path], batch_size: int, device: torch.device,
                  keep_patches: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(global_emb [N,d], patch_emb [N,P,d] or None) of the image files, ``batch_size`` at a time."""
    glob, patch = [], []
    for start in range(0, len(paths), batch_size):
        pixels = []
        for p in paths[start:start + batch_size]:
            with Image.open(p) as im:
                pixels.append(loaded.transform(im.convert("RGB")))
        feats = loaded.dual.encode_image(torch.stack(pixels).to(device))
        glob.append(feats.global_emb.cpu())
        if keep_patches:
            patch.append(feats.patch_emb.cpu())
    return torch.cat(glob), torch.cat(patch) if keep_patches else None


@dataclass
class Scoring:
    """Where and how pairs are scored: the device, the batch size, FLAIR's pooling (None: global cosine)."""

    device: torch.device
    batch_size: int
    pooling: Optional[torch.nn.Module]

    def scorer(self, loaded: LoadedEncoder, paths: Sequence[Path]) -> _Scorer:
        """The ``_Scorer`` of the images at ``paths``."""
        glob, patch = encode_images(loaded, paths, self.batch_size, self.device, self.pooling is not None)
        return _Scorer(glob, patch, self.pooling, self.device, self.batch_size)


def zero_shot_imagefolder(loaded: LoadedEncoder, data: ImageFolderData, names: list[str], templates: list[str],
                          scoring: Scoring) -> tuple[dict, list[dict]]:
    """Zero-shot top-1 / top-5 / mean per-class accuracy on ``data``; (metrics, one record per image)."""
    score = scoring.scorer(loaded, data.paths)
    scores = score(classifier_embeddings(loaded, names, templates, scoring.batch_size))  # [N,C]
    labels = torch.tensor(data.labels)
    k = min(5, len(names))
    topk = scores.topk(k, dim=1).indices
    per_class = [float((topk[labels == c, 0] == c).double().mean()) for c in range(len(names)) if (labels == c).any()]
    metrics = {"top1": top1_accuracy(topk[:, 0], labels), f"top{k}": float((topk == labels[:, None]).any(1).double().mean()),
               "mean_per_class": sum(per_class) / len(per_class), "n_images": len(data.paths),
               "n_classes": len(names), "templates": len(templates), "scoring": score.name}
    records = [{"image": str(p.relative_to(data.root)), "label": names[y], "pred": names[int(t[0])],
                "top5": [names[int(c)] for c in t]} for p, y, t in zip(data.paths, data.labels, topk)]
    return metrics, records


def retrieval_coco(loaded: LoadedEncoder, captions_json: PathLike, images: PathLike, limit: Optional[int],
                   scoring: Scoring) -> tuple[dict, list[dict]]:
    """Image->text and text->image Recall@1/5/10 over a COCO captions json's images (under
    ``images``) and their captions; (metrics, one record per image)."""
    coco = read_coco_captions(captions_json)
    ids = [i for i in coco.images if coco.captions[i]][:limit]
    if not ids:
        raise ValueError(f"--captions {captions_json}: no image with a caption")
    paths = [Path(images) / coco.images[i] for i in ids]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"--images: {len(missing)} image(s) of {captions_json} missing, e.g. {missing[:3]}")
    texts = [c for i in ids for c in coco.captions[i]]
    owner = torch.tensor([n for n, i in enumerate(ids) for _ in coco.captions[i]])
    score = scoring.scorer(loaded, paths)
    sim = score(_text_features(loaded.dual, texts, scoring.batch_size))  # [N_img, N_txt]
    relevant = owner.unsqueeze(0) == torch.arange(len(ids)).unsqueeze(1)
    metrics: dict = {"n_images": len(ids), "n_captions": len(texts), "scoring": score.name}
    for direction, (s, r) in {"i2t": (sim, relevant), "t2i": (sim.T, relevant.T)}.items():
        metrics.update({f"{direction}_r{k}": v for k, v in recall_at_k(s, r, RECALL_KS).items()})
    i2t, t2i = first_relevant_rank(sim, relevant), first_relevant_rank(sim.T, relevant.T)
    records = [{"image": coco.images[i], "captions": coco.captions[i], "i2t_rank": int(i2t[n]),
                "t2i_ranks": [int(r) for r in t2i[owner == n]]} for n, i in enumerate(ids)]
    return metrics, records


def run_real(ckpt: PathLike, out_dir: PathLike, imagefolder: Optional[PathLike] = None,
             classnames: Optional[PathLike] = None, templates: Optional[PathLike] = None,
             captions: Optional[PathLike] = None, images: Optional[PathLike] = None,
             text_from: Optional[PathLike] = None, limit: Optional[int] = None, batch_size: int = 64,
             device: str = "auto", flair_scoring: str = "conditioned") -> dict:
    """Zero-shot classification (``imagefolder``) and / or retrieval (``captions`` + ``images``) of
    ``ckpt`` (see the module docstring); writes ``out_dir`` and returns the summary."""
    if imagefolder is None and captions is None:
        raise ValueError("give --imagefolder (zero-shot classification) and/or --captions with --images (retrieval)")
    if captions is not None and images is None:
        raise ValueError("--captions needs --images, the folder its file_name entries are relative to")
    loaded = load_encoder(ckpt, text_from)
    if loaded.dual is None:
        raise ValueError(f"{ckpt} is a plain vision tower: zero-shot and retrieval need a text side (--text-from)")
    dev = _resolve_device(device)
    loaded.dual.to(dev)
    scoring = Scoring(dev, batch_size, loaded.flair_pooling if flair_scoring == "conditioned" else None)
    out_dir = Path(out_dir)
    summary: dict = {"ckpt": str(ckpt), "mode": loaded.mode, "zero_shot": None, "retrieval": None}
    if imagefolder is not None:
        data = read_imagefolder(imagefolder, limit)
        names = read_classnames(classnames, data.classes)
        summary["zero_shot"], recs = zero_shot_imagefolder(loaded, data, names, read_templates(templates), scoring)
        summary["imagefolder"] = str(imagefolder)
        write_jsonl(out_dir / "predictions_zero_shot.jsonl", recs)
    if captions is not None:
        summary["retrieval"], recs = retrieval_coco(loaded, captions, images, limit, scoring)
        summary["captions"] = str(captions)
        write_jsonl(out_dir / "predictions_retrieval.jsonl", recs)
    return write_summary(out_dir, summary, title="Encoder eval (real data)")


__all__ = ["ImageFolderData", "Scoring", "classifier_embeddings", "read_classnames", "read_imagefolder",
           "read_templates", "retrieval_coco", "run_real", "zero_shot_imagefolder"]
