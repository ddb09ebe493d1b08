"""Readers and writers for the real dataset formats the evals and stage two consume.

One reader and one writer per format:

================  ======================================================================
COCO captions     ``{"images": [{"id", "file_name", ...}], "annotations": [{"image_id", "caption", ...}]}``
COCO instances    ``{"images": [...], "categories": [{"id", "name"}], "annotations": [{"id", "image_id",
                  "category_id", "bbox": [x, y, w, h], "area", "iscrowd"}]}``
LLaVA json        ``[{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}]``
POPE jsonl        ``{"question_id", "image", "text", "label": "yes"|"no"}`` per line
RefCOCO           ``refs.json``: a list of ``{"ref_id", "ann_id", "image_id", "sentences": [{"raw", "sent",
                  "tokens"}], "split", ...}`` joined by ``ann_id`` to a COCO instances json
VSR jsonl         ``{"image", "caption", "label": 0|1, "relation", ...}`` per line (extra fields ignored)
================  ======================================================================

A malformed file raises ``FormatError(path, line, what)``: ``line`` is the 1-based line of the
offending jsonl line, of a JSON syntax error, or of the offending record in a json file (found by
re-scanning the file only when an error is raised), else None.

RefCOCO: only json refs are read. The original ``refs(unc).p`` files are Python pickles, which
this project never unpickles (arbitrary code execution); convert them once with a trusted tool.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from vlm.files import VlmError, atomic_write_text

PathLike = str | Path


class FormatError(VlmError, ValueError):
    """A data file does not follow its format. ``path``, ``line`` (1-based or None), ``what``."""

    def __init__(self, path: PathLike, line: Optional[int], what: str) -> None:
        self.path, self.line, self.what = str(path), line, what
        where = f"{self.path}:{line}" if line is not None else f"{self.path}"
        super().__init__(f"{where}: {what}")

    def __reduce__(self):  # picklable across worker processes
        return (FormatError, (self.path, self.line, self.what))


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------


@dataclass
class CocoCaptions:
    images: dict[int, str]  # image_id -> file_name
    captions: dict[int, list[str]]  # image_id -> reference captions (every image has a list, maybe empty)


@dataclass
class CocoInstances:
    images: dict[int, dict]  # image_id -> {"file_name", "width", "height"}
    categories: dict[int, str]  # category_id -> name
    annotations: dict[int, dict]  # ann_id -> {"image_id", "category_id", "bbox" [x, y, w, h] px, "area", "iscrowd"}


@dataclass
class LlavaRecord:
    id: str
    image: Optional[str]  # relative image path (the first, in a multi-image record); None for a text-only record
    conversations: list[tuple[str, str]]  # ("human" | "gpt", text); the first human turn holds <image>
    more_images: list[str] = field(default_factory=list)  # a multi-image record's images after the first

    @property
    def images(self) -> list[str]:
        """Every image path of the record: none (text-only), one, or several."""
        return [] if self.image is None else [self.image, *self.more_images]


@dataclass
class PopeQuestion:
    question_id: int
    image: str
    text: str
    label: str  # "yes" | "no"


@dataclass
class RefExpr:
    ref_id: int
    ann_id: int
    image_id: int
    file_name: str  # the image file (from the instances json; real refs name a per-ann crop name)
    sentences: list[str]
    bbox_xywh: tuple[float, float, float, float]
    split: str
    width: int
    height: int
    category_id: Optional[int] = None


@dataclass
class VsrItem:
    image: str
    caption: str
    label: int  # 1 true, 0 false
    relation: str
    subj: Optional[str] = None
    obj: Optional[str] = None
    extra: dict = field(default_factory=dict)  # any other fields of the line (image_link, annotator_id, ...)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _read_text(path: PathLike) -> str:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(path, None, f"not UTF-8 text ({e})") from e


def _load_json(path: PathLike) -> tuple[Any, str]:
    text = _read_text(path)
    try:
        return json.loads(text), text
    except json.JSONDecodeError as e:
        raise FormatError(path, e.lineno, f"invalid JSON: {e.msg} (column {e.colno})") from e


def _element_line(text: str, array_key: Optional[str], index: int) -> Optional[int]:
    """Line of element ``index`` of the top-level array (``array_key`` None) or of the array under
    the first ``"array_key": [``. Only called when reporting an error."""
    if array_key is None:
        m = re.match(r"\s*\[", text)
    else:
        m = re.search(r'"' + re.escape(array_key) + r'"\s*:\s*\[', text)
    if m is None:
        return None
    decoder, pos = json.JSONDecoder(), m.end()
    try:
        for k in range(index + 1):
            while text[pos] in " \t\r\n,":
                pos += 1
            if k == index:
                return text.count("\n", 0, pos) + 1
            _, pos = decoder.raw_decode(text, pos)
    except (json.JSONDecodeError, IndexError):
        return None
    return None


class _Checker:
    """Validates records of one json file, raising FormatError with the record's line."""

    def __init__(self, path: PathLike, text: Optional[str] = None, line: Optional[int] = None) -> None:
        self.path, self.text, self.line = path, text, line

    def fail(self, what: str, array_key: Optional[str] = None, index: Optional[int] = None) -> None:
        line = self.line
        if line is None and self.text is not None and index is not None:
            line = _element_line(self.text, array_key, index)
        raise FormatError(self.path, line, what)

    def get(self, rec: Any, key: str, types: type | tuple, where: str, array_key: Optional[str] = None,
            index: Optional[int] = None, optional: bool = False) -> Any:
        if not isinstance(rec, dict):
            self.fail(f"{where}: expected an object, got {type(rec).__name__}", array_key, index)
        if key not in rec:
            if optional:
                return None
            self.fail(f"{where}: missing key {key!r}", array_key, index)
        value = rec[key]
        bad_bool = isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,))
        if not isinstance(value, types) or bad_bool:
            names = "/".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
            self.fail(f"{where}: {key!r} should be {names}, got {type(value).__name__} {value!r:.60}",
                      array_key, index)
        return value

    def list_under(self, data: Any, key: str) -> list:
        if not isinstance(data, dict):
            self.fail(f"top level should be an object with {key!r}, got {type(data).__name__}")
        if key not in data:
            self.fail(f"missing top-level key {key!r}")
        if not isinstance(data[key], list):
            self.fail(f"{key!r} should be a list, got {type(data[key]).__name__}")
        return data[key]


def _write_json(path: PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1 if isinstance(obj, list) else None) + "\n")


def _read_jsonl(path: PathLike) -> Iterable[tuple[int, dict]]:
    text = _read_text(path)
    # Lines end at "\n" only: str.splitlines would also break at U+2028, U+0085... inside a string.
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise FormatError(path, lineno, f"invalid JSON: {e.msg} (column {e.colno})") from e
        if not isinstance(rec, dict):
            raise FormatError(path, lineno, f"expected a JSON object per line, got {type(rec).__name__}")
        yield lineno, rec


def _write_jsonl(path: PathLike, records: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(rec) + "\n" for rec in records))


def _check_bbox(chk: _Checker, bbox: Any, where: str, array_key: str, index: int) -> tuple[float, ...]:
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
        chk.fail(f"{where}: bbox should be 4 numbers [x, y, w, h], got {bbox!r:.80}", array_key, index)
    if bbox[2] < 0 or bbox[3] < 0:
        chk.fail(f"{where}: bbox {bbox} has a negative size", array_key, index)
    return tuple(float(v) for v in bbox)


# ----------------------------------------------------------------------------------------------
# COCO captions
# ----------------------------------------------------------------------------------------------


def _image_entries(chk: "_Checker", data: dict, seen: dict):
    """Yield (k, where, image_id, entry) for COCO ``images[k]``, failing on an id already in ``seen``."""
    for k, im in enumerate(chk.list_under(data, "images")):
        where = f"images[{k}]"
        image_id = chk.get(im, "id", int, where, "images", k)
        if image_id in seen:
            chk.fail(f"{where}: duplicate image id {image_id}", "images", k)
        yield k, where, image_id, im


def read_coco_captions(path: PathLike) -> CocoCaptions:
    """Read a COCO captions json -> CocoCaptions(images {id: file_name}, captions {id: [str]})."""
    data, text = _load_json(path)
    chk = _Checker(path, text)
    images: dict[int, str] = {}
    for k, where, image_id, im in _image_entries(chk, data, images):
        images[image_id] = chk.get(im, "file_name", str, where, "images", k)
    captions: dict[int, list[str]] = {i: [] for i in images}
    for k, ann in enumerate(chk.list_under(data, "annotations")):
        where = f"annotations[{k}]"
        image_id = chk.get(ann, "image_id", int, where, "annotations", k)
        caption = chk.get(ann, "caption", str, where, "annotations", k)
        if image_id not in images:
            chk.fail(f"{where}: image_id {image_id} is not in images", "annotations", k)
        captions[image_id].append(caption)
    return CocoCaptions(images=images, captions=captions)


def write_coco_captions(path: PathLike, images: dict[int, str], captions: dict[int, list[str]],
                        sizes: Optional[dict[int, tuple[int, int]]] = None) -> None:
    """Write COCO captions json (``sizes``: optional image_id -> (width, height))."""
    imgs = []
    for image_id, file_name in images.items():
        rec: dict[str, Any] = {"id": int(image_id), "file_name": file_name}
        if sizes and image_id in sizes:
            rec["width"], rec["height"] = sizes[image_id]
        imgs.append(rec)
    anns, ann_id = [], 0
    for image_id, caps in captions.items():
        if image_id not in images:
            raise ValueError(f"captions for image_id {image_id} which is not in images")
        for c in caps:
            ann_id += 1
            anns.append({"id": ann_id, "image_id": int(image_id), "caption": c})
    _write_json(path, {"info": {"description": "sparc-vlm"}, "licenses": [], "type": "captions",
                       "images": imgs, "annotations": anns})


# ----------------------------------------------------------------------------------------------
# COCO instances
# ----------------------------------------------------------------------------------------------


def read_coco_instances(path: PathLike) -> CocoInstances:
    """Read a COCO instances json -> CocoInstances (bbox xywh pixels; width/height >= 0 checked)."""
    data, text = _load_json(path)
    chk = _Checker(path, text)
    images: dict[int, dict] = {}
    for k, where, image_id, im in _image_entries(chk, data, images):
        images[image_id] = {"file_name": chk.get(im, "file_name", str, where, "images", k),
                            "width": chk.get(im, "width", int, where, "images", k),
                            "height": chk.get(im, "height", int, where, "images", k)}
    categories: dict[int, str] = {}
    for k, cat in enumerate(chk.list_under(data, "categories")):
        where = f"categories[{k}]"
        categories[chk.get(cat, "id", int, where, "categories", k)] = chk.get(cat, "name", str, where, "categories", k)
    annotations: dict[int, dict] = {}
    for k, ann in enumerate(chk.list_under(data, "annotations")):
        where = f"annotations[{k}]"
        ann_id = chk.get(ann, "id", int, where, "annotations", k)
        image_id = chk.get(ann, "image_id", int, where, "annotations", k)
        category_id = chk.get(ann, "category_id", int, where, "annotations", k)
        bbox = _check_bbox(chk, chk.get(ann, "bbox", list, where, "annotations", k), where, "annotations", k)
        if image_id not in images:
            chk.fail(f"{where}: image_id {image_id} is not in images", "annotations", k)
        if category_id not in categories:
            chk.fail(f"{where}: category_id {category_id} is not in categories", "annotations", k)
        if ann_id in annotations:
            chk.fail(f"{where}: duplicate annotation id {ann_id}", "annotations", k)
        area = chk.get(ann, "area", (int, float), where, "annotations", k, optional=True)
        iscrowd = chk.get(ann, "iscrowd", (int, bool), where, "annotations", k, optional=True)
        annotations[ann_id] = {"image_id": image_id, "category_id": category_id, "bbox": list(bbox),
                               "area": float(bbox[2] * bbox[3] if area is None else area),
                               "iscrowd": int(iscrowd or 0)}
    return CocoInstances(images=images, categories=categories, annotations=annotations)


def write_coco_instances(path: PathLike, images: dict[int, dict], categories: dict[int, str],
                         annotations: dict[int, dict]) -> None:
    """Write COCO instances json. ``annotations``: ann_id -> {image_id, category_id, bbox xywh
    [, area (default w*h), iscrowd (default 0)]}."""
    anns = []
    for ann_id, a in annotations.items():
        x, y, w, h = (float(v) for v in a["bbox"])
        if w < 0 or h < 0:
            raise ValueError(f"annotation {ann_id}: bbox {a['bbox']} has a negative size")
        anns.append({"id": int(ann_id), "image_id": int(a["image_id"]), "category_id": int(a["category_id"]),
                     "bbox": [x, y, w, h], "area": float(a.get("area", w * h)), "iscrowd": int(a.get("iscrowd", 0))})
    _write_json(path, {"info": {"description": "sparc-vlm"}, "licenses": [],
                       "images": [{"id": int(i), **v} for i, v in images.items()],
                       "categories": [{"id": int(c), "name": n, "supercategory": "shape"} for c, n in categories.items()],
                       "annotations": anns})


# ----------------------------------------------------------------------------------------------
# LLaVA
# ----------------------------------------------------------------------------------------------

ROLES = ("human", "gpt")


def read_llava(path: PathLike, image_token: str = "<image>") -> list[LlavaRecord]:
    """Read a LLaVA conversation json (a list of records) -> list[LlavaRecord].

    Turns must alternate human, gpt, human, ...; a record with an ``image`` must have
    ``image_token`` in its first human turn. ``id`` may be a string or an int (kept as str).
    ``image`` may be absent (a text-only record) or a list of paths (a multi-image record, as
    LLaVA-OneVision's: its human turns hold one ``image_token`` per image).
    """
    data, text = _load_json(path)
    chk = _Checker(path, text)
    if not isinstance(data, list):
        chk.fail(f"top level should be a list of records, got {type(data).__name__}")
    out = []
    for k, rec in enumerate(data):
        where = f"record {k}"
        rid = chk.get(rec, "id", (str, int), where, None, k)
        image = chk.get(rec, "image", (str, list), where, None, k, optional=True)
        images = [image] if isinstance(image, str) else list(image or [])
        if not images and image is not None or not all(isinstance(i, str) for i in images):
            chk.fail(f"{where}: 'image' should be a path or a non-empty list of paths, got {image!r:.60}", None, k)
        convs = chk.get(rec, "conversations", list, where, None, k)
        if not convs:
            chk.fail(f"{where}: empty conversations", None, k)
        turns = []
        for t, turn in enumerate(convs):
            role = chk.get(turn, "from", str, f"{where} turn {t}", None, k)
            value = chk.get(turn, "value", str, f"{where} turn {t}", None, k)
            if role != ROLES[t % 2]:
                chk.fail(f"{where} turn {t}: role {role!r}, expected {ROLES[t % 2]!r} (turns alternate human/gpt)",
                         None, k)
            turns.append((role, value))
        if len(images) == 1 and image_token not in turns[0][1]:
            chk.fail(f"{where}: has an image but the first human turn lacks {image_token!r}", None, k)
        tokens = sum(text.count(image_token) for role, text in turns if role == "human")
        if len(images) > 1 and tokens != len(images):
            chk.fail(f"{where}: {len(images)} images but {tokens} {image_token!r} in its human turns", None, k)
        out.append(LlavaRecord(id=str(rid), image=images[0] if images else None, conversations=turns,
                               more_images=images[1:]))
    return out


def write_llava(path: PathLike, records: Sequence[LlavaRecord]) -> None:
    """Write records as a LLaVA conversation json."""
    out = []
    for r in records:
        rec: dict[str, Any] = {"id": r.id}
        if r.image is not None:
            rec["image"] = r.image if not r.more_images else r.images
        rec["conversations"] = [{"from": role, "value": value} for role, value in r.conversations]
        out.append(rec)
    _write_json(path, out)


# ----------------------------------------------------------------------------------------------
# POPE
# ----------------------------------------------------------------------------------------------


def read_pope(path: PathLike) -> list[PopeQuestion]:
    """Read a POPE question jsonl -> list[PopeQuestion] (label lower-cased, must be yes/no)."""
    out = []
    for lineno, rec in _read_jsonl(path):
        chk = _Checker(path, line=lineno)
        qid = chk.get(rec, "question_id", int, "question")
        image = chk.get(rec, "image", str, "question")
        text = chk.get(rec, "text", str, "question")
        label = chk.get(rec, "label", str, "question").lower()
        if label not in ("yes", "no"):
            chk.fail(f"label should be 'yes' or 'no', got {rec['label']!r}")
        out.append(PopeQuestion(question_id=qid, image=image, text=text, label=label))
    return out


def write_pope(path: PathLike, questions: Iterable[PopeQuestion]) -> None:
    """Write POPE questions as jsonl."""
    _write_jsonl(path, ({"question_id": q.question_id, "image": q.image, "text": q.text, "label": q.label}
                        for q in questions))


# ----------------------------------------------------------------------------------------------
# RefCOCO
# ----------------------------------------------------------------------------------------------


def read_refcoco(refs_path: PathLike, instances_path: PathLike,
                 instances: Optional[CocoInstances] = None) -> list[RefExpr]:
    """Read RefCOCO-style refs json + COCO instances json -> list[RefExpr], joined by ann_id.

    Each ref needs ref_id, ann_id, image_id, sentences (a list of {"sent"} or {"raw"} dicts or of
    strings; "sent" preferred) and split. The box, image size and file name come from the
    instances file (``instances``: that file already read by ``read_coco_instances``, so a caller
    that also needs it reads it once). Pickled refs (``refs(unc).p``) are not accepted (see the
    module docstring).
    """
    if str(refs_path).endswith((".p", ".pkl", ".pickle")):
        raise FormatError(refs_path, None, "pickled refs are not read (unsafe); convert them to json")
    inst = instances if instances is not None else read_coco_instances(instances_path)
    data, text = _load_json(refs_path)
    chk = _Checker(refs_path, text)
    if not isinstance(data, list):
        chk.fail(f"top level should be a list of refs, got {type(data).__name__}")
    out = []
    for k, ref in enumerate(data):
        where = f"ref {k}"
        ref_id = chk.get(ref, "ref_id", int, where, None, k)
        ann_id = chk.get(ref, "ann_id", int, where, None, k)
        image_id = chk.get(ref, "image_id", int, where, None, k)
        split = chk.get(ref, "split", str, where, None, k)
        sents = chk.get(ref, "sentences", list, where, None, k)
        sentences = []
        for s in sents:
            if isinstance(s, str):
                sentences.append(s)
            elif isinstance(s, dict) and isinstance(s.get("sent", s.get("raw")), str):
                sentences.append(s.get("sent", s.get("raw")))
            else:
                chk.fail(f"{where}: a sentence should be a string or have 'sent'/'raw', got {s!r:.60}", None, k)
        if not sentences:
            chk.fail(f"{where}: no sentences", None, k)
        ann = inst.annotations.get(ann_id)
        if ann is None:
            chk.fail(f"{where}: ann_id {ann_id} is not in {instances_path}", None, k)
        if ann["image_id"] != image_id:
            chk.fail(f"{where}: image_id {image_id} but annotation {ann_id} is on image {ann['image_id']}", None, k)
        im = inst.images[image_id]
        out.append(RefExpr(ref_id=ref_id, ann_id=ann_id, image_id=image_id, file_name=im["file_name"],
                           sentences=sentences, bbox_xywh=tuple(ann["bbox"]), split=split,
                           width=im["width"], height=im["height"], category_id=ann["category_id"]))
    return out


def write_refcoco(refs_path: PathLike, instances_path: PathLike, refs: Sequence[RefExpr],
                  categories: Optional[dict[int, str]] = None) -> None:
    """Write refs json (RefCOCO fields, sentences as {"raw", "sent", "tokens", "sent_id"}) and the
    instances json they join to. ``categories`` defaults to one "object" category (id 1)."""
    categories = categories or {1: "object"}
    images, anns, out, sent_id = {}, {}, [], 0
    for r in refs:
        images[r.image_id] = {"file_name": r.file_name, "width": r.width, "height": r.height}
        cat = r.category_id if r.category_id is not None else next(iter(categories))
        anns[r.ann_id] = {"image_id": r.image_id, "category_id": cat, "bbox": list(r.bbox_xywh)}
        sents = []
        for s in r.sentences:
            sents.append({"raw": s, "sent": s, "tokens": s.split(), "sent_id": sent_id})
            sent_id += 1
        out.append({"ref_id": r.ref_id, "ann_id": r.ann_id, "image_id": r.image_id, "file_name": r.file_name,
                    "category_id": cat, "split": r.split, "sentences": sents,
                    "sent_ids": [s["sent_id"] for s in sents]})
    write_coco_instances(instances_path, images, categories, anns)
    _write_json(refs_path, out)


# ----------------------------------------------------------------------------------------------
# VSR
# ----------------------------------------------------------------------------------------------

_VSR_KNOWN = ("image", "caption", "label", "relation", "subj", "obj")


def read_vsr(path: PathLike) -> list[VsrItem]:
    """Read a VSR jsonl -> list[VsrItem]; label must be 0 or 1 (JSON true/false accepted); other
    fields (image_link, annotator_id, vote_true_validator, reference_frame...) go to ``extra``."""
    out = []
    for lineno, rec in _read_jsonl(path):
        chk = _Checker(path, line=lineno)
        image = chk.get(rec, "image", str, "item")
        caption = chk.get(rec, "caption", str, "item")
        label = chk.get(rec, "label", (int, bool), "item")
        if label not in (0, 1):
            chk.fail(f"label should be 0 or 1, got {label!r}")
        relation = chk.get(rec, "relation", str, "item")
        subj = chk.get(rec, "subj", str, "item", optional=True)
        obj = chk.get(rec, "obj", str, "item", optional=True)
        out.append(VsrItem(image=image, caption=caption, label=int(label), relation=relation, subj=subj, obj=obj,
                           extra={k: v for k, v in rec.items() if k not in _VSR_KNOWN}))
    return out


def write_vsr(path: PathLike, items: Iterable[VsrItem]) -> None:
    """Write VSR items as jsonl (extra fields included)."""
    def rec(it: VsrItem) -> dict:
        r: dict[str, Any] = {"image": it.image, "caption": it.caption, "label": int(it.label), "relation": it.relation}
        if it.subj is not None:
            r["subj"] = it.subj
        if it.obj is not None:
            r["obj"] = it.obj
        return {**r, **it.extra}
    _write_jsonl(path, (rec(it) for it in items))
