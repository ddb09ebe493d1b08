"""``run_vlm_eval``: every VLM benchmark on one stage-two checkpoint, on the world or real files.

Tasks (the registry ``eval.tasks.VLM_TASKS``): ``caption`` (BLEU/METEOR/ROUGE-L/CIDEr), ``chair``,
``pope``, ``refcoco``, ``vsr``, and ``grounding_attention`` (where a projector VLM's LLM looks while it
grounds, on RefCOCO's files; only when asked for). All files a task needs are located and read (the ``vlm.data.formats`` readers raise ``FormatError``
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

``DIR/paths.yaml`` (or ``data=some.yaml`` directly) may map any of the keys of ``eval.sources.REAL_LAYOUT``
to other paths, relative to the yaml's folder: e.g. ``vsr_images: /data/coco/all_images``.

Outputs: ``out_dir/<task>/{predictions.jsonl, summary.json, summary.md}`` per task and
``out_dir/summary.json`` + ``out_dir/summary.md`` combining them, with the wall time per task.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import torch

from eval.io import ANSWER_MODES, RunOptions
from eval.report import flatten, markdown_table, write_summary
from eval.sources import EvalSources, resolve_sources
from eval.tasks import VLM_TASKS
from vlm.config import WorldConfig
from vlm.model.hf_vlm import HFVisionLanguageModel
from vlm.model.vision_language_model import VisionLanguageModel
from vlm.world.export import ensure_world

__all__ = ["EvalSources", "combined_markdown", "load_task_data", "resolve_sources", "run_vlm_eval"]


def load_task_data(task: str, src: EvalSources, limit: Optional[int] = None):
    """Read and validate one task's files (FormatError on a malformed file; FileNotFoundError on a
    missing file or image) -> the task's data object (``VLM_TASKS[task].load``)."""
    if task not in VLM_TASKS:
        raise ValueError(f"unknown task {task!r}; valid: {', '.join(VLM_TASKS)}")
    return VLM_TASKS[task].load(src, limit)


def _check_arguments(tasks: list[str], answer_mode: str, limit: Optional[int]) -> None:
    """ValueError on an unknown (or no) task, answer mode or a limit <= 0."""
    unknown = [t for t in tasks if t not in VLM_TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown or no tasks {unknown or tasks}; valid: {', '.join(VLM_TASKS)}")
    if answer_mode not in ANSWER_MODES:
        raise ValueError(f"answer_mode must be 'score' or 'generate', got {answer_mode!r}")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be > 0 or None, got {limit}")


def _load_model(ckpt_or_model, hf_model: bool = False) -> tuple[Any, str]:
    """(model in eval mode, its name): a checkpoint dir is loaded (``hf_model``: a local HF VLM dir,
    ``HFVisionLanguageModel``), a model object used as it is."""
    if isinstance(ckpt_or_model, (str, Path)):
        loader = HFVisionLanguageModel if hf_model else VisionLanguageModel
        model, name = loader.from_pretrained(ckpt_or_model), str(ckpt_or_model)
    else:
        model, name = ckpt_or_model, type(ckpt_or_model).__name__
    if hasattr(model, "eval"):
        model.eval()
    return model, name


def _run_tasks(model, task_data: dict[str, Any], out_dir: Path, limit: Optional[int], batch_size: int,
               options: RunOptions) -> tuple[dict[str, Any], dict[str, float]]:
    """Run each task in order -> ({task: summary}, {task: wall seconds})."""
    summary: dict[str, Any] = {}
    wall: dict[str, float] = {}
    with torch.inference_mode():
        for task, data in task_data.items():
            start = time.perf_counter()
            summary[task] = VLM_TASKS[task].run(model, data, out_dir, limit, batch_size, options)
            wall[task] = time.perf_counter() - start
    return summary, wall


def run_vlm_eval(ckpt_or_model, tasks: list[str], out_dir: str | Path, data: Optional[str | Path] = None,
                 world_dir: str | Path = "runs/world", world_cfg=None, limit: Optional[int] = None,
                 batch_size: int = 16, answer_mode: str = "score", progress: bool = True,
                 blank_image: bool = False, hf_model: bool = False, prompt_set: str = "world") -> dict[str, Any]:
    """Evaluate a VLM on ``tasks`` and write per-task and combined outputs under ``out_dir``.

    ckpt_or_model  a stage-two checkpoint dir (``VisionLanguageModel.from_pretrained``), with
                   ``hf_model`` a local HF VLM dir (``HFVisionLanguageModel``: LLaVA, any
                   ``AutoModelForImageTextToText`` with a chat template), or a model object with
                   ``generate`` / ``score`` / ``image_transform``
    tasks          names of ``eval.tasks.VLM_TASKS``; data: None = the world, else real files (module docstring)
    limit          at most this many examples per task (per split for POPE)
    batch_size     images per model call ([B,3,H,W] pixels)
    answer_mode    POPE / VSR answers: "score" (single-forward log-prob comparison, with AUC) or
                   "generate" (generated text parsed the reference way)
    prompt_set     the wording every task asks with (``eval.prompt_sets``: "world" or "lmms-eval")
    blank_image    the image-ablation control: every image replaced by a uniform one of the processor's
                   mean colour at the same size (``eval.io.blank_like``); write it to its own ``out_dir``
    hf_model       ``ckpt_or_model`` is a local HF VLM dir (``--hf-model``), not our checkpoint
    Returns {task: summary, ..., "wall_s": {task: seconds}, "data": ..., "checkpoint": ..., "limit": ...,
    "blank_image": bool, "hf_model": bool, "prompt_set": str, "answer_mode": str}.
    """
    tasks = list(dict.fromkeys(tasks))
    _check_arguments(tasks, answer_mode, limit)
    if data is None and not (Path(world_dir) / "world.json").is_file():
        ensure_world(world_dir, world_cfg if world_cfg is not None else WorldConfig())
    src = resolve_sources(data, world_dir)
    # Every file is read and checked before the model is loaded; tasks with one loader (refcoco and
    # grounding_attention read the same files) share what it read.
    loaded: dict = {}
    task_data = {}
    for t in tasks:
        loader = VLM_TASKS[t].load
        if loader not in loaded:
            loaded[loader] = load_task_data(t, src, limit)
        task_data[t] = loaded[loader]
    model, ckpt_name = _load_model(ckpt_or_model, hf_model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary, wall = _run_tasks(model, task_data, out_dir, limit, batch_size,
                               RunOptions(progress=progress, answer_mode=answer_mode, blank_image=blank_image,
                                          prompt_set=prompt_set))
    summary["wall_s"] = wall
    summary["data"] = "world" if src.kind == "world" else str(src.root)
    summary["checkpoint"] = ckpt_name
    summary["hf_model"] = hf_model
    summary["limit"] = limit
    summary["blank_image"] = blank_image
    summary["prompt_set"] = prompt_set
    summary["answer_mode"] = answer_mode
    write_summary(out_dir, summary, combined_markdown(summary, tasks))
    return summary


def combined_markdown(summary: dict[str, Any], tasks: list[str]) -> str:
    """The combined report: one (task, metric, value) table of the headline numbers (each task
    module's ``HEADLINE``) and the wall times."""
    rows = []
    for t in tasks:
        flat = flatten(summary[t])
        how = ", ".join(str(flat[k]) for k in ("mode", "prompt_set") if k in flat)
        rows += [[t, k, flat[k], how] for k in VLM_TASKS[t].HEADLINE if k in flat]
    blank = " with every image blanked (the image-ablation control)" if summary.get("blank_image") else ""
    lines = [f"# VLM evaluation ({summary['data']}){blank}", "", f"checkpoint: `{summary['checkpoint']}`", "",
             markdown_table(["task", "metric", "value", "answer mode, prompt set"], rows), "", "## Wall time", "",
             markdown_table(["task", "seconds"], [[t, summary["wall_s"][t]] for t in tasks], digits=1), "",
             "Per-example predictions: `<task>/predictions.jsonl`.", ""]
    return "\n".join(lines)
