"""Export a stage-two projector VLM as a stock ``transformers`` LLaVA directory.

``export_llava(model, out)`` writes what ``LlavaForConditionalGeneration.from_pretrained(out)`` and
``AutoProcessor.from_pretrained(out)`` load, with the same logits as ``model.logits`` (the test
holds them to 1e-4). The mapping is one-to-one because the projector VLM already is LLaVA:

- tower: our ``CLIPVisionModel`` / ``SiglipVisionModel`` weights become ``model.vision_tower``;
  ``vision_feature_layer`` and ``vision_feature_select_strategy`` are copied (HF's
  ``get_image_features`` selects exactly what ``encoders.towers.vision_features`` does);
- projector: ``mlp[0]`` / ``mlp[2]`` (Linear, exact-erf GELU, Linear) become
  ``multi_modal_projector.linear_1`` / ``linear_2`` with ``projector_hidden_act="gelu"``;
- LLM: LoRA merged in (peft's ``merge_and_unload`` on a copy), then the decoder becomes
  ``model.language_model`` and the output head ``lm_head``; ``image_token_id`` is our ``<image>`` id;
- processor: ``LlavaProcessor`` with our tokenizer, a ``CLIPImageProcessor`` equal to our
  ``ImageTransform`` (``processor_config``), ``patch_size``, the select strategy, one additional
  token for CLIP's CLS (``num_additional_image_tokens``), so it writes as many ``<image>`` ids as
  our ``VLMProcessor``; and a chat template that renders our prompt format (``chat_template``).

What LLaVA cannot hold raises ``ExportError`` before anything is written: the flamingo bridge,
towers without a LLaVA class (conv towers: LLaVA would not flatten their feature maps; the
oracle), checkpoints with ``vision_feature_layer: null`` (post-norm features: LLaVA reads
``hidden_states``, which are before the final norm) and 4-bit LLMs.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Union

import torch
from transformers import CLIPVisionModel, LlavaConfig, LlavaForConditionalGeneration, \
    LlavaProcessor, SiglipVisionModel

from vlm.data.prompts import IMAGE_TOKEN
from vlm.model.bridges.projector import ProjectorBridge
from vlm.model.llm import base_model
from vlm.model.tower import VLMVisionTower

LLAVA_TOWERS = (CLIPVisionModel, SiglipVisionModel)


class ExportError(ValueError):
    """The checkpoint holds something the requested format cannot represent."""


def check_llava_exportable(model) -> None:
    """Raise ``ExportError`` naming what keeps ``model`` (a ``VisionLanguageModel``) from LLaVA."""
    if not isinstance(model.bridge, ProjectorBridge):
        raise ExportError(f"--format llava holds the projector bridge only; this checkpoint's bridge is "
                          f"{model.cfg.bridge.name!r} (the Flamingo bridge has no transformers class)")
    tower = getattr(model.tower, "tower", None)
    if not isinstance(model.tower, VLMVisionTower) or not isinstance(tower, LLAVA_TOWERS):
        name = type(tower if tower is not None else model.tower).__name__
        raise ExportError(f"--format llava needs a CLIP or SigLIP vision tower (what LLaVA's get_image_features "
                          f"reads); this checkpoint's tower is {name}, which LLaVA has no class for")
    if model.tower.feature_layer is None:
        raise ExportError("this checkpoint was trained on the tower's final post-norm features "
                          "(vision_feature_layer: null); LLaVA reads hidden_states (before the final norm), so it "
                          "cannot reproduce them: retrain with model.vision_feature_layer set")
    if model.cfg.load_in_4bit:
        raise ExportError("export needs full-precision LLM weights; reload with model.load_in_4bit=false")


def merged_llm(model) -> torch.nn.Module:
    """A copy of the model's LLM with LoRA merged in (a plain transformers causal LM)."""
    with model.bridge.detached(model.llm):
        llm = copy.deepcopy(model.llm)
    return llm.merge_and_unload() if hasattr(llm, "peft_config") else base_model(llm)


def llava_config(model, llm) -> LlavaConfig:
    """The ``LlavaConfig`` of ``model``: its tower's and LLM's configs and our feature choice."""
    text_config = copy.deepcopy(llm.config)
    tower = model.tower.tower
    return LlavaConfig(vision_config=copy.deepcopy(tower.config).to_dict(), text_config=text_config.to_dict(),
                       image_token_id=int(model.image_token_id), projector_hidden_act="gelu",
                       vision_feature_layer=int(model.tower.feature_layer),
                       vision_feature_select_strategy=model.tower.select_strategy,
                       multimodal_projector_bias=True,
                       tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)))


@torch.no_grad()
def llava_model(model) -> LlavaForConditionalGeneration:
    """``model`` (a projector ``VisionLanguageModel``) as an in-memory ``LlavaForConditionalGeneration``."""
    check_llava_exportable(model)
    llm = merged_llm(model)
    llava = LlavaForConditionalGeneration(llava_config(model, llm)).to(next(llm.parameters()).dtype).eval()
    inner = llava.model
    inner.vision_tower.load_state_dict(model.tower.tower.state_dict())
    mlp = model.bridge.mlp
    inner.multi_modal_projector.linear_1.load_state_dict(mlp[0].state_dict())
    inner.multi_modal_projector.linear_2.load_state_dict(mlp[2].state_dict())
    inner.language_model.load_state_dict(llm.get_decoder().state_dict())
    llava.lm_head.load_state_dict(llm.get_output_embeddings().state_dict())
    if llm.generation_config is not None:  # the LLM's EOS / pad, so stock generate stops where ours does
        llava.generation_config = copy.deepcopy(llm.generation_config)
    return llava


def chat_template(model) -> str:
    """A Jinja chat template for ``LlavaProcessor`` that renders what ``VLMProcessor`` encodes.

    Messages hold HF's content lists ([{"type": "image"}, {"type": "text", "text": ...}]) or
    strings; the image becomes ``<image>\\n`` before the text, as our processor places it. With a
    tokenizer chat template, the messages are flattened to strings and handed to it; without one
    (the world's LLM), our plain format: ``{user}\\n{assistant}{eos}`` per turn, with the BOS the
    tokenizer does not add itself."""
    flatten = ("{%- set ns = namespace(msgs=[]) -%}{%- for m in messages -%}"
               "{%- if m['content'] is string -%}{%- set text = m['content'] -%}{%- else -%}"
               "{%- set t = namespace(s='') -%}{%- for c in m['content'] -%}"
               "{%- if c['type'] == 'image' -%}{%- set t.s = t.s + '" + IMAGE_TOKEN + "\\n' -%}"
               "{%- elif c['type'] == 'text' -%}{%- set t.s = t.s + c['text'] -%}{%- endif -%}"
               "{%- endfor -%}{%- set text = t.s -%}{%- endif -%}"
               "{%- set ns.msgs = ns.msgs + [{'role': m['role'], 'content': text}] -%}{%- endfor -%}"
               "{%- set messages = ns.msgs -%}")
    tokenizer = model.tokenizer
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("x")["input_ids"][:1] == [bos]
    if getattr(tokenizer, "chat_template", None):
        _check_template_bos(model, adds_bos)
        return flatten + tokenizer.chat_template
    lead = "{{ bos_token }}" if bos is not None and not adds_bos else ""
    return (flatten + lead + "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{{ m['content'] + '\\n' }}"
            "{%- else -%}{{ m['content'] + eos_token }}{%- endif -%}{%- endfor -%}")


def _check_template_bos(model, adds_bos: bool) -> None:
    """``ExportError`` when the stock processor would add a BOS our prompts lack: our processor
    tokenises the rendered template without special tokens; transformers' processor does the same
    only when the rendered text starts with the BOS token (Llama 3, Mistral) or there is none (Qwen)."""
    rendered = model.tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                                   add_generation_prompt=True)
    if adds_bos and not rendered.startswith(model.tokenizer.bos_token):
        raise ExportError("the LLM's tokenizer adds a BOS token but its chat template does not write one: "
                          "transformers' processor would prepend a BOS the model never saw in training")


def llava_processor(model) -> LlavaProcessor:
    """The stock processor matching ``model.processor``: same ids, same pixels."""
    tower = model.tower.tower
    transform = model.image_transform
    extra = 0 if isinstance(tower, SiglipVisionModel) else 1
    return LlavaProcessor(image_processor=transform.image_processor(),
                          tokenizer=copy.deepcopy(model.tokenizer), patch_size=int(tower.config.patch_size),
                          vision_feature_select_strategy=model.tower.select_strategy,
                          num_additional_image_tokens=extra, image_token=IMAGE_TOKEN,
                          chat_template=chat_template(model))


def export_llava(model, out_dir: Union[str, Path]) -> Path:
    """Write ``model`` (a projector ``VisionLanguageModel``, LoRA merged) to ``out_dir`` as a stock
    LLaVA directory (weights, config, processor, tokenizer, chat template) -> ``out_dir``.
    Raises ``ExportError`` (before writing) for what LLaVA cannot hold (module docstring)."""
    llava = llava_model(model)
    processor = llava_processor(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    llava.save_pretrained(str(out_dir))
    processor.save_pretrained(str(out_dir))
    (out_dir / "sparc_vlm_export.json").write_text(json.dumps(
        {"format": "llava", "vision_feature_layer": model.tower.feature_layer,
         "vision_feature_select_strategy": model.tower.select_strategy}, indent=2) + "\n")
    return out_dir
