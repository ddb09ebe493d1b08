"""Where the LLM looks while it grounds: its attention over the image tokens, scored against the boxes.

RefCOCO's Acc@0.5 says whether a box came out right, not whether the model looked at the named object
and then failed to write its box, or never found it. For each RefCOCO expression (the refcoco task's
files and prompt), the model reads the image, ``grounding_prompt(sentence)`` and the answer's opening
"[" (the position that predicts x1); ``VisionLanguageModel.image_attention`` gives every LLM layer's
head-averaged attention from that position over the P image tokens, a sqrt(P) x sqrt(P) grid over the
padded square the model sees. The layers' maps are averaged and renormalised over the image tokens
into one map ``a`` [P] per expression. A patch belongs to a box when its centre lies inside it.

- ``target_enrichment``: attention per patch on the referred box's patches over the uniform 1 / P
  (1: no preference; P / |box| at most);
- ``objects_enrichment``: the same for the patches of any annotated object of the image;
- ``selection``: attention per patch on the referred object over that on all annotated objects'
  patches, on images with other objects (1: it finds objects, not the named one);
- ``pointing``: the pointing game (Zhang et al., ECCV 2016): the most attended patch lies in the
  referred box; ``pointing_chance``: the share of the grid the box covers, averaged.
Expressions whose box holds no patch centre are skipped and counted (``skipped``). Each layer's map is
scored the same way (``layers``). Needs a model whose image tokens are in the LLM's sequence (our
projector bridge; ``vlm.model.hf_vlm`` LLaVA-style models). Writes
``out_dir/grounding_attention/{summary.json, summary.md, predictions.jsonl, attention.png}``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from eval import refcoco
from eval.io import RunOptions, batched, load_image, pixel_batch
from eval.report import markdown_table, pyplot, save_figure, write_task_outputs
from eval.sources import first
from vlm.data.images import box_to_square

TASK = "grounding_attention"
HEADLINE = ["pointing", "pointing_chance", "target_enrichment", "selection", "n"]
REPORT_COLUMNS: list[str] = []  # a diagnostic: in the harness's summary, not in the demo tables
METRICS = ("target_enrichment", "objects_enrichment", "selection", "pointing", "pointing_chance")
FIGURE_EXAMPLES = 6


load = refcoco.load  # the RefCOCO files, read once when both tasks run (the harness shares a loader's data)


def patch_mask(box: Sequence[float], grid: int) -> np.ndarray:
    """A [0, 1] (x1, y1, x2, y2) box in the square -> bool [grid*grid], row-major: the patches whose
    centre lies inside it (edges included)."""
    centres = (np.arange(grid) + 0.5) / grid
    x, y = np.meshgrid(centres, centres)
    x1, y1, x2, y2 = map(float, box)
    return ((x >= x1) & (x <= x2) & (y >= y1) & (y <= y2)).reshape(-1)


def attention_scores(attention: np.ndarray, target: np.ndarray, objects: np.ndarray) -> dict[str, Optional[float]]:
    """One map ``attention`` [P] (>= 0, not all 0), the referred object's patches ``target`` [P] bool
    (not empty) and every annotated object's ``objects`` [P] bool (``target`` included) -> the module
    docstring's metrics (``selection`` None when no patch belongs to another object)."""
    a = np.asarray(attention, dtype=np.float64)
    if not a.sum() > 0:
        raise ValueError(f"{TASK}: an attention map without weight on any image token")
    a = a / a.sum()
    objects = objects | target
    per_patch = a[target].mean()
    return {"target_enrichment": per_patch * a.size,
            "objects_enrichment": a[objects].mean() * a.size,
            "selection": per_patch / a[objects].mean() if objects.sum() > target.sum() else None,
            "pointing": float(target[int(a.argmax())]),
            "pointing_chance": target.mean()}


def summarise(records: Sequence[dict[str, Any]], skipped: int) -> dict[str, Any]:
    """Per-expression scores -> means of each metric (``selection`` over the images with other
    objects, ``n_selection`` of them), overall and per layer (``layers``)."""
    if not records:
        raise ValueError("grounding_attention: no expression whose box holds a patch centre")

    def means(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        out = {}
        for key in METRICS:
            values = [r[key] for r in rows if r[key] is not None]
            out[key] = float(np.mean(values)) if values else None
        out["n_selection"] = sum(r["selection"] is not None for r in rows)
        return out

    summary = means(records)
    n_layers = len(records[0]["layers"])
    summary["layers"] = [means([r["layers"][k] for r in records]) for k in range(n_layers)]
    summary.update(n=len(records), skipped=skipped)
    return summary


def run(model, data: refcoco.RefcocoData, out_dir: str | Path, limit: Optional[int] = None, batch_size: int = 16,
        options: Optional[RunOptions] = None) -> dict[str, Any]:
    """Score the attention of the first ``limit`` expressions (all sentences of each ref; [B,3,H,W]
    images decoded in batches of ``batch_size``, one forward per prompt) and write
    ``out_dir/grounding_attention/``; returns the summary."""
    options = options or RunOptions()
    if not hasattr(model, "image_attention"):
        raise ValueError(f"{TASK}: {type(model).__name__} exposes no attention over its image tokens (a stage-two "
                         "checkpoint of this project with the projector bridge does)")
    examples = first([(r, s) for r in data.refs for s in r.sentences], limit)
    if not examples:
        raise ValueError(f"{TASK}: no referring expressions")
    cache: dict = {}
    records, maps, skipped = [], [], 0
    with tqdm(total=len(examples), desc=TASK, disable=not options.progress) as bar:
        for chunk in batched(examples, batch_size):
            pixels = pixel_batch(model, [Path(data.image_root) / r.file_name for r, _ in chunk], cache,
                                 blank=options.blank_image)
            prompts = [options.prompts.refcoco(s) for _, s in chunk]
            # one prompt a forward: every layer's [H,T,T] weights are held at once (a 7B LLaVA: ~1.7 GB each)
            attention = np.concatenate([model.image_attention(pixels[k:k + 1], prompts[k:k + 1], "[").numpy()
                                        for k in range(len(prompts))])  # [B,L,P]
            for (ref, sentence), per_layer in zip(chunk, attention):
                record = _score(ref, sentence, per_layer, data.image_boxes.get(ref.image_id, ()))
                if record is None:
                    skipped += 1
                    continue
                records.append(record)
                maps.append((ref, sentence, per_layer.mean(0)))
            bar.update(len(chunk))
    summary = summarise(records, skipped)
    summary["prompt_set"] = options.prompt_set
    write_outputs(out_dir, summary, records, data.image_root, maps[:FIGURE_EXAMPLES])
    return summary


def _score(ref, sentence: str, per_layer: np.ndarray, objects: Sequence[Sequence[float]]) -> Optional[dict[str, Any]]:
    """One expression's record (the layers' mean map and each layer's), None when its box holds no patch centre."""
    grid = math.isqrt(per_layer.shape[1])
    if grid * grid != per_layer.shape[1]:
        raise ValueError(f"{TASK}: {per_layer.shape[1]} image tokens do not form a square grid")

    def mask(box_px: Sequence[float]) -> np.ndarray:
        return patch_mask(box_to_square(box_px, ref.width, ref.height), grid)

    gold = refcoco.xywh_to_xyxy(ref.bbox_xywh)
    target = mask(gold)
    if not target.any():
        return None
    others = np.zeros_like(target)
    for box in objects:
        others |= mask(box)
    scores = attention_scores(per_layer.mean(0), target, others)
    layers = [attention_scores(layer, target, others) for layer in per_layer]
    return {"ref_id": ref.ref_id, "image": ref.file_name, "sentence": sentence, "gold_box_px": list(gold),
            "grid": grid, **scores, "layers": layers}


def write_outputs(out_dir: str | Path, summary: dict[str, Any], records: list[dict], image_root: Path,
                  maps: Sequence[tuple[Any, str, np.ndarray]]) -> Path:
    """summary.json / .md, predictions.jsonl and attention.png (the first expressions' maps); returns the folder."""
    def row(name: str, m: dict[str, Any]) -> list:
        return [name, *(m[k] for k in METRICS), m["n_selection"]]

    columns = ["layers", "target x", "objects x", "selection", "pointing", "pointing chance", "n (selection)"]
    rows = [row("mean map", summary)] + [row(f"layer {k}", m) for k, m in enumerate(summary["layers"])]
    md = (f"# {TASK} (prompt set {summary['prompt_set']})\n\nAttention from the answer's \"[\" over the image "
          f"tokens, {summary['n']} expressions ({summary['skipped']} skipped: no patch centre in the box). "
          "target x / objects x: attention per patch on the referred object / on any object over uniform "
          "(1 = no preference); selection: per patch on the referred object over on all objects (1 = finds "
          "objects, not the named one); pointing: the most attended patch is in the box.\n\n"
          + markdown_table(columns, rows) + "\n\n![attention](attention.png)\n")
    folder = write_task_outputs(out_dir, TASK, summary, records, md)
    if maps:
        plot_maps(maps, image_root, Path(out_dir) / TASK / "attention.png")
    return folder


def plot_maps(maps: Sequence[tuple[Any, str, np.ndarray]], image_root: Path, out_png: Path) -> Path:
    """Each (ref, sentence, map [P]): the image in its padded square (as the model saw it), the map
    over it and the referred box."""
    fig, axes = pyplot().subplots(1, len(maps), figsize=(2.4 * len(maps), 2.8), squeeze=False)
    for ax, (ref, sentence, attention) in zip(axes[0], maps):
        image = load_image(Path(image_root) / ref.file_name)
        side = max(image.size)
        grid = math.isqrt(attention.size)
        x1, y1, x2, y2 = (v * side for v in box_to_square(refcoco.xywh_to_xyxy(ref.bbox_xywh), ref.width, ref.height))
        ox, oy = (side - image.size[0]) // 2, (side - image.size[1]) // 2  # as vlm.data.images pads
        ax.imshow(image, extent=(ox, ox + image.size[0], oy + image.size[1], oy))
        ax.imshow(attention.reshape(grid, grid), extent=(0, side, side, 0), cmap="magma", alpha=0.55)
        ax.add_patch(pyplot().Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="cyan", lw=1.5))
        ax.set_xlim(0, side)
        ax.set_ylim(side, 0)
        ax.set_title(sentence[:28], fontsize=7)
        ax.axis("off")
    return save_figure(fig, out_png, dpi=110)
