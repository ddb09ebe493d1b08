"""The questions the VLM is trained on and evaluated with, in one place.

The world's LLaVA exporter writes these prompts into the training conversations, and the eval
harness asks the same ones, so a score never depends on a prompt mismatch. Real-data evals use the
same templates (they match the usual LLaVA-1.5 / lmms-eval phrasings).
"""

IMAGE_TOKEN = "<image>"

CAPTION_PROMPT = "Describe the image briefly."
DETAIL_PROMPT = "Describe the image in detail."
COUNT_PROMPT = "How many objects are in the image?"
# POPE: the reference question text, then the LLaVA-1.5 answer instruction.
POPE_SUFFIX = " Answer the question using a single word or phrase."
VSR_PROMPT = "{caption} Is this statement true or false? Answer true or false."
GROUNDING_PROMPT = ("Give the bounding box of the region this sentence describes, as [x1, y1, x2, y2] "
                    "normalised to [0, 1]: {expression}")

YES, NO = "Yes", "No"
TRUE, FALSE = "True", "False"


def pope_question(obj: str) -> str:
    """POPE's question for an object name: 'Is there a/an {object} in the image?'."""
    article = "an" if obj[:1].lower() in "aeiou" else "a"
    return f"Is there {article} {obj} in the image?"


def pope_prompt(question: str) -> str:
    """The prompt the VLM sees for a POPE question."""
    return question + POPE_SUFFIX


def count_prompt(plural: str) -> str:
    """A short-answer counting question: 'How many {plural} are in the image?' plus POPE's answer
    instruction (answered with a capitalised number word, 'Two')."""
    return f"How many {plural} are in the image?" + POPE_SUFFIX


def vsr_prompt(caption: str) -> str:
    return VSR_PROMPT.format(caption=caption)


def grounding_prompt(expression: str) -> str:
    return GROUNDING_PROMPT.format(expression=expression)


def format_box(box: tuple[float, float, float, float]) -> str:
    """A normalised [x1, y1, x2, y2] box as the text the model is trained to emit (2 decimals)."""
    return "[" + ", ".join(f"{v:.2f}" for v in box) + "]"
