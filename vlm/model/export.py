"""Export our checkpoints as stock ``transformers`` directories: a stage-two projector VLM as LLaVA
(``export_llava``), a stage-one CLIP encoder as ``CLIPModel`` (``export_clip``, at the end).

``export_llava(model, out)`` writes what ``LlavaForConditionalGeneration.from_pretrained(out)`` and
``AutoProcessor.from_pretrained(out)`` load, with the same logits as ``model.logits`` (the test
holds them to 1e-4). The mapping is one-to-one because the projector VLM already is LLaVA:

- tower: our ``CLIPVisionModel`` / ``SiglipVisionModel`` / ``Dinov2Model`` weights become ``model.vision_tower``;
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
from transformers import CLIPVisionModel, Dinov2Model, LlavaConfig, LlavaForConditionalGeneration, \
    LlavaProcessor, SiglipVisionModel

from vlm.data.prompts import IMAGE_TOKEN
from vlm.model.bridges.projector import ProjectorBridge
from vlm.model.llm import base_model
from vlm.model.tower import VLMVisionTower

LLAVA_TOWERS = (CLIPVisionModel, SiglipVisionModel, Dinov2Model)  # ViTs whose hidden_states LLaVA indexes as we do


class ExportError(ValueError):
    """The checkpoint holds something the requested format cannot represent."""


def check_llava_exportable(model) -> None:
    """Raise ``ExportError`` naming what keeps ``model`` (a ``VisionLanguageModel``) from LLaVA."""
    if not isinstance(model.bridge, ProjectorBridge):
        raise ExportError(f"--format llava holds the projector bridge only; this checkpoint's bridge is "
                          f"{model.cfg.bridge.name!r} (the Flamingo bridge has no transformers class)")
    if model.bridge.position is not None:
        raise ExportError("LLaVA's projector has no position table; this checkpoint was trained with "
                          "bridge.position_embedding: true")
    tower = getattr(model.tower, "tower", None)
    if not isinstance(model.tower, VLMVisionTower) or not isinstance(tower, LLAVA_TOWERS):
        name = type(tower if tower is not None else model.tower).__name__
        raise ExportError(f"--format llava needs a CLIP, SigLIP or DINOv2 vision tower (what LLaVA's get_image_features "
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


# ----------------------------------------------------------------------------------------------
# Stage one -> CLIPModel
# ----------------------------------------------------------------------------------------------

CLIP_EOS = "<|endoftext|>"


def check_clip_exportable(stage1) -> None:
    """``ExportError`` naming what keeps a ``Stage1Model`` from ``CLIPModel``: a CLIP vision tower,
    CLS pooling straight into linear projections, a plain logit-scale objective (clip or siglip),
    a tokenizer that ends every text with its EOS (CLIP pools the EOS position)."""
    enc = stage1.encoder
    if not isinstance(enc.vision, CLIPVisionModel):
        raise ExportError(f"--format clip needs a CLIP vision tower; this one is {type(enc.vision).__name__} (our text "
                          "tower is CLIP's causal one, which SiglipModel's bidirectional text model cannot hold)")
    if enc.cfg.pool != "cls" or enc.cfg.global_mlp or enc.cfg.local_heads:
        raise ExportError(f"--format clip needs model.pool=cls without global_mlp or local_heads (CLIPModel projects "
                          f"the pooled CLS and EOS linearly); this encoder has pool={enc.cfg.pool}, "
                          f"global_mlp={enc.cfg.global_mlp}, local_heads={enc.cfg.local_heads}")
    name = getattr(stage1.objective.cfg, "name", "")
    if name not in ("clip", "siglip"):
        raise ExportError(f"--format clip holds a global image-text score; the {name} objective scores differently")
    ids = enc.tokenizer("a")["input_ids"]
    if not ids or ids[-1] != enc.tokenizer.eos_token_id:
        raise ExportError("the text tokenizer does not end texts with its EOS token, which CLIP pools")


@torch.no_grad()
def _clip_text(enc) -> tuple[torch.nn.Module, object]:
    """(text tower, tokenizer) as CLIPModel pools them. ``CLIPTextTransformer`` reads an
    ``eos_token_id`` of 2 as a legacy config and pools the largest id instead of the EOS; our BPE's
    EOS is id 2, so the export appends a new EOS token (``CLIP_EOS``, its embedding a copy of the old
    EOS row): the same hidden state at the same position, pooled the way CLIPModel pools it."""
    from tokenizers import processors

    text, tokenizer = copy.deepcopy(enc.text), copy.deepcopy(enc.tokenizer)
    if text.config.eos_token_id != 2:
        return text, tokenizer
    tokenizer.add_tokens([CLIP_EOS], special_tokens=True)
    new_id = int(tokenizer.convert_tokens_to_ids(CLIP_EOS))
    emb = text.get_input_embeddings()
    old = emb.weight.data
    text.resize_token_embeddings(new_id + 1, mean_resizing=False)
    text.get_input_embeddings().weight.data[: old.shape[0]] = old
    text.get_input_embeddings().weight.data[new_id] = old[enc.tokenizer.eos_token_id]
    bos = tokenizer.bos_token
    lead = f"{bos} " if tokenizer("a", add_special_tokens=True)["input_ids"][0] == tokenizer.bos_token_id else ""
    specials = ([(bos, tokenizer.bos_token_id)] if lead else []) + [(CLIP_EOS, new_id)]
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single=f"{lead}$A:0 {CLIP_EOS}",
                                                                               special_tokens=specials)
    tokenizer.eos_token = CLIP_EOS
    text.config.eos_token_id = new_id
    return text, tokenizer


@torch.no_grad()
def export_clip(stage1, out_dir: Union[str, Path]) -> Path:
    """Write a stage-one ``Stage1Model`` as a ``CLIPModel`` + ``CLIPProcessor`` directory (the
    zero-shot-image-classification pipeline runs it): towers, projections and the learned logit scale.
    Raises ``ExportError`` (before writing) for what CLIPModel cannot hold (``check_clip_exportable``)."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    check_clip_exportable(stage1)
    enc = stage1.encoder
    text, tokenizer = _clip_text(enc)
    log_scale = float(stage1.objective.logit_scale.log_scale)
    config = CLIPConfig(text_config=text.config.to_dict(), vision_config=enc.vision.config.to_dict(),
                        projection_dim=enc.cfg.embed_dim, logit_scale_init_value=log_scale)
    clip = CLIPModel(config).eval()
    clip.text_model.load_state_dict(text.state_dict())  # transformers 5: CLIPModel holds the stock tower classes
    clip.vision_model.load_state_dict(enc.vision.state_dict())
    clip.visual_projection.load_state_dict(enc.heads["image_global"][-1].state_dict())
    clip.text_projection.load_state_dict(enc.heads["text_global"].state_dict())
    clip.logit_scale.fill_(log_scale)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clip.save_pretrained(str(out_dir))
    CLIPProcessor(image_processor=enc.transform.image_processor(), tokenizer=tokenizer).save_pretrained(str(out_dir))
    return out_dir
