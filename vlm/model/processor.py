"""Turn images and conversations into the VLM's tensors: ids, attention mask, labels, pixels.

Text format. With a tokenizer that has a ``chat_template``, each human turn is a ``user``
message and each gpt turn an ``assistant`` message rendered by ``apply_chat_template``; the
assistant text a turn adds (up to and including the template's end-of-turn marker) is the target.
Without a template (the world's LLM) the plain format is::

    <s><image>\\n{prompt}\\n{answer}</s>{prompt 2}\\n{answer 2}</s>...

(``<s>`` only when the tokenizer has a BOS token); the answer tokens and ``</s>`` are the targets.
The conversation's ``<image>`` placeholder (prepended as ``<image>\\n`` to the first human turn
when missing; at most one per conversation) becomes ``num_image_tokens`` copies of the image id
(the projector: one per vision token; flamingo: one, the media location its cross-attention mask
reads, as OpenFlamingo's ``<image>``), or is removed when ``num_image_tokens == 0``.

Segments (each turn's text) are tokenised separately and concatenated, so the prompt of a
training example, of ``generate`` and of ``score`` are the same ids. Labels are -100 on prompt,
image and padding positions. Training batches are right-padded and cut at ``max_len`` (an error
if the image tokens do not fit); inference batches (no answers) are left-padded for ``generate``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from vlm.data.prompts import IMAGE_TOKEN

IGNORE_INDEX = -100
HUMAN_ROLES = ("human", "user")
GPT_ROLES = ("gpt", "assistant")

ImageLike = Union[Image.Image, np.ndarray, torch.Tensor]


class VLMProcessor:
    """``processor(images, prompts, answers=None) -> dict`` of batch tensors (see the module docstring).

    tokenizer: a transformers tokenizer in which ``<image>`` is one special token when
    ``num_image_tokens > 0``. image_transform: ``encoders.towers.ImageTransform`` (image ->
    [3,H,W]). num_image_tokens: ids per image in the sequence. max_len: tokens per training
    sequence, image tokens included.
    """

    def __init__(self, tokenizer, image_transform, num_image_tokens: int, max_len: int,
                 image_token: str = IMAGE_TOKEN):
        if num_image_tokens < 0:
            raise ValueError(f"num_image_tokens must be >= 0, got {num_image_tokens}")
        if max_len <= num_image_tokens:
            raise ValueError(f"max_len {max_len} leaves no room for text after {num_image_tokens} image tokens")
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.num_image_tokens = num_image_tokens
        self.max_len = max_len
        self.image_token = image_token
        self.image_token_id = -1
        if num_image_tokens > 0:
            ids = tokenizer(image_token, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise ValueError(f"the tokenizer splits {image_token!r} into {len(ids)} ids; add it as a special "
                                 "token first (vlm.model.llm.ensure_image_token)")
            self.image_token_id = int(ids[0])
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_token_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token")
        self.use_chat_template = bool(getattr(tokenizer, "chat_template", None))

    # ------------------------------------------------------------------------------------------
    # Text -> ids
    # ------------------------------------------------------------------------------------------

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _place_image(self, turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The first human turn carries the single ``<image>`` (prepended when absent); removed when
        ``num_image_tokens == 0``."""
        total = sum(text.count(self.image_token) for _, text in turns)
        if total > 1:
            raise ValueError(f"a conversation may hold one {self.image_token} (one image), found {total}")
        out = list(turns)
        if total == 0:
            role, text = out[0]
            out[0] = (role, f"{self.image_token}\n{text}")
        if self.num_image_tokens == 0:
            out = [(r, t.replace(self.image_token + "\n", "").replace("\n" + self.image_token, "")
                    .replace(self.image_token, "")) for r, t in out]
        return out

    @staticmethod
    def _check_turns(turns: Sequence[tuple[str, str]], need_answer: bool) -> list[tuple[str, str]]:
        norm = []
        for i, (role, text) in enumerate(turns):
            want = HUMAN_ROLES if i % 2 == 0 else GPT_ROLES
            if role not in want:
                raise ValueError(f"turn {i} has role {role!r}; conversations alternate human/gpt starting "
                                 f"with human (accepted: {HUMAN_ROLES} / {GPT_ROLES})")
            norm.append(("human" if i % 2 == 0 else "gpt", str(text)))
        if not norm:
            raise ValueError("empty conversation")
        if need_answer and norm[-1][0] != "gpt":
            raise ValueError("a training conversation must end with a gpt turn")
        if not need_answer and norm[-1][0] != "human":
            raise ValueError("an inference conversation must end with a human turn")
        return norm

    def _segments(self, turns: list[tuple[str, str]]) -> list[tuple[str, list[int]]]:
        """[(role, ids)] per turn; the last human turn of an inference prompt includes the generation prefix."""
        if self.use_chat_template:
            return self._template_segments(turns)
        segs: list[tuple[str, list[int]]] = []
        bos = self.tokenizer.bos_token_id
        eos = self.tokenizer.eos_token_id
        for i, (role, text) in enumerate(turns):
            if role == "human":
                ids = ([bos] if i == 0 and bos is not None else []) + self._ids(f"{text}\n")
            else:
                ids = self._ids(text) + ([eos] if eos is not None else [])
            segs.append((role, ids))
        return segs

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _template_segments(self, turns: list[tuple[str, str]]) -> list[tuple[str, list[int]]]:
        messages, segs, rendered = [], [], ""
        for role, text in turns:
            messages.append({"role": "user" if role == "human" else "assistant", "content": text})
            full = self._render(messages, generation_prompt=role == "human")
            if not full.startswith(rendered):
                raise ValueError("the tokenizer's chat template is not prefix-stable (rendering one more turn "
                                 "changed the earlier text); cannot tell prompt from answer tokens")
            segs.append((role, self._ids(full[len(rendered):])))
            rendered = full
        return segs

    def _expand_image(self, ids: list[int]) -> list[int]:
        if self.num_image_tokens == 0:
            return ids
        out: list[int] = []
        for t in ids:
            out.extend([t] * self.num_image_tokens if t == self.image_token_id else [t])
        return out

    def encode_conversation(self, turns: Sequence[tuple[str, str]], images: int = 1) -> tuple[list[int], list[int]]:
        """A training conversation [(human|gpt, text), ...] of ``images`` images -> (input_ids,
        labels), cut at ``max_len``.

        Every gpt turn is a target. Raises if the image tokens do not fit in ``max_len``. With
        ``images=0`` (a text-only record) the sequence holds no image ids (the LLM sees no image);
        with several, the text holds one ``<image>`` per image, where each goes.
        """
        norm = self._check_turns(turns, need_answer=True)
        found = sum(text.count(self.image_token) for _, text in norm)
        if images == 1:
            norm = self._place_image(norm)
        elif found != images:
            raise ValueError(f"a conversation of {images} image(s) holds {found} {self.image_token!r}")
        ids: list[int] = []
        labels: list[int] = []
        for role, seg in self._segments(norm):
            seg = self._expand_image(seg)
            ids += seg
            labels += seg if role == "gpt" else [IGNORE_INDEX] * len(seg)
        if images:
            self._check_image_fits(ids, images)
        return ids[: self.max_len], labels[: self.max_len]

    def encode_prompt(self, prompt: Union[str, Sequence[tuple[str, str]]]) -> list[int]:
        """An inference prompt (one question, or a conversation ending with a human turn) -> input_ids
        ending where the answer starts."""
        turns = [("human", prompt)] if isinstance(prompt, str) else list(prompt)
        norm = self._place_image(self._check_turns(turns, need_answer=False))
        ids = [t for _, seg in self._segments(norm) for t in self._expand_image(seg)]
        self._check_image_fits(ids)
        return ids

    def encode_answer(self, text: str) -> list[int]:
        """The ids of an answer / choice continuing a prompt (no special tokens)."""
        return self._ids(text)

    def _check_image_fits(self, ids: list[int], images: int = 1) -> None:
        if self.num_image_tokens and ids.count(self.image_token_id) != self.num_image_tokens * images:
            raise ValueError(f"expected {self.num_image_tokens * images} image ids in the sequence, got "
                             f"{ids.count(self.image_token_id)} (does the text contain the image token?)")
        if self.num_image_tokens and self.image_token_id in ids[self.max_len:]:
            raise ValueError(f"max_len {self.max_len} cuts into the {self.num_image_tokens} image tokens "
                             "(raise data.max_len)")

    # ------------------------------------------------------------------------------------------
    # Batching
    # ------------------------------------------------------------------------------------------

    def pixel_values(self, images: Union[Sequence[ImageLike], torch.Tensor]) -> torch.Tensor:
        """PIL images / uint8 arrays [H,W,3] / float tensors [3,H,W] (already transformed) -> [B,3,H,W]."""
        if isinstance(images, torch.Tensor):
            if images.dim() != 4:
                raise ValueError(f"pixel tensor must be [B,3,H,W], got {tuple(images.shape)}")
            return images
        return torch.stack([im if isinstance(im, torch.Tensor) else self.image_transform(im) for im in images])

    def pad(self, seqs: Sequence[list[int]], labels: Optional[Sequence[list[int]]] = None,
            side: str = "right") -> dict:
        """Pad id lists to one length: input_ids, attention_mask [B,T] long (+ labels [B,T], -100 padded)."""
        if side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', got {side!r}")
        length = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        lab = torch.full((len(seqs), length), IGNORE_INDEX, dtype=torch.long) if labels is not None else None
        for b, s in enumerate(seqs):
            sl = slice(0, len(s)) if side == "right" else slice(length - len(s), length)
            ids[b, sl] = torch.tensor(s, dtype=torch.long)
            mask[b, sl] = 1
            if lab is not None:
                lab[b, sl] = torch.tensor(labels[b], dtype=torch.long)
        out = {"input_ids": ids, "attention_mask": mask}
        if lab is not None:
            out["labels"] = lab
        return out

    def conversations(self, images: Union[Sequence[Union[None, ImageLike, list]], torch.Tensor],
                      conversations: Sequence[Sequence[tuple[str, str]]]) -> dict:
        """Training batch from multi-turn conversations: pixel_values [B,3,H,W], input_ids,
        attention_mask, labels [B,T] (right-padded). An image of None is a text-only record: its
        sequence has no image ids and its pixels are zeros the bridge never reads. A list of
        images is a multi-image record: pixel_values is then [B,I,3,H,W] (I the most images of a
        row; a row's missing ones are zeros no token attends to)."""
        if len(images) != len(conversations):
            raise ValueError(f"{len(images)} images for {len(conversations)} conversations")
        if isinstance(images, torch.Tensor):
            per_row = [[im] for im in images]
        else:
            per_row = [[] if im is None else list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
        encoded = [self.encode_conversation(c, images=len(ims)) for c, ims in zip(conversations, per_row)]
        batch = self.pad([e[0] for e in encoded], [e[1] for e in encoded], side="right")
        if all(len(ims) == 1 for ims in per_row):
            batch["pixel_values"] = self.pixel_values(images)
            return batch
        size = self.image_transform.image_size
        blank = torch.zeros(3, size, size)
        most = max(len(ims) for ims in per_row)
        rows = [[self.pixel_values([im])[0] for im in ims] + [blank] * (max(most, 1) - len(ims)) for ims in per_row]
        pixels = torch.stack([torch.stack(r) for r in rows])  # [B,I,3,H,W]
        batch["pixel_values"] = pixels if most > 1 else pixels[:, 0]
        return batch

    def __call__(self, images: Union[Sequence[ImageLike], torch.Tensor], prompts: Sequence[str],
                 answers: Optional[Sequence[str]] = None) -> dict:
        """With answers: a right-padded training batch (labels on answer + eos). Without: a
        left-padded inference batch (input_ids, attention_mask, pixel_values) ending at the answer."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        if answers is not None:
            if len(answers) != len(prompts):
                raise ValueError(f"{len(answers)} answers for {len(prompts)} prompts")
            return self.conversations(images, [[("human", p), ("gpt", a)] for p, a in zip(prompts, answers)])
        batch = self.pad([self.encode_prompt(p) for p in prompts], side="left")
        batch["pixel_values"] = self.pixel_values(images)
        return batch
