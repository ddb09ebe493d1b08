"""``run_vlm_eval``: every VLM benchmark on one stage-two checkpoint, on the world or real files.

Tasks: ``caption`` (BLEU/METEOR/ROUGE-L/CIDEr), ``chair``, ``pope``, ``refcoco``, ``vsr``. All
files a task needs are located and read (the ``vlm.data.formats`` readers raise ``FormatError``
with file and line) and every image it will look at is checked to exist, all BEFORE the model is
loaded, so a malformed file costs seconds, not a model load and half an eval.

Where the files come from
-------------------------
The world (default, ``data=None``): the export layout under ``world_dir`` (``vlm world``):
``coco/captions_val.json`` + ``images/`` (caption, chair), ``coco/instances_val.json`` (chair: each
image's shapes; synonyms ``vlm.world.vocab.CHAIR_SYNONYMS``), ``pope/{random,popular,adversarial}.jsonl``,
``refcoco/refs.json`` + ``refcoco/instances.json``, ``vsr/test.jsonl``; images in ``images/``.
When ``world_dir`` has no export, it is exported first with ``world_cfg`` (default ``WorldConfig()``).

Real data (``data=DIR``), this layout (every key may be overridden, see below)::

    DIR/coco/captions_val2014.json       caption, chair (reference captions)
    DIR/coco/instances_val2014.json      chair (segmentation classes; COCO synonym table)
    DIR/coco/val2014/                    images of the two files above and of POPE
    DIR/pope/{random,popular,adversarial}.jsonl   POPE questions (the POPE repo's coco_pope_*.json files)
    DIR/refcoco/refs.json                RefCOCO refs as json (see vlm.data.formats.read_refcoco)
    DIR/refcoco/instances.json           the COCO instances the refs join to (by ann_id)
    DIR/coco/train2014/                  RefCOCO images (RefCOCO is drawn from COCO train2014)
    DIR/vsr/test.jsonl + DIR/vsr/images/ VSR zero-shot test split and its images

``DIR/paths.yaml`` (or ``data=some.yaml`` directly) may map any of the keys of ``REAL_LAYOUT``
to other paths, relative to the yaml's folder: e.g. ``vsr_images: /data/coco/all_images``.

Outputs: ``out_dir/<task>/{predictions.jsonl, summary.json, summary.md}`` per task and
``out_dir/summary.json`` + ``out_dir/summary.md`` combining them, with the wall time per task.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from eval import captioning, chair, pope, refcoco, vsr
from eval.report import flatten, markdown_table, write_json

TASKS = ("caption", "chair", "pope", "refcoco", "vsr")

WORLD_LAYOUT = {
    "captions": "coco/captions_val.json",
    "instances": "coco/instances_val.json",
    "images": "images",
    "pope_random": "pope/random.jsonl",
    "pope_popular": "pope/popular.jsonl",
    "pope_adversarial": "pope/adversarial.jsonl",
    "pope_images": "images",
    "refcoco_refs": "refcoco/refs.json",
    "refcoco_instances": "refcoco/instances.json",
    "refcoco_images": "images",
    "vsr": "vsr/test.jsonl",
    "vsr_images": "images",
}
REAL_LAYOUT = {
    "captions": "coco/captions_val2014.json",
    "instances": "coco/instances_val2014.json",
    "images": "coco/val2014",
    "pope_random": "pope/random.jsonl",
    "pope_popular": "pope/popular.jsonl",
    "pope_adversarial": "pope/adversarial.jsonl",
    "pope_images": "coco/val2014",
    "refcoco_refs": "refcoco/refs.json",
    "refcoco_instances": "refcoco/instances.json",
    "refcoco_images": "coco/train2014",
    "vsr": "vsr/test.jsonl",
    "vsr_images": "vsr/images",
}
TASK_KEYS = {
    "caption": ("captions", "images"),
    "chair": ("captions", "instances", "images"),
    "pope": ("pope_random", "pope_popular", "pope_adversarial", "pope_images"),
    "refcoco": ("refcoco_refs", "refcoco_instances", "refcoco_images"),
    "vsr": ("vsr", "vsr_images"),
}


@dataclass
class EvalSources:
    """Resolved file locations (key -> Path) and whether they are the world's (``kind``)."""

    kind: str  # "world" | "real"
    root: Path
    paths: dict[str, Path] = field(default_factory=dict)

    def get(self, key: str) -> Path:
        """The path of one layout key (a key of ``WORLD_LAYOUT`` / ``REAL_LAYOUT``)."""
        return self.paths[key]


def resolve_sources(data: Optional[str | Path], world_dir: str | Path) -> EvalSources:
    """Where each file lives: the world export under ``world_dir`` (data None) or real files under
    ``data`` (a folder, optionally with paths.yaml, or a yaml mapping keys to paths)."""
    if data is None:
        root = Path(world_dir)
        return EvalSources("world", root, {k: root / v for k, v in WORLD_LAYOUT.items()})
    data = Path(data)
    overrides: dict[str, Any] = {}
    if data.is_file() and data.suffix in (".yaml", ".yml", ".json"):
        mapping_file, root = data, data.parent
    elif data.is_dir():
        root = data
        mapping_file = next((data / n for n in ("paths.yaml", "paths.yml", "paths.json") if (data / n).is_file()), None)
    else:
        raise FileNotFoundError(f"--data {data}: neither a folder nor a yaml/json mapping file")
    if mapping_file is not None:
        from omegaconf import OmegaConf

        loaded = OmegaConf.to_container(OmegaConf.load(mapping_file))
        if not isinstance(loaded, dict):
            raise ValueError(f"{mapping_file}: should map keys to paths, got {type(loaded).__name__}")
        unknown = sorted(set(loaded) - set(REAL_LAYOUT))
        if unknown:
            raise ValueError(f"{mapping_file}: unknown key(s) {unknown}; valid: {sorted(REAL_LAYOUT)}")
        overrides = loaded
    paths = {k: (root / str(overrides.get(k, v))) for k, v in REAL_LAYOUT.items()}
    return EvalSources("real", root, paths)


def _need(path: Path, key: str, is_dir: bool = False) -> Path:
    ok = path.is_dir() if is_dir else path.is_file()
    if not ok:
        raise FileNotFoundError(f"{key}: {'folder' if is_dir else 'file'} not found: {path}")
    return path


def _check_images(paths: list[Path], task: str) -> None:
    missing = [str(p) for p in dict.fromkeys(paths) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{task}: {len(missing)} image(s) missing, e.g. {missing[:3]}")


def _first(items: list, limit: Optional[int]) -> list:
    return items[: limit if limit is not None else None]


def load_task_data(task: str, src: EvalSources, limit: Optional[int] = None):
    """Read and validate one task's files (FormatError on a malformed file; FileNotFoundError on a
    missing file or image) -> the task's data object (CaptionData, ChairData, PopeData, RefcocoData, VsrData)."""
    from vlm.data.formats import read_coco_captions, read_coco_instances, read_pope, read_refcoco, read_vsr

    p = src.paths
    if task in ("caption", "chair"):
        caps = read_coco_captions(_need(p["captions"], "captions"))
        root = _need(p["images"], "images", is_dir=True)
        images = {i: root / f for i, f in caps.images.items()}
        empty = [i for i, c in caps.captions.items() if not c]
        if empty and task == "caption":
            raise ValueError(f"{p['captions']}: images without reference captions, e.g. ids {empty[:5]}")
        ids = _first(sorted(images), limit)
        _check_images([images[i] for i in ids], task)
        if task == "caption":
            return captioning.CaptionData({i: images[i] for i in ids}, {i: caps.captions[i] for i in ids})
        inst = read_coco_instances(_need(p["instances"], "instances"))
        classes: dict[int, list[str]] = {i: [] for i in ids}
        for ann in inst.annotations.values():
            if ann["image_id"] in classes:
                classes[ann["image_id"]].append(inst.categories[ann["category_id"]])
        if src.kind == "world":
            vocab = chair.world_vocab()
            present = chair.ground_truth(vocab, classes)
        else:
            vocab = chair.coco_vocab()
            present = chair.ground_truth(vocab, classes, {i: caps.captions[i] for i in ids})
        return chair.ChairData({i: images[i] for i in ids}, present, vocab)
    if task == "pope":
        root = _need(p["pope_images"], "pope_images", is_dir=True)
        questions = {s: _first(read_pope(_need(p[f"pope_{s}"], f"pope_{s}")), limit) for s in pope.SPLITS}
        _check_images([root / q.image for qs in questions.values() for q in qs], task)
        return pope.PopeData(questions, root)
    if task == "refcoco":
        root = _need(p["refcoco_images"], "refcoco_images", is_dir=True)
        refs = read_refcoco(_need(p["refcoco_refs"], "refcoco_refs"), _need(p["refcoco_instances"], "refcoco_instances"))
        _check_images([root / r.file_name for r in _first(refs, limit)], task)
        return refcoco.RefcocoData(refs, root)
    if task == "vsr":
        root = _need(p["vsr_images"], "vsr_images", is_dir=True)
        items = read_vsr(_need(p["vsr"], "vsr"))
        _check_images([root / it.image for it in _first(items, limit)], task)
        return vsr.VsrData(items, root)
    raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")


def run_vlm_eval(ckpt_or_model, tasks: list[str], out_dir: str | Path, data: Optional[str | Path] = None,
                 world_dir: str | Path = "runs/world", world_cfg=None, limit: Optional[int] = None,
                 batch_size: int = 16, answer_mode: str = "score", progress: bool = True) -> dict[str, Any]:
    """Evaluate a VLM on ``tasks`` and write per-task and combined outputs under ``out_dir``.

    ckpt_or_model  a stage-two checkpoint dir (``VisionLanguageModel.from_pretrained``) or a model
                   object with ``generate`` / ``score`` / ``image_transform``
    tasks          subset of ``TASKS``; data: None = the world, else real files (module docstring)
    limit          at most this many examples per task (per split for POPE)
    answer_mode    POPE / VSR answers: "score" (single-forward log-prob comparison, with AUC) or
                   "generate" (generated text parsed the reference way)
    Returns {task: summary, ..., "wall_s": {task: seconds}, "data": ..., "checkpoint": ...}.
    """
    tasks = list(dict.fromkeys(tasks))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown or no tasks {unknown or tasks}; valid: {', '.join(TASKS)}")
    if answer_mode not in ("score", "generate"):
        raise ValueError(f"answer_mode must be 'score' or 'generate', got {answer_mode!r}")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be > 0 or None, got {limit}")
    if data is None and not (Path(world_dir) / "world.json").is_file():
        from vlm.config import WorldConfig
        from vlm.world.export import ensure_world

        ensure_world(world_dir, world_cfg if world_cfg is not None else WorldConfig())
    src = resolve_sources(data, world_dir)
    # Every file is read and checked before the model is loaded.
    task_data = {t: load_task_data(t, src, limit) for t in tasks}

    if isinstance(ckpt_or_model, (str, Path)):
        from vlm.model.vision_language_model import VisionLanguageModel

        model = VisionLanguageModel.from_pretrained(ckpt_or_model)
        ckpt_name = str(ckpt_or_model)
    else:
        model, ckpt_name = ckpt_or_model, type(ckpt_or_model).__name__
    if hasattr(model, "eval"):
        model.eval()

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {}
    wall: dict[str, float] = {}
    captions: Optional[dict[int, str]] = None
    import torch

    with torch.inference_mode():
        for t in tasks:
            start = time.perf_counter()
            d = task_data[t]
            if t == "caption":
                summary[t], captions = captioning.caption_and_score(model, d, out_dir, batch_size=batch_size,
                                                                    progress=progress)
            elif t == "chair":
                summary[t] = chair.run(model, d, out_dir, batch_size=batch_size, captions=captions, progress=progress)
            elif t == "pope":
                summary[t] = pope.run(model, d, out_dir, limit=limit, batch_size=batch_size, mode=answer_mode,
                                      progress=progress)
            elif t == "refcoco":
                summary[t] = refcoco.run(model, d, out_dir, limit=limit, batch_size=batch_size, progress=progress)
            elif t == "vsr":
                summary[t] = vsr.run(model, d, out_dir, limit=limit, batch_size=batch_size, mode=answer_mode,
                                     progress=progress)
            wall[t] = time.perf_counter() - start
    summary["wall_s"] = wall
    summary["data"] = "world" if src.kind == "world" else str(src.root)
    summary["checkpoint"] = ckpt_name
    summary["limit"] = limit
    write_json(out_dir / "summary.json", summary)
    (out_dir / "summary.md").write_text(combined_markdown(summary, tasks))
    return summary


HEADLINE = {
    "caption": ["BLEU_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE"],
    "chair": ["chair_i", "chair_s", "recall", "mean_length"],
    "pope": ["f1_avg", "accuracy_avg", "random/f1", "popular/f1", "adversarial/f1"],
    "refcoco": ["acc", "unparseable", "n"],
    "vsr": ["accuracy", "auc", "n"],
}


def combined_markdown(summary: dict[str, Any], tasks: list[str]) -> str:
    """The combined report: one (task, metric, value) table of the headline numbers and wall times."""
    rows = []
    for t in tasks:
        flat = flatten(summary[t])
        rows += [[t, k, flat[k]] for k in HEADLINE[t] if k in flat]
    lines = [f"# VLM evaluation ({summary['data']})", "", f"checkpoint: `{summary['checkpoint']}`", "",
             markdown_table(["task", "metric", "value"], rows), "", "## Wall time", "",
             markdown_table(["task", "seconds"], [[t, summary["wall_s"][t]] for t in tasks], digits=1), "",
             "Per-example predictions: `<task>/predictions.jsonl`.", ""]
    return "\n".join(lines)
