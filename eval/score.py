"""Score predictions made elsewhere (``vlm score TASK``): the same metrics and the same
``out_dir/<task>/{predictions.jsonl, summary.json, summary.md}`` as ``vlm eval vlm``.

``prompt_set`` (optional) records which prompt set the predictions were made with (``eval.prompt_sets``;
null when not given). The predictions define the examples scored (``n`` in the summary says how many); each must name
an example of the reference files, and each example is predicted at most once. Prediction files
are jsonl (one object a line) or one JSON list (COCO's results format). Field names accepted, the
external one first, then the one the harness writes in its own ``predictions.jsonl`` (so a
harness run re-scores to the same summary):

- caption, chair: ``image_id`` | ``id``, and ``caption`` | ``output``
- pope: ``question_id`` | ``id``, and ``text`` (the generated answer, read by POPE's parser) or
  ``logp_yes`` and ``logp_no`` (single-forward scoring: yes iff logp_yes > logp_no, with AUC);
  several splits as one question file per split (the POPE repo's ``coco_pope_<split>.json``)
  with one prediction file each, in the same order, or one prediction file whose lines carry ``split``
- refcoco: ``ref_id``, ``sentence`` (or ``sent_index``, default 0), and ``text`` | ``output``
  (the first "[x1, y1, x2, y2]" in it, normalised to the padded square or to the image: ``box_frame``)
- vsr: ``id`` (the statement's 0-based line in the VSR file), and ``text`` (parsed true/false) or
  ``logp_true`` and ``logp_false``
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from eval import captioning, chair, pope, refcoco, vsr
from eval.parsing import parse_true_false, parse_yes_no
from eval.prompt_sets import prompt_set as prompt_set_named
from eval.report import write_task_outputs
from vlm.data.formats import FormatError, read_coco_captions, read_coco_instances, read_pope, read_refcoco, read_vsr

SCORE_TASKS = ("caption", "chair", "pope", "refcoco", "vsr")


def read_predictions(path: str | Path) -> list[dict]:
    """A prediction file (jsonl, or one JSON list of objects) -> list of dicts; ``FormatError``
    names the file and line of a malformed record."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions not found: {path}")
    text = path.read_text()
    if text.lstrip().startswith("["):
        records = json.loads(text)
        lines = [None] * len(records)
    else:
        records, lines = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise FormatError(path, n, f"not JSON: {e}") from e
                lines.append(n)
    for rec, n in zip(records, lines):
        if not isinstance(rec, dict):
            raise FormatError(path, n, f"a prediction should be an object, got {type(rec).__name__}")
    if not records:
        raise FormatError(path, None, "no predictions")
    return records


def field(rec: dict, names: Sequence[str], kind: type, where: str):
    """The first of ``names`` present in ``rec``, checked to be ``kind`` (``ValueError`` naming ``where``)."""
    for name in names:
        if name in rec:
            value = rec[name]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
                raise ValueError(f"{where}: {name!r} should be {kind.__name__}, got {value!r}")
            return value
    raise ValueError(f"{where}: needs one of the fields {list(names)}; has {sorted(rec)}")


def unique_by(records: Iterable[dict], key, where: str) -> dict:
    """key(record) -> record; ``ValueError`` on a key predicted twice."""
    out: dict = {}
    for rec in records:
        k = key(rec)
        if k in out:
            raise ValueError(f"{where}: {k!r} is predicted twice")
        out[k] = rec
    return out


def _unknown(keys: Iterable, known, what: str, where: str) -> None:
    missing = [k for k in keys if k not in known]
    if missing:
        raise ValueError(f"{where}: {len(missing)} prediction(s) name no {what} of the reference file, e.g. {missing[:5]}")


def captions_by_image(path: str | Path) -> dict[int, str]:
    """Caption predictions -> image_id -> caption."""
    where = str(path)
    recs = unique_by(read_predictions(path), lambda r: field(r, ("image_id", "id"), int, where), where)
    return {i: field(r, ("caption", "output"), str, where) for i, r in recs.items()}


def score_caption(predictions: str | Path, captions: str | Path, out_dir: str | Path,
                  prompt_set: Optional[str] = None) -> dict[str, Any]:
    """BLEU/METEOR/ROUGE-L/CIDEr of caption predictions against a COCO captions file."""
    preds = captions_by_image(predictions)
    refs = read_coco_captions(captions)
    _unknown(preds, refs.captions, "image", str(predictions))
    ids = sorted(preds)
    summary, per_image = captioning.score_captions({i: refs.captions[i] for i in ids}, preds)
    summary["prompt"], summary["prompt_set"] = _prompt(prompt_set, "caption"), prompt_set
    records = [{"id": i, "image": refs.images.get(i, ""), "output": preds[i], "references": refs.captions[i],
                "scores": per_image[i]} for i in ids]
    write_task_outputs(out_dir, captioning.TASK, summary, records)
    return summary


def score_chair(predictions: str | Path, instances: str | Path, out_dir: str | Path,
                captions: Optional[str | Path] = None, vocab: str = "coco",
                prompt_set: Optional[str] = None) -> dict[str, Any]:
    """CHAIR of caption predictions: present objects are each image's segmentation classes in the
    COCO ``instances`` file, plus the objects its reference ``captions`` name (COCO's protocol)
    when given; ``vocab`` "coco" (the reference's synonym table) or "world"."""
    if vocab not in ("coco", "world"):
        raise ValueError(f"vocab must be 'coco' or 'world', got {vocab!r}")
    preds = captions_by_image(predictions)
    inst = read_coco_instances(instances)
    _unknown(preds, inst.images, "image", str(predictions))
    table = chair.coco_vocab() if vocab == "coco" else chair.world_vocab()
    ids = sorted(preds)
    refs = read_coco_captions(captions).captions if captions is not None else {}
    present = chair.ground_truth(table, chair.segment_classes(inst, ids), {i: refs.get(i, []) for i in ids})
    images = {i: Path(inst.images[i]["file_name"]) for i in ids}
    summary, records = chair.score(preds, chair.ChairData(images, present, table))
    summary["prompt"], summary["prompt_set"] = _prompt(prompt_set, "caption"), prompt_set
    return chair.write_outputs(out_dir, summary, records)


def _prompt(name: Optional[str], task: str) -> Optional[str]:
    """The caption prompt of prompt set ``name`` (None when the predictions' prompt set is not given)."""
    return getattr(prompt_set_named(name), task) if name is not None else None


def _split_name(path: Path) -> str:
    """POPE's split from a question file name (``coco_pope_adversarial.json`` -> adversarial)."""
    return next((s for s in pope.SPLITS if s in path.stem), path.stem)


def _pope_answer(rec: dict, where: str) -> tuple[str, dict]:
    """One POPE prediction -> (answer, output fields): log-probs when present, else parsed text."""
    if "logp_yes" in rec or "logp_no" in rec:
        yes, no = field(rec, ("logp_yes",), float, where), field(rec, ("logp_no",), float, where)
        return ("yes" if yes > no else "no"), {"logp_yes": yes, "logp_no": no}
    text = field(rec, ("text", "output"), str, where)
    return parse_yes_no(text), {"text": text}


def _pope_predictions(questions: dict[str, Path], predictions: Sequence[Path]) -> dict[str, list[dict]]:
    """split -> its prediction records: files paired with question files in order, or one file
    whose lines carry ``split``."""
    if len(predictions) == len(questions):
        return {s: read_predictions(p) for s, p in zip(questions, predictions)}
    if len(predictions) == 1:
        recs = read_predictions(predictions[0])
        if all("split" in r for r in recs):
            return {s: [r for r in recs if r["split"] == s] for s in questions}
    raise ValueError(f"{len(predictions)} prediction files for {len(questions)} question files: give one per "
                     "question file (same order), or one file whose lines carry 'split'")


def score_pope(predictions: Sequence[str | Path], questions: Sequence[str | Path], out_dir: str | Path,
               prompt_set: Optional[str] = None) -> dict[str, Any]:
    """POPE of answers per split (``questions``: the POPE repo's files, split from the name)."""
    qfiles = {_split_name(Path(q)): Path(q) for q in questions}
    if len(qfiles) != len(questions):
        raise ValueError(f"two question files give the same split: {[str(q) for q in questions]}")
    records, modes = [], set()
    for split, recs in _pope_predictions(qfiles, [Path(p) for p in predictions]).items():
        gold = {q.question_id: q for q in read_pope(qfiles[split])}
        where = f"pope {split} predictions"
        by_id = unique_by(recs, lambda r: field(r, ("question_id", "id"), int, where), where)
        _unknown(by_id, gold, "question", where)
        for qid, rec in by_id.items():
            answer, out = _pope_answer(rec, f"{where}, question {qid}")
            modes.add("score" if "logp_yes" in out else "generate")
            q = gold[qid]
            records.append({"id": qid, "split": split, "image": q.image, "question": q.text, **out,
                            "answer": answer, "gold": q.label, "correct": answer == q.label})
    if len(modes) != 1:
        raise ValueError("pope: predictions mix log-probabilities and text; give one kind")
    return pope.write_outputs(out_dir, records, modes.pop(), prompt_set)


def _sentence(rec: dict, ref, where: str) -> str:
    """The expression a RefCOCO prediction answers: its ``sentence``, or ``sent_index`` (default 0)."""
    if "sentence" in rec:
        sentence = field(rec, ("sentence",), str, where)
        if sentence not in ref.sentences:
            raise ValueError(f"{where}: ref {ref.ref_id} has no sentence {sentence!r}")
        return sentence
    index = field(rec, ("sent_index",), int, where) if "sent_index" in rec else 0
    if not 0 <= index < len(ref.sentences):
        raise ValueError(f"{where}: ref {ref.ref_id} has {len(ref.sentences)} sentences, no index {index}")
    return ref.sentences[index]


def score_refcoco(predictions: str | Path, refs: str | Path, instances: str | Path, out_dir: str | Path,
                  box_frame: str = "square", prompt_set: Optional[str] = None) -> dict[str, Any]:
    """Acc@0.5 of generated boxes, read in ``box_frame`` ("square": [0, 1] in the image padded to a
    square, as the harness and LLaVA-1.5 show images; "image": [0, 1] of the image's own width and
    height, as lmms-eval reads them), scored in the original image's pixels."""
    where = str(predictions)
    annotations = read_coco_instances(instances)
    by_ref = {r.ref_id: r for r in read_refcoco(refs, instances, instances=annotations)}
    boxes = refcoco.image_boxes(annotations)
    records = []
    for rec in read_predictions(predictions):
        ref_id = field(rec, ("ref_id",), int, where)
        if ref_id not in by_ref:
            raise ValueError(f"{where}: ref_id {ref_id} is not in {refs}")
        ref = by_ref[ref_id]
        sentence = _sentence(rec, ref, where)
        text = field(rec, ("text", "output"), str, where)
        records.append(refcoco.ground(ref, sentence, rec.get("prompt", ""), text, len(records), box_frame,
                                      objects=boxes.get(ref.image_id, ())))
    unique_by(records, lambda r: (r["ref_id"], r["sentence"]), where)
    return refcoco.write_outputs(out_dir, records, box_frame, prompt_set)


def score_vsr(predictions: str | Path, questions: str | Path, out_dir: str | Path,
              prompt_set: Optional[str] = None) -> dict[str, Any]:
    """VSR accuracy (overall, per relation) of true/false answers or log-probabilities."""
    where = str(predictions)
    items = read_vsr(questions)
    by_id = unique_by(read_predictions(predictions), lambda r: field(r, ("id",), int, where), where)
    _unknown(by_id, range(len(items)), "statement", where)
    records, modes = [], set()
    for i, rec in sorted(by_id.items()):
        if "logp_true" in rec or "logp_false" in rec:
            t, f = field(rec, ("logp_true",), float, where), field(rec, ("logp_false",), float, where)
            answer, out = t > f, {"logp_true": t, "logp_false": f}
        else:
            text = field(rec, ("text", "output"), str, where)
            answer, out = parse_true_false(text), {"text": text}
        modes.add("score" if "logp_true" in out else "generate")
        it = items[i]
        records.append({"id": i, "image": it.image, "relation": it.relation, "caption": it.caption, **out,
                        "answer": answer, "gold": bool(it.label), "correct": answer is not None and answer == bool(it.label)})
    if len(modes) != 1:
        raise ValueError("vsr: predictions mix log-probabilities and text; give one kind")
    return vsr.write_outputs(out_dir, records, modes.pop(), prompt_set)
