"""RefCOCO-style grounding (REC): Acc@0.5 IoU per split, from generated text.

Each referring expression (every sentence of every ref) is one example: the model is asked
``vlm.data.prompts.grounding_prompt(sentence)`` about the image padded to a square
(``eval.io.pixel_batch``); the first "[x1, y1, x2, y2]" in its output (``parse_box``, normalised
to [0, 1] in that padded square) is mapped back to the original image's pixels
(``vlm.data.images.box_from_square``) and compared with the ground-truth box (COCO xywh pixels -> xyxy). Correct iff IoU >= 0.5. Output with no box
counts as wrong and is also counted separately (``unparseable``).

Two diagnostics tell a model that cannot find objects from one that finds them but not the one the
sentence names: ``acc_any_object``, the share of boxes with IoU >= 0.5 with *any* annotated object of
the image (the instances file holds every object of a RefCOCO image, the referred one included), so
``acc_any_object - acc`` is the share that boxed the wrong object; and ``by_objects``, every metric per
number of annotated objects in the image (one object: nothing to choose between).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from tqdm.auto import tqdm

from eval.io import RunOptions, batched, pixel_batch
from eval.parsing import parse_box
from eval.report import markdown_table, write_task_outputs
from eval.sources import EvalSources, check_images, first
from vlm.data.formats import CocoInstances, read_coco_instances, read_refcoco
from vlm.data.images import box_from_square

TASK = "refcoco"
HEADLINE = ["acc", "acc_any_object", "mean_iou", "unparseable", "n"]  # the harness's combined summary.md
REPORT_COLUMNS = ["acc", "unparseable_rate"]  # the demo / ablation tables (a rate: averages over seeds read as one)
MAX_NEW_TOKENS = 32
BOX_FRAMES = ("square", "image")
Box = tuple[float, float, float, float]


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two (x1, y1, x2, y2) boxes. A box with x2 <= x1 or y2 <= y1 has zero area; the IoU
    is 0 when the union is empty (two degenerate boxes)."""
    ax1, ay1, ax2, ay2 = map(float, a)
    bx1, by1, bx2, by2 = map(float, b)
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    area_a = max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1)
    area_b = max(0.0, bx2 - bx1) * max(0.0, by2 - by1)
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def xywh_to_xyxy(box: Sequence[float]) -> Box:
    """COCO [x, y, w, h] -> (x1, y1, x2, y2)."""
    x, y, w, h = map(float, box)
    return (x, y, x + w, y + h)


def denormalise(box: Sequence[float], width: float, height: float) -> Box:
    """A [0, 1]-normalised (x1, y1, x2, y2) -> pixels of a ``width`` x ``height`` image (no clamping)."""
    x1, y1, x2, y2 = map(float, box)
    return (x1 * width, y1 * height, x2 * width, y2 * height)


def grounding_metrics(ious: Sequence[Optional[float]], splits: Sequence[str], threshold: float = 0.5,
                      any_ious: Optional[Sequence[Optional[float]]] = None,
                      n_objects: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """Acc@threshold overall and per split. ``ious``: per example, the IoU, or None when the output
    had no box (wrong, and counted in ``unparseable``). ``any_ious``: per example, the best IoU of the
    box with any annotated object of its image (None: no box), giving ``acc_any_object`` (the
    module docstring); without it, the referred object is taken as the only one. ``n_objects``: per
    example, how many objects its image has, giving ``by_objects`` {count: the same metrics}."""
    any_ious = ious if any_ious is None else any_ious
    if not len(ious) == len(splits) == len(any_ious):
        raise ValueError(f"{len(ious)} IoUs, {len(any_ious)} any-object IoUs for {len(splits)} splits")
    if n_objects is not None and len(n_objects) != len(ious):
        raise ValueError(f"{len(ious)} IoUs for {len(n_objects)} object counts")
    if not ious:
        raise ValueError("no examples")

    def hit(iou: Optional[float]) -> bool:
        return iou is not None and iou >= threshold

    def block(idx: list[int]) -> dict[str, Any]:
        bad = sum(1 for i in idx if ious[i] is None)
        return {"acc": sum(hit(ious[i]) for i in idx) / len(idx),
                "acc_any_object": sum(hit(any_ious[i]) for i in idx) / len(idx),
                "unparseable": bad, "unparseable_rate": bad / len(idx),
                "mean_iou": sum(ious[i] for i in idx if ious[i] is not None) / len(idx), "n": len(idx)}

    out = block(list(range(len(ious))))
    out["splits"] = {s: block([i for i, t in enumerate(splits) if t == s]) for s in dict.fromkeys(splits)}
    if n_objects is not None:
        groups: dict[int, list[int]] = defaultdict(list)
        for i, n in enumerate(n_objects):
            groups[int(n)].append(i)
        out["by_objects"] = {str(n): block(groups[n]) for n in sorted(groups)}
    out["threshold"] = threshold
    return out


@dataclass
class RefcocoData:
    """Referring expressions (``vlm.data.formats.RefExpr``: ref_id, ann_id, image_id, file_name,
    sentences, bbox_xywh, split, width, height), the folder of their image files and every annotated
    box of each image (``image_boxes``: image_id -> xyxy pixels; an image missing there counts its
    referred box as its only object)."""

    refs: list
    image_root: Path
    image_boxes: dict[int, list[Box]] = field(default_factory=dict)


def image_boxes(instances: CocoInstances) -> dict[int, list[Box]]:
    """image_id -> the xyxy pixel boxes of all its annotations (crowd ones included), in file order."""
    out: dict[int, list[Box]] = defaultdict(list)
    for ann in instances.annotations.values():
        out[ann["image_id"]].append(xywh_to_xyxy(ann["bbox"]))
    return dict(out)


def load(src: EvalSources, limit: Optional[int] = None) -> RefcocoData:
    """Read and check the RefCOCO files (``refcoco_refs``, ``refcoco_instances``, ``refcoco_images``)
    -> ``RefcocoData`` (every ref; the images of the first ``limit`` are checked)."""
    root = src.folder("refcoco_images")
    instances = read_coco_instances(src.file("refcoco_instances"))
    refs = read_refcoco(src.file("refcoco_refs"), src.file("refcoco_instances"), instances=instances)
    check_images([root / r.file_name for r in first(refs, limit)], TASK)
    return RefcocoData(refs, root, image_boxes(instances))


def to_pixels(box: Sequence[float], width: float, height: float, frame: str = "square") -> Box:
    """A parsed [0, 1] box -> pixels of the original image. ``frame`` "square": normalised to the
    image padded to a square (what the harness shows the model: ``vlm.data.images``); "image":
    normalised to the image's own width and height (lmms-eval's reading)."""
    if frame not in BOX_FRAMES:
        raise ValueError(f"box frame must be one of {BOX_FRAMES}, got {frame!r}")
    return box_from_square(box, width, height) if frame == "square" else denormalise(box, width, height)


def ground(ref, sentence: str, prompt: str, text: str, index: int, frame: str = "square",
           objects: Sequence[Sequence[float]] = ()) -> dict[str, Any]:
    """One expression's record: the model's ``text`` parsed to a box, mapped to the original image's
    pixels (``to_pixels`` in ``frame``) and scored against the ref's box (``iou`` None when no box was
    found) and against every box of ``objects`` (the image's annotated xyxy boxes; the ref's own is
    always among them): ``iou_any`` the best, ``n_objects`` how many distinct ones."""
    gold = xywh_to_xyxy(ref.bbox_xywh)
    boxes = list(dict.fromkeys([gold, *(tuple(map(float, b)) for b in objects)]))
    parsed = parse_box(text)
    pred = to_pixels(parsed, ref.width, ref.height, frame) if parsed is not None else None
    iou = box_iou(pred, gold) if pred is not None else None
    iou_any = max(box_iou(pred, b) for b in boxes) if pred is not None else None
    return {"id": f"{ref.ref_id}:{index}", "ref_id": ref.ref_id, "ann_id": ref.ann_id,
            "split": ref.split, "image": ref.file_name, "sentence": sentence, "prompt": prompt, "output": text,
            "parsed_box": list(parsed) if parsed else None, "pred_box_px": list(pred) if pred else None,
            "gold_box_px": list(gold), "iou": iou, "iou_any": iou_any, "n_objects": len(boxes),
            "correct": iou is not None and iou >= 0.5, "parse_failed": parsed is None}


def run(model, data: RefcocoData, out_dir: str | Path, limit: Optional[int] = None, batch_size: int = 16,
        options: Optional[RunOptions] = None) -> dict[str, Any]:
    """Ground the first ``limit`` expressions (all sentences of each ref; [B,3,H,W] batches of
    ``batch_size``) with ``model.generate`` and write ``out_dir/refcoco/``; returns the summary
    (``grounding_metrics``)."""
    options = options or RunOptions()
    examples = first([(r, s) for r in data.refs for s in r.sentences], limit)
    if not examples:
        raise ValueError("refcoco: no referring expressions")
    cache: dict = {}
    records: list[dict] = []
    with tqdm(total=len(examples), desc=TASK, disable=not options.progress) as bar:
        for chunk in batched(examples, batch_size):
            pixels = pixel_batch(model, [Path(data.image_root) / r.file_name for r, _ in chunk], cache, blank=options.blank_image)
            prompts = [options.prompts.refcoco(s) for _, s in chunk]
            texts = model.generate(pixels, prompts, max_new_tokens=MAX_NEW_TOKENS)
            for (r, s), prompt, text in zip(chunk, prompts, texts):
                records.append(ground(r, s, prompt, text, len(records), objects=data.image_boxes.get(r.image_id, ())))
            bar.update(len(chunk))
    return write_outputs(out_dir, records, "square", options.prompt_set)


def write_outputs(out_dir: str | Path, records: list[dict], frame: str, prompt_set: Optional[str]) -> dict[str, Any]:
    """Score grounded ``records`` (``ground``, boxes read in ``frame``), write ``out_dir/refcoco/``
    and return the summary (``grounding_metrics`` plus ``box_frame`` and ``prompt_set``)."""
    summary = grounding_metrics([r["iou"] for r in records], [r["split"] for r in records],
                                any_ious=[r["iou_any"] for r in records], n_objects=[r["n_objects"] for r in records])
    summary["box_frame"] = frame
    summary["prompt_set"] = prompt_set
    columns = ["Acc@0.5", "any object", "mean IoU", "unparseable", "n"]

    def row(name: str, m: dict[str, Any]) -> list:
        return [name, m["acc"], m["acc_any_object"], m["mean_iou"], m["unparseable"], m["n"]]

    rows = [row(s, m) for s, m in summary["splits"].items()] + [row("all", summary)]
    by_objects = [row(n, m) for n, m in summary["by_objects"].items()]
    md = (f"# {TASK} (prompt set {prompt_set})\n\n" + markdown_table(["split", *columns], rows) + "\n\n"
          "By objects in the image (any object: the box has IoU >= 0.5 with some annotated object; above Acc@0.5, "
          "it boxed the wrong one):\n\n" + markdown_table(["objects", *columns], by_objects) + "\n")
    write_task_outputs(out_dir, TASK, summary, records, md)
    return summary
