"""Captioning: BLEU-1..4, METEOR, ROUGE-L, CIDEr from pycocoevalcap (../shared/METHODS.md).

``score_captions`` is a pure function of (references, predictions): both sides go through
pycocoevalcap's ``PTBTokenizer`` (Stanford CoreNLP 3.4.1, run with Java, as the COCO caption
server does), then ``Bleu(4)``, ``Meteor``, ``Rouge`` and ``Cider``. SPICE needs the Stanford
CoreNLP 3.6.0 jars, which pycocoevalcap downloads on first use; offline they are usually absent,
so SPICE is reported as ``"unavailable"`` (with the reason) and never approximated.

``run(model, data, out_dir)`` captions every image with ``vlm.data.prompts.CAPTION_PROMPT`` (greedy)
and writes ``out_dir/caption/{predictions.jsonl, summary.json, summary.md}``.
"""
from __future__ import annotations

import contextlib
import io
import math
import shutil
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Optional

from tqdm.auto import tqdm

from eval.io import batched, pixel_batch
from eval.report import write_task_outputs
from vlm.data.prompts import CAPTION_PROMPT

TASK = "caption"
METRICS = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr")


@dataclass
class CaptionData:
    """Images to caption and their references. ``images``: image_id -> image path;
    ``references``: image_id -> reference captions (COCO captions format, read by ``read_coco_captions``)."""

    images: dict[int, Path]
    references: dict[int, list[str]]


def _pycocoevalcap_dir() -> Path:
    spec = find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("pycocoevalcap is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def spice_status() -> tuple[bool, str]:
    """(available, reason). SPICE runs only if java and the CoreNLP 3.6.0 jars are already present
    in pycocoevalcap/spice/lib (pycocoevalcap would otherwise try to download them)."""
    if shutil.which("java") is None:
        return False, "java not found"
    lib = _pycocoevalcap_dir() / "spice" / "lib"
    missing = [n for n in ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar") if not (lib / n).is_file()]
    if missing:
        return False, f"Stanford CoreNLP jars missing from {lib} ({', '.join(missing)}); SPICE downloads them on first use"
    return True, "ok"


def score_captions(references: dict[Any, list[str]], predictions: dict[Any, str],
                   spice: bool = True) -> tuple[dict[str, Any], dict[Any, dict[str, float]]]:
    """COCO caption metrics of one prediction per image against its references.

    references   image_id -> list of reference captions (>= 1 each)
    predictions  image_id -> the generated caption (same ids as ``references``)
    Returns (summary, per_image): summary has BLEU_1..4, METEOR, ROUGE_L, CIDEr (corpus level, as
    pycocoevalcap's COCOEvalCap reports them), SPICE (a float, or "unavailable" with
    ``SPICE_reason``) and ``n_images``; per_image maps image_id -> the per-image scores.
    Empty predictions are scored as empty (every n-gram metric gives them 0).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if set(references) != set(predictions):
        missing = sorted(map(str, set(references) ^ set(predictions)))[:5]
        raise ValueError(f"references and predictions must have the same image ids; differing: {missing}")
    if not references:
        raise ValueError("no images to score")
    for k, refs in references.items():
        if not refs:
            raise ValueError(f"image {k}: no reference captions")
    ids = list(references)
    # PTBTokenizer joins all captions with newlines and re-splits its output by line, so a caption
    # must hold no newline and must not be empty (an empty last line would be lost): empty
    # predictions are not sent to it and are scored as "".
    gts = {k: [{"caption": _one_line(c)} for c in references[k]] for k in ids}
    res = {k: [{"caption": _one_line(predictions[k])}] for k in ids if _one_line(predictions[k])}
    # One Java call for both sides (keys tagged), then split back.
    both = PTBTokenizer().tokenize({**{("ref", k): v for k, v in gts.items()}, **{("pred", k): v for k, v in res.items()}})
    gts_t = {k: both[("ref", k)] for k in ids}
    res_t = {k: both.get(("pred", k), [""]) for k in ids}  # empty predictions stay empty

    summary: dict[str, Any] = {}
    per_image: dict[Any, dict[str, float]] = {k: {} for k in ids}
    scorers = [(Bleu(4), ["BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4"]), (meteor_scorer(), ["METEOR"]),
               (Rouge(), ["ROUGE_L"]), (Cider(), ["CIDEr"])]
    for scorer, names in scorers:
        with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its length ratios
            score, scores = scorer.compute_score(gts_t, res_t)
        if len(names) == 1:
            score, scores = [score], [scores]
        for name, corpus, each in zip(names, score, scores):
            summary[name] = float(corpus)
            for k, v in zip(gts_t.keys(), each):
                per_image[k][name] = float(v)

    available, reason = spice_status() if spice else (False, "disabled")
    if available:
        try:
            spice_score, spice_each = _run_spice(gts_t, res_t)
        except Exception as e:  # e.g. its LMDB cache or CoreNLP failing on this JVM: report, never fake
            available, reason = False, f"SPICE failed: {type(e).__name__}: {e}"
    if available:
        summary["SPICE"] = spice_score
        for k, v in spice_each.items():
            per_image[k]["SPICE"] = v
    else:
        summary["SPICE"] = "unavailable"
        summary["SPICE_reason"] = reason
    summary["n_images"] = len(ids)
    return summary, per_image


def _run_spice(gts: dict, res: dict) -> tuple[float, dict[Any, float]]:
    """pycocoevalcap's SPICE on tokenised captions -> (corpus score, image_id -> F-score)."""
    from pycocoevalcap.spice.spice import Spice

    score, scores = Spice().compute_score(gts, res)
    return float(score), {k: float(s["All"]["f"]) for k, s in zip(sorted(gts.keys()), scores)}


_METEOR = None


def meteor_scorer():
    """pycocoevalcap's ``Meteor``, started once per process: its JVM loads the paraphrase tables
    (10+ s), so one live process is shared by every call (it is restarted if it has died)."""
    global _METEOR
    from pycocoevalcap.meteor.meteor import Meteor

    if _METEOR is None or _METEOR.meteor_p.poll() is not None:
        _METEOR = Meteor()
    return _METEOR


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def run(model, data: CaptionData, out_dir: str | Path, limit: Optional[int] = None, batch_size: int = 16,
        max_new_tokens: int = 48, prompt: str = CAPTION_PROMPT, progress: bool = True) -> dict[str, Any]:
    """Caption ``data.images`` with ``model.generate`` (greedy), score against ``data.references``
    and write ``out_dir/caption/``. Returns the summary (see ``score_captions``)."""
    return caption_and_score(model, data, out_dir, limit, batch_size, max_new_tokens, prompt, progress)[0]


def caption_and_score(model, data: CaptionData, out_dir: str | Path, limit: Optional[int] = None,
                      batch_size: int = 16, max_new_tokens: int = 48, prompt: str = CAPTION_PROMPT,
                      progress: bool = True) -> tuple[dict[str, Any], dict[int, str]]:
    """``run`` that also returns the captions (image_id -> text), so CHAIR can score the same
    captions without generating twice."""
    ids = sorted(data.images)[: limit if limit is not None else None]
    if not ids:
        raise ValueError("captioning: no images")
    captions = generate_captions(model, data.images, ids, batch_size, max_new_tokens, prompt, progress)
    summary, per_image = score_captions({i: data.references[i] for i in ids}, captions)
    summary["prompt"] = prompt
    preds = [{"id": i, "image": str(data.images[i]), "prompt": prompt, "output": captions[i],
              "references": data.references[i], "scores": per_image[i]} for i in ids]
    write_task_outputs(out_dir, TASK, summary, preds)
    return summary, captions


def generate_captions(model, images: dict[int, Path], ids: list[int], batch_size: int, max_new_tokens: int,
                      prompt: str = CAPTION_PROMPT, progress: bool = True, desc: str = TASK) -> dict[int, str]:
    """image_id -> the model's greedy caption of that image (``model.generate``, batched)."""
    out: dict[int, str] = {}
    with tqdm(total=len(ids), desc=desc, disable=not progress) as bar:
        for chunk in batched(ids, batch_size):
            pixels = pixel_batch(model, [images[i] for i in chunk])
            texts = model.generate(pixels, [prompt] * len(chunk), max_new_tokens=max_new_tokens)
            if len(texts) != len(chunk):
                raise RuntimeError(f"model.generate returned {len(texts)} texts for {len(chunk)} prompts")
            out.update(zip(chunk, texts))
            bar.update(len(chunk))
    return out


def is_number(x: Any) -> bool:
    """True for finite real numbers (used by reports to skip "unavailable" cells)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
