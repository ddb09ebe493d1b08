"""Ask a trained model about an image: one answer (``vlm generate``) or a conversation (``vlm chat``).

``load_chat_model`` opens our stage-two checkpoint (either bridge) or a stock HF VLM directory
(``HFVisionLanguageModel``); both answer through ``generate(pixels, [conversation], ...)``.
``ChatSession`` keeps one image and the turns so far; every answer is generated from the whole
conversation ([(human, q1), (gpt, a1), ..., (human, q_n)]), so what the model sees is exactly what
training and ``generate`` encode. A model reads one image per conversation (the processor places a
single ``<image>``), so changing the image starts a new conversation.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from PIL import Image
from transformers import TextStreamer

from vlm.data.images import expand2square, pad_colour
from vlm.model.hf_vlm import HFVisionLanguageModel
from vlm.model.vision_language_model import VisionLanguageModel


def load_chat_model(ckpt: Optional[Union[str, Path]] = None, hf_model: Optional[Union[str, Path]] = None):
    """Exactly one of ``ckpt`` (our stage-two checkpoint) or ``hf_model`` (a local HF VLM dir) -> the model, in eval mode."""
    if (ckpt is None) == (hf_model is None):
        raise ValueError("give exactly one of --ckpt (a stage-two checkpoint) or --hf-model (a local HF VLM dir)")
    if ckpt is not None:
        return VisionLanguageModel.from_pretrained(ckpt).eval()
    return HFVisionLanguageModel.from_pretrained(hf_model)


def open_image(path: Union[str, Path]) -> Image.Image:
    """An image file as RGB; a missing file raises naming the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    with Image.open(path) as im:
        return im.convert("RGB")


def terminal_streamer(model) -> TextStreamer:
    """A streamer printing the answer's text to stdout as the tokens are made (prompt skipped)."""
    return TextStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)


@dataclass
class Decoding:
    """How answers are drawn: greedy, or sampled with ``temperature`` / ``top_p`` (seeded by the caller)."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0


class ChatSession:
    """A conversation about one image. ``ask(text) -> answer``; ``set_image(image)`` starts over."""

    def __init__(self, model, image: Image.Image, decoding: Optional[Decoding] = None):
        self.model = model
        self.decoding = decoding or Decoding()
        self.turns: list[tuple[str, str]] = []
        self.set_image(image)

    def set_image(self, image: Image.Image) -> None:
        """Look at ``image`` (padded to a square with the processor's mean colour, as the evals show
        images) from now on; the conversation restarts (one image per conversation)."""
        transform = self.model.image_transform
        square = expand2square(image, pad_colour(getattr(transform, "mean", (0.5, 0.5, 0.5))))
        self.pixels = transform(square).unsqueeze(0)
        self.turns = []

    def reset(self) -> None:
        """Forget the turns so far (same image)."""
        self.turns = []

    def ask(self, text: str, streamer=None) -> str:
        """The model's answer to ``text`` given the image and the turns so far (then both are kept)."""
        conversation = [*self.turns, ("human", text)]
        d = self.decoding
        with torch.no_grad():
            answer = self.model.generate(self.pixels, [conversation], max_new_tokens=d.max_new_tokens,
                                         do_sample=d.do_sample, temperature=d.temperature, top_p=d.top_p,
                                         streamer=streamer)[0]
        self.turns = [*conversation, ("gpt", answer)]
        return answer
