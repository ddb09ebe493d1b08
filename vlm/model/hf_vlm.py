"""``HFVisionLanguageModel``: a local transformers VLM behind the interface the harness and the chat
commands use (``image_transform``, ``score``, ``generate``), so a stock model (our ``vlm export``,
``LlavaForConditionalGeneration``, any ``AutoModelForImageTextToText`` with a chat template) is
evaluated and chatted with exactly as a ``VisionLanguageModel``.

- ``image_transform(image) -> [3,H,W]``: the model's own image processor (its resize, crop and
  normalisation); ``.mean`` is its mean colour (the blank-image control).
- Prompts (a question, or a conversation [(human|gpt, text), ...] ending with a human turn) go
  through the processor's chat template with the image as HF's ``{"type": "image"}`` content
  before the first user text, then through the processor with the already-processed pixels (its
  resize / rescale / normalise switched off), which writes the model's image tokens. A BOS the
  template already wrote is not added again (transformers' own rule in ``apply_chat_template``).
- ``score``: summed log-probability of each choice's tokens (tokenised on their own, as
  ``VisionLanguageModel.score``) after the prompt; ``generate``: greedy or sampled, with the
  decoding knobs pinned as ``VisionLanguageModel.generate_ids`` pins them and the image token
  suppressed, optionally streamed (``streamer``, one prompt).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, GenerationConfig, LlavaForConditionalGeneration

from vlm.model.llm import eager_attention, image_attention_rows
from vlm.model.processor import GPT_ROLES

Prompt = Union[str, Sequence[tuple[str, str]]]
NO_PREPROCESSING = dict(do_resize=False, do_center_crop=False, do_rescale=False, do_normalize=False,
                        do_convert_rgb=False)


class ProcessorTransform:
    """image -> pixel tensor [3,H,W] through an HF image processor; ``mean`` for the blank control."""

    def __init__(self, image_processor):
        self.image_processor = image_processor
        self.mean = tuple(getattr(image_processor, "image_mean", None) or (0.5, 0.5, 0.5))

    def __call__(self, image) -> torch.Tensor:
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]


class HFVisionLanguageModel:
    """A local HF VLM dir with a processor and chat template. Build with ``from_pretrained(dir)``."""

    def __init__(self, model, processor, name: str = ""):
        if not getattr(processor, "chat_template", None):
            raise ValueError(f"{name}: the processor has no chat template; --hf-model needs one to write prompts")
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_transform = ProcessorTransform(processor.image_processor)
        self.name = name
        self.image_token_id = getattr(model.config, "image_token_id", None)

    @classmethod
    def from_pretrained(cls, directory: Union[str, Path], dtype: torch.dtype = torch.float32) -> "HFVisionLanguageModel":
        """``LlavaForConditionalGeneration`` for a llava config, else ``AutoModelForImageTextToText``."""
        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"--hf-model: {directory} is not a local model directory (no config.json)")
        model_type = json.loads((directory / "config.json").read_text()).get("model_type")
        model_cls = LlavaForConditionalGeneration if model_type == "llava" else AutoModelForImageTextToText
        model = model_cls.from_pretrained(str(directory), dtype=dtype)
        return cls(model, AutoProcessor.from_pretrained(str(directory)), name=str(directory))

    @property
    def device(self) -> torch.device:
        """Where the model's weights (and so its inputs) live."""
        return next(self.model.parameters()).device

    def eval(self) -> "HFVisionLanguageModel":
        """Eval mode (the harness calls it); returns self."""
        self.model.eval()
        return self

    def _messages(self, prompt: Prompt) -> list[dict]:
        turns = [("human", prompt)] if isinstance(prompt, str) else list(prompt)
        messages = []
        for i, (role, text) in enumerate(turns):
            content = ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": text}]
            messages.append({"role": "assistant" if role in GPT_ROLES else "user", "content": content})
        return messages

    def _inputs(self, pixels: torch.Tensor, prompts: Sequence[Prompt], padding_side: str) -> dict:
        """Token ids with the image tokens written, attention mask and pixel values for B prompts."""
        texts = [self.processor.apply_chat_template(self._messages(p), add_generation_prompt=True, tokenize=False)
                 for p in prompts]
        bos = self.tokenizer.bos_token
        add_special = not (bos is not None and all(t.startswith(bos) for t in texts))
        self.tokenizer.padding_side = padding_side
        inputs = self.processor(images=list(pixels.float().cpu()), text=texts, return_tensors="pt", padding=True,
                                add_special_tokens=add_special, **NO_PREPROCESSING)
        inputs["pixel_values"] = pixels.to(self.device, self.model.dtype)
        return {k: v.to(self.device) for k, v in inputs.items()}

    def _pixels(self, pixel_values) -> torch.Tensor:
        if isinstance(pixel_values, torch.Tensor):
            return pixel_values
        return torch.stack([p if isinstance(p, torch.Tensor) else self.image_transform(p) for p in pixel_values])

    @torch.no_grad()
    def score(self, pixel_values, prompts: Sequence[Prompt], choices: Sequence[str]) -> torch.Tensor:
        """Summed log-probability [B,C] of each choice's tokens right after each prompt (pixels [B,3,H,W])."""
        pixels = self._pixels(pixel_values)
        choice_ids = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
        out = torch.zeros(len(prompts), len(choices))
        for b, prompt in enumerate(prompts):
            inputs = self._inputs(pixels[b:b + 1], [prompt], "right")
            ids = inputs["input_ids"][0]
            for c, cids in enumerate(choice_ids):
                full = torch.cat([ids, torch.tensor(cids, device=ids.device)]).unsqueeze(0)
                logits = self.model(input_ids=full, attention_mask=torch.ones_like(full),
                                    pixel_values=inputs["pixel_values"]).logits[0].float()
                logp = torch.log_softmax(logits[len(ids) - 1:-1], dim=-1)
                out[b, c] = logp.gather(1, torch.tensor(cids, device=logp.device).unsqueeze(1)).sum()
        return out

    @torch.no_grad()
    def image_attention(self, pixel_values, prompts: Sequence[Prompt], answer_prefix: str = "") -> torch.Tensor:
        """``VisionLanguageModel.image_attention`` for a model that writes one image token per feature
        token (LLaVA): attention [B,L,P] from the last position (after ``answer_prefix``'s tokens) over
        the image tokens, per language-model layer, averaged over heads; eager attention for the call."""
        if self.image_token_id is None:
            raise ValueError(f"{self.name}: its config has no image_token_id, so its image tokens cannot be found")
        inputs = self._inputs(self._pixels(pixel_values), prompts, "left")
        if answer_prefix:
            prefix_ids = self.tokenizer(answer_prefix, add_special_tokens=False)["input_ids"]
            prefix = torch.tensor(prefix_ids, device=self.device)
            ids, mask = inputs["input_ids"], inputs["attention_mask"]
            inputs["input_ids"] = torch.cat([ids, prefix.expand(len(ids), -1)], 1)
            inputs["attention_mask"] = torch.cat([mask, torch.ones(len(ids), len(prefix), dtype=mask.dtype,
                                                                   device=mask.device)], 1)
        with eager_attention(self.model):
            out = self.model(**inputs, output_attentions=True, use_cache=False)
        return image_attention_rows(out.attentions, inputs["input_ids"], self.image_token_id, where=self.name)

    def generation_config(self, max_new_tokens: int, do_sample: bool, temperature: float, top_p: float) -> GenerationConfig:
        """The decoding settings of ``VisionLanguageModel.generate_ids``: the model's EOS, every knob
        it would otherwise take from its own generation_config pinned neutral, the image token suppressed."""
        own = self.model.generation_config
        eos = own.eos_token_id if own is not None and own.eos_token_id is not None else self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, eos_token_id=eos, pad_token_id=pad,
                               num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0,
                               suppress_tokens=[self.image_token_id] if self.image_token_id is not None else None)
        if do_sample:
            gen.temperature, gen.top_p, gen.top_k = temperature, top_p, 0
        return gen

    @torch.no_grad()
    def generate(self, pixel_values, prompts: Sequence[Prompt], max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, streamer=None) -> list[str]:
        """Answers to B prompts about B images (pixels [B,3,H,W]); ``streamer`` (one prompt) gets the tokens as made."""
        inputs = self._inputs(self._pixels(pixel_values), prompts, "left")
        gen = self.generation_config(max_new_tokens, do_sample, temperature, top_p)
        out = self.model.generate(**inputs, generation_config=gen, streamer=streamer)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
