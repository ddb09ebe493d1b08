"""Captioning: BLEU-1..4, METEOR, ROUGE-L, CIDEr from pycocoevalcap (../shared/METHODS.md).

``score_captions`` is a pure function of (references, predictions): both sides go through
pycocoevalcap's ``PTBTokenizer`` (Stanford CoreNLP 3.4.1, run with Java, as the COCO caption
server does), then ``Bleu(4)``, ``Meteor``, ``Rouge`` and ``Cider``. SPICE needs the Stanford
CoreNLP 3.6.0 jars, which pycocoevalcap downloads on first use; offline they are usually absent,
so SPICE is reported as ``"unavailable"`` (with the reason) and never approximated.

``run(model, data, out_dir)`` captions every image with ``vlm.data.prompts.CAPTION_PROMPT`` (greedy)
and writes ``out_dir/caption/{predictions.jsonl, summary.json, summary.md}``; ``load(src, limit)``
reads the COCO captions file and checks the images it will caption.
"""
from __future__ import annotations

import contextlib
import io
import shutil
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Optional

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice.spice import Spice
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
from tqdm.auto import tqdm

from eval.io import RunOptions, batched, pixel_batch
from eval.report import write_task_outputs
from eval.sources import EvalSources, check_images, first
from vlm.data.formats import CocoCaptions, read_coco_captions
from vlm.data.prompts import CAPTION_PROMPT

TASK = "caption"
METRICS = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr")
HEADLINE = ["BLEU_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE"]  # the harness's combined summary.md
REPORT_COLUMNS = ["CIDEr", "BLEU_4", "METEOR", "ROUGE_L"]  # the demo / ablation tables
MAX_NEW_TOKENS = 48


@dataclass
class CaptionData:
    """Images to caption and their references. ``images``: image_id -> image path;
    ``references``: image_id -> reference captions (COCO captions format, read by ``read_coco_captions``)."""

    images: dict[int, Path]
    references: dict[int, list[str]]


def read_captioned_images(src: EvalSources) -> tuple[CocoCaptions, dict[int, Path]]:
    """The layout's COCO captions file and image_id -> image path (every image of the file)."""
    caps = read_coco_captions(src.file("captions"))
    root = src.folder("images")
    return caps, {i: root / f for i, f in caps.images.items()}


def select_images(images: dict[int, Path], limit: Optional[int], task: str) -> list[int]:
    """The first ``limit`` image ids (sorted); FileNotFoundError when any of their files is missing."""
    ids = first(sorted(images), limit)
    check_images([images[i] for i in ids], task)
    return ids


def load(src: EvalSources, limit: Optional[int] = None) -> CaptionData:
    """Read and check the captioning files (``captions``, ``images``) -> ``CaptionData`` of the first
    ``limit`` images; every image needs at least one reference caption."""
    caps, images = read_captioned_images(src)
    empty = [i for i, c in caps.captions.items() if not c]
    if empty:
        raise ValueError(f"{src.paths['captions']}: images without reference captions, e.g. ids {empty[:5]}")
    ids = select_images(images, limit, TASK)
    return CaptionData({i: images[i] for i in ids}, {i: caps.captions[i] for i in ids})


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

    _add_spice(summary, per_image, gts_t, res_t, spice)
    summary["n_images"] = len(ids)
    return summary, per_image


def _add_spice(summary: dict[str, Any], per_image: dict[Any, dict[str, float]], gts: dict, res: dict,
               spice: bool) -> None:
    """SPICE into ``summary`` and ``per_image`` when it can run, else "unavailable" with the reason."""
    available, reason = spice_status() if spice else (False, "disabled")
    if available:
        try:
            spice_score, spice_each = _run_spice(gts, res)
        except Exception as e:  # e.g. its LMDB cache or CoreNLP failing on this JVM: report, never fake
            available, reason = False, f"SPICE failed: {type(e).__name__}: {e}"
    if available:
        summary["SPICE"] = spice_score
        for k, v in spice_each.items():
            per_image[k]["SPICE"] = v
    else:
        summary["SPICE"] = "unavailable"
        summary["SPICE_reason"] = reason


def _run_spice(gts: dict, res: dict) -> tuple[float, dict[Any, float]]:
    """pycocoevalcap's SPICE on tokenised captions -> (corpus score, image_id -> F-score)."""
    score, scores = Spice().compute_score(gts, res)
    return float(score), {k: float(s["All"]["f"]) for k, s in zip(sorted(gts.keys()), scores)}


_METEOR = None


def meteor_scorer():
    """pycocoevalcap's ``Meteor``, started once per process: its JVM loads the paraphrase tables
    (10+ s), so one live process is shared by every call (it is restarted if it has died)."""
    global _METEOR
    if _METEOR is None or _METEOR.meteor_p.poll() is not None:
        _METEOR = Meteor()
    return _METEOR


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def run(model, data: CaptionData, out_dir: str | Path, limit: Optional[int] = None, batch_size: int = 16,
        options: Optional[RunOptions] = None) -> dict[str, Any]:
    """Caption ``data.images`` (the first ``limit``) with ``model.generate`` (greedy, [B,3,H,W] pixels
    in batches of ``batch_size``), score against ``data.references`` and write ``out_dir/caption/``.
    The captions are also left in ``options.captions`` for CHAIR. Returns the summary (see
    ``score_captions``, plus the prompt)."""
    options = options or RunOptions()
    ids = first(sorted(data.images), limit)
    if not ids:
        raise ValueError("captioning: no images")
    prompt = options.prompts.caption
    captions = generate_captions(model, data.images, ids, batch_size, progress=options.progress,
                                 blank=options.blank_image, prompt=prompt)
    summary, per_image = score_captions({i: data.references[i] for i in ids}, captions)
    summary["prompt"], summary["prompt_set"] = prompt, options.prompt_set
    preds = [{"id": i, "image": str(data.images[i]), "prompt": prompt, "output": captions[i],
              "references": data.references[i], "scores": per_image[i]} for i in ids]
    write_task_outputs(out_dir, TASK, summary, preds)
    options.captions.update(captions)
    return summary


def generate_captions(model, images: dict[int, Path], ids: list[int], batch_size: int,
                      max_new_tokens: int = MAX_NEW_TOKENS, progress: bool = True, desc: str = TASK,
                      blank: bool = False, prompt: str = CAPTION_PROMPT) -> dict[int, str]:
    """image_id -> the model's greedy caption of that image (``model.generate`` on [B,3,H,W] batches
    with ``prompt``; ``blank``: of a blank image of the same size, ``eval.io.blank_like``)."""
    out: dict[int, str] = {}
    with tqdm(total=len(ids), desc=desc, disable=not progress) as bar:
        for chunk in batched(ids, batch_size):
            pixels = pixel_batch(model, [images[i] for i in chunk], blank=blank)
            texts = model.generate(pixels, [prompt] * len(chunk), max_new_tokens=max_new_tokens)
            if len(texts) != len(chunk):
                raise RuntimeError(f"model.generate returned {len(texts)} texts for {len(chunk)} prompts")
            out.update(zip(chunk, texts))
            bar.update(len(chunk))
    return out
