"""Prompt sets by name: the wording each VLM task asks with. Every task summary names its set
(``prompt_set``), and POPE / VSR also their answer mode, so a number says how it was produced.

- ``world`` (ours, ``vlm.data.prompts``): what the world's models are trained on.
- ``lmms-eval``: the published wordings. POPE as lmms-eval's ``tasks/pope/pope.yaml``: the question,
  then "\\nAnswer the question using a single word or phrase." (greedy); RefCOCO as lmms-eval's
  ``tasks/refcoco/utils_rec.py`` bbox-rec instruction (the box format, then "Please provide the
  bounding box coordinate of the region this sentence describes: " and the expression); VSR as
  prismatic's vlm-evaluation asks it (``Based on the image, is this statement "True" or "False"?
  {caption}\\nRespond with "True" or "False" directly.``, scored P(True) vs P(False)); captions with
  lmms-eval's COCO caption prompt ("Provide a one-sentence caption for the provided image.").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from vlm.data import prompts


@dataclass(frozen=True)
class PromptSet:
    """The prompt of each task: ``caption`` (a fixed string), ``pope(question)``, ``vsr(statement)``,
    ``refcoco(expression)``."""

    name: str
    caption: str
    pope: Callable[[str], str]
    vsr: Callable[[str], str]
    refcoco: Callable[[str], str]


LMMS_POPE_SUFFIX = "\nAnswer the question using a single word or phrase."
LMMS_REFCOCO = ("Bounding box coordinates are specified in the format (top-left x, top-left y, bottom-right x, "
                "bottom-right y). All values are floating point numbers bounded between 0 and 1. Please provide the "
                "bounding box coordinate of the region this sentence describes: ")
PRISMATIC_VSR = 'Based on the image, is this statement "True" or "False"? {caption}\nRespond with "True" or "False" directly.'
LMMS_CAPTION = "Provide a one-sentence caption for the provided image."

PROMPT_SETS: dict[str, PromptSet] = {
    "world": PromptSet("world", prompts.CAPTION_PROMPT, prompts.pope_prompt, prompts.vsr_prompt,
                       prompts.grounding_prompt),
    "lmms-eval": PromptSet("lmms-eval", LMMS_CAPTION, lambda q: q + LMMS_POPE_SUFFIX,
                           lambda c: PRISMATIC_VSR.format(caption=c), lambda e: LMMS_REFCOCO + e),
}


def prompt_set(name: str) -> PromptSet:
    """The set called ``name``; ``ValueError`` listing the valid names."""
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}; valid: {', '.join(PROMPT_SETS)}")
    return PROMPT_SETS[name]
