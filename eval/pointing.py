"""Pointing accuracy (../shared/METHODS.md, "Encoder evals"): does a caption's shape word point at its object?

For every eval caption and every shape noun in it (a word of ``SHAPES`` or its plural from
``PLURALS``) whose shape is present in the image, the word's similarity map over the patch grid is
token embedding . patch embedding: the raw ``token_emb`` and ``patch_emb`` of the DualEncoder (for
SPARC its shared adapters g_t, g_v, or its local heads when it has them; the same recipe for every
objective), averaged over the word's tokens when it spans several (found through the fast
tokenizer's character offsets). The word points at the argmax patch (ties: the first). It is a hit
when that patch's centre lies inside an object of the named shape: the class mask at the centre,
so a word that names several objects (an ambiguous "circle", or "rings") hits any of them.

    accuracy = hits / words
    chance   = mean over words of the fraction of patch centres inside the named shape's objects
               (the expected accuracy of a uniformly random patch)

Patch centres: patch (r, c) of a gh x gw grid over an H x W mask has its centre at
((r + 0.5) H / gh, (c + 0.5) W / gw) in pixel units; it is looked up in the pixel that contains it,
[floor(y), floor(x)] (on a pixel corner, as with even patch sizes, the pixel below and right of it).
The masks are the generator's exact class masks at the world's resolution, not a resized copy.
Words that truncation cut (wholly or in part) are skipped (not pointed, not counted).
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch

from encoders.dual_encoder import DualEncoder
from vlm.world.vocab import PLURALS, SHAPES

# Every spelling of a shape noun -> the shape (singular and plural).
WORD_SHAPE: dict[str, str] = {w: s for s in SHAPES for w in (s, PLURALS[s])}
_SHAPE_WORD = re.compile(r"\b(" + "|".join(sorted(WORD_SHAPE, key=len, reverse=True)) + r")\b", re.IGNORECASE)


# ----------------------------------------------------------------------------------------------
# Pure pieces
# ----------------------------------------------------------------------------------------------


def shape_words(caption: str) -> list[tuple[int, int, str]]:
    """(start, end, shape) character spans of every shape noun in ``caption`` (singular or plural,
    any case, whole words only), in order."""
    return [(m.start(), m.end(), WORD_SHAPE[m.group(1).lower()]) for m in _SHAPE_WORD.finditer(caption)]


def word_tokens(offsets: torch.Tensor, token_mask: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Indices [k] of the real tokens (``token_mask`` [L] bool) whose character span (``offsets``
    [L,2], end exclusive) overlaps the word [start, end); empty when truncation cut any of the word
    (its last kept token ends before the word does): a word is pointed whole or not at all."""
    overlap = (offsets[:, 0] < end) & (offsets[:, 1] > start) & (offsets[:, 1] > offsets[:, 0])
    tokens = (overlap & token_mask.bool()).nonzero().squeeze(1)
    if tokens.numel() == 0 or int(offsets[tokens, 1].max()) < end:
        return tokens[:0]
    return tokens


def word_similarity_map(token_emb: torch.Tensor, patch_emb: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """A word's map over the patches: token_emb [L,d], patch_emb [P,d], tokens [k] (k >= 1) ->
    [P], the mean over the word's tokens of token . patch (raw dot products)."""
    if tokens.numel() == 0:
        raise ValueError("a word needs at least one token")
    return (token_emb[tokens].double() @ patch_emb.double().T).mean(0)


def patch_centre_classes(class_mask: np.ndarray | torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Class mask [H,W] -> [grid_h * grid_w] (row-major): the class at each patch's centre (module docstring)."""
    mask = torch.as_tensor(np.asarray(class_mask)).long()
    h, w = mask.shape
    ys = torch.floor((torch.arange(grid_h, dtype=torch.float64) + 0.5) * h / grid_h).long().clamp_max(h - 1)
    xs = torch.floor((torch.arange(grid_w, dtype=torch.float64) + 0.5) * w / grid_w).long().clamp_max(w - 1)
    return mask[ys][:, xs].reshape(-1)


def pointing_hits(sim_maps: torch.Tensor, centre_in_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sim_maps [W,P], centre_in_mask [W,P] bool (patch centre inside the word's objects) ->
    (pointed patch [W] long: the argmax, ties to the first; hit [W] bool)."""
    if sim_maps.shape != centre_in_mask.shape or sim_maps.dim() != 2:
        raise ValueError(f"sim_maps and centre_in_mask must both be [W,P], got {tuple(sim_maps.shape)}, "
                         f"{tuple(centre_in_mask.shape)}")
    pointed = sim_maps.argmax(dim=1)
    return pointed, centre_in_mask.bool().gather(1, pointed.unsqueeze(1)).squeeze(1)


def pointing_summary(hits: torch.Tensor, centre_in_mask: torch.Tensor) -> dict:
    """hits [W] bool, centre_in_mask [W,P] bool -> {acc, words, chance}; acc and chance are NaN when W = 0."""
    words = int(hits.numel())
    if words == 0:
        return {"acc": math.nan, "words": 0, "chance": math.nan}
    return {"acc": float(hits.double().mean()), "words": words,
            "chance": float(centre_in_mask.double().mean(dim=1).mean())}


# ----------------------------------------------------------------------------------------------
# On an encoder
# ----------------------------------------------------------------------------------------------


@dataclass
class PointedWord:
    """One pointed word: its image, caption (index into the image's captions), the word as written,
    the shape it names, the patch it points at and whether that is a hit."""

    image: int
    caption: int
    word: str
    shape: str
    patch: int
    hit: bool


def _tokenize_with_offsets(dual: DualEncoder, texts: list[str]) -> dict[str, torch.Tensor]:
    """As ``dual.tokenize`` (right padding, the same truncation) plus ``offset_mapping`` [N,L,2]."""
    if not getattr(dual.tokenizer, "is_fast", False):
        raise TypeError("pointing accuracy locates words by character offsets: it needs a fast tokenizer")
    max_len = min(dual.cfg.text.max_len, dual.max_text_len)
    dual.tokenizer.padding_side = "right"
    return dual.tokenizer(texts, padding="longest", truncation=True, max_length=max_len,
                          return_offsets_mapping=True, return_tensors="pt")


@torch.no_grad()
def point_words(dual: DualEncoder, captions: Sequence[Sequence[str]], patch_emb: torch.Tensor,
                centre_classes: torch.Tensor, present: torch.Tensor,
                batch_size: int = 64) -> tuple[list[PointedWord], torch.Tensor]:
    """Point every shape word of every image's captions whose shape is present.

    captions: per image, its captions; patch_emb [N,P,d] (the images' ``patch_emb``);
    centre_classes [N,P] long (``patch_centre_classes``: 0 background, c + 1 for ``SHAPES[c]``);
    present [N,C] bool (class c + 1 has a pixel in the image; a shape word whose shape is absent
    names nothing and is skipped; a present object too small to hold a patch centre counts, with
    chance 0). -> (one ``PointedWord`` per word, centre_in_mask [W,P] bool, in the same order).
    """
    device = next(dual.parameters()).device
    flat = [(i, k, c) for i, caps in enumerate(captions) for k, c in enumerate(caps)]
    meta: list[tuple[int, int, str, str]] = []
    sims: list[torch.Tensor] = []
    for start in range(0, len(flat), batch_size):
        chunk = flat[start:start + batch_size]
        enc = _tokenize_with_offsets(dual, [c for _, _, c in chunk])
        feats = dual.encode_text(enc["input_ids"].to(device), enc["attention_mask"].to(device))
        token_emb, token_mask = feats.token_emb.float().cpu(), feats.token_mask.cpu()
        for row, (i, k, caption) in enumerate(chunk):
            for s, e, shape in shape_words(caption):
                tokens = word_tokens(enc["offset_mapping"][row], token_mask[row], s, e)
                if tokens.numel() and bool(present[i, SHAPES.index(shape) + 1]):
                    sims.append(word_similarity_map(token_emb[row], patch_emb[i].float(), tokens))
                    meta.append((i, k, caption[s:e], shape))
    n_patches = patch_emb.shape[1]
    if not meta:
        return [], torch.zeros(0, n_patches, dtype=torch.bool)
    in_mask = torch.stack([centre_classes[i] == SHAPES.index(shape) + 1 for i, _, _, shape in meta])
    pointed, hits = pointing_hits(torch.stack(sims), in_mask)
    words = [PointedWord(i, k, word, shape, int(p), bool(h)) for (i, k, word, shape), p, h in zip(meta, pointed, hits)]
    return words, in_mask


def pointing_records(words: Sequence[PointedWord], n_images: int) -> list[list[dict]]:
    """Per image, its pointed words as dicts (for ``predictions.jsonl``)."""
    out: list[list[dict]] = [[] for _ in range(n_images)]
    for w in words:
        out[w.image].append({k: v for k, v in asdict(w).items() if k != "image"})
    return out


__all__ = ["PointedWord", "WORD_SHAPE", "patch_centre_classes", "point_words", "pointing_hits", "pointing_records",
           "pointing_summary", "shape_words", "word_similarity_map", "word_tokens"]
