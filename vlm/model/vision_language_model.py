"""``VisionLanguageModel``: vision tower + bridge + frozen causal LLM with LoRA.

One class for both bridges. The image enters the LLM through the bridge's hooks
(``vlm.model.bridges``): the VLM computes the image features, then runs the LLM inside
``bridge.conditioned(features)``. Training (``forward``), ``score`` and ``generate`` all call the
LLM with token ids, so they see exactly the same model, and ``generate`` is the LLM's own
(``transformers``) ``generate`` with or without its KV cache. The bridge reads the tower's
``hidden_states[cfg.vision_feature_layer]`` with ``cfg.vision_feature_select_strategy`` (HF
LLaVA's ``get_image_features``; ``vlm.model.tower``), so the projector VLM maps one-to-one onto
``LlavaForConditionalGeneration``.

Checkpoints (``save_pretrained(dir)``) hold only what was trained, plus the config:
``dir/vlm.yaml`` (the ``VLMConfig``; LLM, tower and oracle world paths as ``vlm.config.portable_path``
writes them: relative to ``dir`` when they were given relative, so a moved tree of runs still loads), ``dir/bridge.safetensors``,
``dir/adapter/`` (peft's LoRA adapter, safetensors) and ``dir/vision/`` only when the tower was
trained. ``from_pretrained(dir)`` rebuilds the model from those and the referenced base models.
``merge_and_save(dir)`` writes a standalone copy: ``dir/llm/`` (LoRA merged in, a plain
transformers model + tokenizer), ``dir/vision/``, ``dir/bridge.safetensors`` and a ``vlm.yaml``
naming ``llm`` and ``vision`` (paths in ``vlm.yaml`` that exist relative to the checkpoint dir
are read relative to it, so merged checkpoints can be moved), loadable without peft. A
``vlm.yaml`` saved before ``vision_feature_layer`` existed loads with the features it was trained
on (the tower's final post-norm patch tokens: ``vision_feature_layer: null``; ``_legacy_features``).
With ``vision_tower: oracle`` the tower is ``vlm.model.oracle.OracleTower`` (the world's own
annotation of each image as the patch grid; ``oracle_world`` names the world export).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import GenerationConfig

from encoders.towers import tower_model_type
from vlm.config import (ConfigError, TrainingControl, VLMConfig, config_from_yaml_text, portable_path, save_config,
                        saved_path)
from vlm.data.prompts import IMAGE_TOKEN
from vlm.data.tokenizer import load_tokenizer
from vlm.files import atomic_path
from vlm.model.bridges import build_bridge
from vlm.model.bridges.base import Bridge
from vlm.model.llm import (apply_lora, base_model, check_llm_request, decoder, decoder_layers, eager_attention,
                           ensure_coordinate_tokens, ensure_image_token, fill_new_rows, image_attention_rows,
                           labelled_token_loss, load_llm, load_lora)
from vlm.model.processor import IGNORE_INDEX, VLMProcessor
from vlm.model.oracle import ORACLE, OracleTower, is_oracle
from vlm.model.tower import VLMVisionTower

CONFIG_FILE = "vlm.yaml"
BRIDGE_FILE = "bridge.safetensors"
ADAPTER_DIR = "adapter"
VISION_DIR = "vision"
LLM_DIR = "llm"


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """attention_mask [B,T] -> position ids [B,T]: 0, 1, ... over real tokens (padding gets 0), as
    ``generate`` computes them, so left- and right-padded rows give the same outputs."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@contextlib.contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode inside the block (no dropout), its train / eval mode restored after."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class VisionLanguageModel(nn.Module):
    """See the module docstring. Build with ``build(cfg)`` or ``from_pretrained(dir)``."""

    ddp_find_unused_parameters = False

    def __init__(self, cfg: VLMConfig, tower: VLMVisionTower | OracleTower, bridge: Bridge, llm: nn.Module, tokenizer,
                 image_token_id: int, llm_path: Path, vision_path: Path, max_len: Optional[int] = None):
        super().__init__()
        self.cfg = cfg
        self.tower = tower
        self.bridge = bridge
        self.llm = llm
        self._tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.llm_path, self.vision_path = Path(llm_path), Path(vision_path)
        bridge.attach(llm, image_token_id)
        if max_len is None:  # the LLM's context, unless the tokenizer declares a shorter one
            limits = [x for x in (getattr(base_model(llm).config, "max_position_embeddings", None),
                                  tokenizer.model_max_length) if isinstance(x, int) and 0 < x < 10**7]
            max_len = min(limits) if limits else 2048
        self.processor = VLMProcessor(tokenizer, tower.transform, bridge.num_image_tokens(tower.num_tokens),
                                      max_len)

    # ------------------------------------------------------------------------------------------
    # Construction
    # ------------------------------------------------------------------------------------------

    @classmethod
    def build(cls, cfg: VLMConfig, max_len: Optional[int] = None) -> "VisionLanguageModel":
        """A fresh VLM for training: loaded tower (frozen unless ``cfg.freeze_vision`` is false),
        a new bridge, the frozen LLM with new LoRA adapters when ``cfg.lora.enabled``."""
        return cls._assemble(cfg, Path(cfg.vision_tower), Path(cfg.llm), adapter_dir=None, bridge_state=None,
                             trainable=True, max_len=max_len)

    @classmethod
    def from_pretrained(cls, directory: Union[str, Path], trainable: bool = False,
                        max_len: Optional[int] = None) -> "VisionLanguageModel":
        """Load a checkpoint written by ``save_pretrained`` or ``merge_and_save``. ``trainable``:
        bridge, LoRA (and an unfrozen tower) keep ``requires_grad`` (to continue training)."""
        directory = Path(directory)
        cfg_path = directory / CONFIG_FILE
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{directory} is not a VLM checkpoint (no {CONFIG_FILE})")
        try:
            cfg = config_from_yaml_text(VLMConfig, cfg_path.read_text())
        except ConfigError as e:
            raise ConfigError(f"{cfg_path}: {e}") from e
        vision = directory / VISION_DIR if (directory / VISION_DIR).is_dir() else saved_path(directory, cfg.vision_tower)
        if not is_oracle(cfg.vision_tower):
            cfg = _legacy_features(cfg, cfg_path, vision)
        elif cfg.oracle_world:
            cfg = dataclasses.replace(cfg, oracle_world=str(saved_path(directory, cfg.oracle_world)))
        llm = saved_path(directory, cfg.llm)
        adapter = directory / ADAPTER_DIR if (directory / ADAPTER_DIR).is_dir() else None
        if cfg.lora.enabled and adapter is None:
            raise FileNotFoundError(f"{directory}: lora.enabled but no {ADAPTER_DIR}/ was saved")
        state = load_file(str(directory / BRIDGE_FILE))
        return cls._assemble(cfg, vision, llm, adapter_dir=adapter, bridge_state=state, trainable=trainable,
                             max_len=max_len)

    @classmethod
    def _assemble(cls, cfg: VLMConfig, vision_path: Path, llm_path: Path, adapter_dir: Optional[Path],
                  bridge_state: Optional[dict], trainable: bool, max_len: Optional[int]) -> "VisionLanguageModel":
        check_llm_request(cfg, llm_path)  # fail on a bad path / missing GPU extra before loading anything
        tower = load_tower(cfg, vision_path, trainable)
        tokenizer = load_tokenizer(llm_path)
        llm = load_llm(cfg, llm_path)
        hidden = int(llm.config.hidden_size)
        bridge = build_bridge(cfg.bridge, tower.width, hidden, len(decoder_layers(llm)), tower.num_tokens)
        image_token_id = -1
        if bridge.num_image_tokens(tower.num_tokens) > 0:
            rows = llm.get_input_embeddings().weight.shape[0]
            image_token_id = ensure_image_token(tokenizer, llm, IMAGE_TOKEN)
            # resize_token_embeddings samples the new row at random; flamingo feeds the <image> embedding to
            # the LLM and score normalises over every output row, so a reloaded model must rebuild the same row
            fill_new_rows(llm, rows)
        coordinates = ensure_coordinate_tokens(tokenizer, llm) if cfg.coordinate_tokens else []
        if adapter_dir is not None:
            llm = load_lora(llm, adapter_dir, trainable=trainable)
        elif cfg.lora.enabled:
            llm = apply_lora(llm, cfg.lora, trainable_tokens=coordinates)
        elif coordinates and bridge_state is None and cfg.module_mode("llm") != "full":  # new rows no one trains
            raise ConfigError("model.coordinate_tokens trains the coordinate rows with the LoRA adapter; set "
                              "model.lora.enabled=true (or model.train.llm.mode=full)")
        if bridge_state is not None:
            bridge.load_state_dict(bridge_state)
        bridge.requires_grad_(trainable and cfg.module_mode("bridge") == "full")
        if not trainable:
            for p in llm.parameters():
                p.requires_grad_(False)
        elif cfg.module_mode("llm") == "full":
            for p in llm.parameters():
                p.requires_grad_(True)
        model = cls(cfg, tower, bridge, llm, tokenizer, image_token_id, llm_path, vision_path, max_len)
        model.to(_llm_device(llm))
        return model if trainable else model.eval()

    # ------------------------------------------------------------------------------------------
    # Accessors
    # ------------------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        """The LLM's tokenizer (with ``<image>`` as a special token for the projector)."""
        return self._tokenizer

    @property
    def image_transform(self):
        """The tower's ``ImageTransform``: image -> [3,H,W]."""
        return self.tower.transform

    @property
    def device(self) -> torch.device:
        """Where the bridge (and so the model's inputs) live."""
        return next(self.bridge.parameters()).device

    MODULES = ("tower", "bridge", "llm")

    def optimizer_overrides(self) -> dict[str, dict]:
        """Parameter-name prefix -> the ``lr`` / ``weight_decay`` its module's config sets
        (``cfg.train.<module>``; unset values are left to the optimiser), for ``training.optim``."""
        out = {}
        for name in self.MODULES:
            m = getattr(self.cfg.train, name)
            values = {k: v for k, v in (("lr", m.lr), ("weight_decay", m.weight_decay)) if v is not None}
            if values:
                out[f"{name}."] = values
        return out

    def trainable_parameters(self) -> dict[str, dict]:
        """module -> {"mode", "trainable", "total"}: what the run log lists per module."""
        out = {}
        for name in self.MODULES:
            params = list(getattr(self, name).parameters())
            out[name] = {"mode": self.cfg.module_mode(name), "total": sum(p.numel() for p in params),
                         "trainable": sum(p.numel() for p in params if p.requires_grad)}
        return out

    def lm_head(self) -> nn.Module:
        """The LLM's output projection (hidden [.., d] -> logits [.., V])."""
        return base_model(self.llm).get_output_embeddings()

    # ------------------------------------------------------------------------------------------
    # Forward passes
    # ------------------------------------------------------------------------------------------

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B,3,H,W] -> bridge features (projector [B,P,d], flamingo latents [B,M,d]);
        [B,I,3,H,W] (I images per sequence, a ``multi_image`` bridge) -> [B,I*M,d], image after image."""
        pixel_values = pixel_values.to(self.device)
        if pixel_values.dim() != 5:
            return self.bridge(self.tower(pixel_values))
        if not self.bridge.multi_image:
            raise ValueError(f"the {self.cfg.bridge.name} bridge takes one image per sequence, got "
                             f"{pixel_values.shape[1]}")
        B, I = pixel_values.shape[:2]
        features = self.bridge(self.tower(pixel_values.flatten(0, 1)))  # [B*I,M,d]
        return features.reshape(B, I * features.shape[1], features.shape[2])

    def hidden_states(self, features: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states [B,T,d] of the LLM on (input_ids, attention_mask) [B,T]."""
        with self.bridge.conditioned(features):
            out = decoder(self.llm)(input_ids=input_ids, attention_mask=attention_mask,
                                    position_ids=position_ids_from_mask(attention_mask), use_cache=False)
        return out.last_hidden_state

    def logits(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [B,T,V] through the LLM's own forward (reference path for tests/evals)."""
        features = self.image_features(pixel_values)
        with self.bridge.conditioned(features):
            out = self.llm(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                           position_ids=position_ids_from_mask(attention_mask.to(self.device)), use_cache=False)
        return out.logits

    def forward(self, batch: dict) -> dict:
        """batch (from ``VLMProcessor``): pixel_values [B,3,H,W], input_ids / attention_mask / labels [B,T].

        Returns ``loss`` (mean next-token cross-entropy over target tokens) and ``num_tokens``
        (real tokens in the batch, image tokens included), plus the bridge's ``log_terms()``
        (flamingo: ``xattn_gate``). The output head runs only on target positions.
        """
        input_ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        hidden = self.hidden_states(self.image_features(batch["pixel_values"]), input_ids, mask)
        loss = labelled_token_loss(hidden, labels, self.lm_head())  # 0 when truncation cut every answer
        return {"loss": loss, "num_tokens": mask.sum(), **self.bridge.log_terms()}

    # ------------------------------------------------------------------------------------------
    # Inference
    # ------------------------------------------------------------------------------------------

    def _pixels(self, pixel_values) -> torch.Tensor:
        return self.processor.pixel_values(pixel_values).to(self.device)

    @torch.no_grad()
    def score(self, pixel_values, prompts: Sequence[str], choices: Sequence[str]) -> torch.Tensor:
        """Summed log-probability [B,C] of each choice's tokens right after each prompt.

        pixel_values [B,3,H,W] (or a list of images); prompts: B questions; choices: C strings
        (e.g. ["Yes", "No"]). One forward over the B*C sequences.
        """
        pixels = self._pixels(pixel_values)
        if len(prompts) != pixels.shape[0]:
            raise ValueError(f"{pixels.shape[0]} images for {len(prompts)} prompts")
        if not choices:
            raise ValueError("score needs at least one choice")
        choice_ids = [self.processor.encode_answer(c) for c in choices]
        if any(len(c) == 0 for c in choice_ids):
            raise ValueError(f"every choice must tokenise to at least one token: {list(choices)}")
        n_choices = len(choices)
        seqs, labels = [], []
        for prompt in prompts:
            p = self.processor.encode_prompt(prompt)
            for c in choice_ids:
                seqs.append(p + c)
                labels.append([IGNORE_INDEX] * len(p) + c)
        batch = self.processor.pad(seqs, labels, side="right")
        ids, mask, lab = (batch[k].to(self.device) for k in ("input_ids", "attention_mask", "labels"))
        features = self.image_features(pixels).repeat_interleave(n_choices, dim=0)
        hidden = self.hidden_states(features, ids, mask)
        targets = lab[:, 1:]
        selected = targets != IGNORE_INDEX
        logp = torch.log_softmax(self.lm_head()(hidden[:, :-1][selected]).float(), dim=-1)
        token_logp = logp.gather(1, targets[selected].unsqueeze(1)).squeeze(1)
        row = torch.arange(len(seqs), device=self.device).unsqueeze(1).expand_as(targets)[selected]
        sums = torch.zeros(len(seqs), dtype=torch.float32, device=self.device).index_add_(0, row, token_logp)
        return sums.view(len(prompts), n_choices).cpu()

    @torch.no_grad()
    def image_attention(self, pixel_values, prompts: Sequence[str], answer_prefix: str = "") -> torch.Tensor:
        """Where the LLM looks: attention [B,L,P] from the last position of each prompt (followed by
        the tokens of ``answer_prefix``, e.g. "[" to ask what predicts a box's first coordinate) over
        its P image tokens, per LLM layer, averaged over heads (raw weights: the rest went to text).

        pixel_values [B,3,H,W] (or a list of images); prompts: B questions. Needs the image tokens in
        the LLM's sequence (the projector bridge; Flamingo's images are read by cross-attention).
        Runs the LLM with eager attention (SDPA returns no weights), then restores its setting."""
        if not self.bridge.tokens_in_sequence:
            raise ValueError(f"image_attention needs image tokens in the LLM's sequence (the projector bridge); "
                             f"the {self.cfg.bridge.name} bridge reads images by cross-attention")
        pixels = self._pixels(pixel_values)
        if len(prompts) != pixels.shape[0]:
            raise ValueError(f"{pixels.shape[0]} images for {len(prompts)} prompts")
        prefix = self.processor.encode_answer(answer_prefix) if answer_prefix else []
        batch = self.processor.pad([self.processor.encode_prompt(p) + prefix for p in prompts], side="left")
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        with evaluating(self), eager_attention(base_model(self.llm)):
            with self.bridge.conditioned(self.image_features(pixels)):
                out = self.llm(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                               output_attentions=True, use_cache=False)
        return image_attention_rows(out.attentions, ids, self.image_token_id)

    @torch.no_grad()
    def generate(self, pixel_values, prompts: Sequence[str], max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, use_cache: bool = True, streamer=None) -> list[str]:
        """Answers to B prompts about B images (pixel_values [B,3,H,W] or a list of images).

        A prompt is a question or a conversation [(human|gpt, text), ...] ending with a human turn.
        Greedy (``do_sample=False``) or sampling with ``temperature`` / ``top_p`` (global torch
        RNG), with or without the KV cache; stops at the LLM's end-of-sequence token(s).
        ``streamer`` (a transformers streamer, one prompt) receives the tokens as they are made.
        """
        ids = self.generate_ids(pixel_values, prompts, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                temperature=temperature, top_p=top_p, use_cache=use_cache, streamer=streamer)
        return [t.strip() for t in self._tokenizer.batch_decode(ids, skip_special_tokens=True)]

    @torch.no_grad()
    def generate_ids(self, pixel_values, prompts: Sequence[str], max_new_tokens: int = 32, do_sample: bool = False,
                     temperature: float = 1.0, top_p: float = 1.0, use_cache: bool = True,
                     min_new_tokens: int = 0, streamer=None) -> torch.Tensor:
        """Like ``generate`` but returns the new token ids [B, N] (padded after an early stop)."""
        pixels = self._pixels(pixel_values)
        batch = self.processor(pixels, list(prompts))
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        base = base_model(self.llm)
        eos = base.generation_config.eos_token_id if base.generation_config is not None else None
        if eos is None:
            eos = self._tokenizer.eos_token_id
        gen = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample,
                               use_cache=use_cache, pad_token_id=self.processor.pad_token_id, eos_token_id=eos,
                               bos_token_id=self._tokenizer.bos_token_id,
                               suppress_tokens=[self.image_token_id] if self.image_token_id >= 0 else None)
        # Every decoding knob left unset would be filled from the LLM's own generation_config (e.g.
        # Qwen2.5-Instruct: repetition_penalty 1.05, top_k 20), so greedy would not be argmax and
        # sampling not the requested distribution: pin them to their neutral values.
        gen.num_beams, gen.repetition_penalty, gen.no_repeat_ngram_size = 1, 1.0, 0
        if do_sample:
            gen.temperature, gen.top_p, gen.top_k = temperature, top_p, 0
            gen.min_p, gen.typical_p, gen.epsilon_cutoff, gen.eta_cutoff = 0.0, 1.0, 0.0, 0.0
        with evaluating(self), self.bridge.conditioned(self.image_features(pixels)):
            out = self.llm.generate(input_ids=ids, attention_mask=mask, generation_config=gen, streamer=streamer)
        return out[:, ids.shape[1]:].cpu()

    # ------------------------------------------------------------------------------------------
    # Saving
    # ------------------------------------------------------------------------------------------

    def _bridge_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.bridge.state_dict().items()}

    def save_pretrained(self, directory: Union[str, Path]) -> None:
        """Write the trained parts (bridge, LoRA adapter, tower if trained) and ``vlm.yaml``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / BRIDGE_FILE) as tmp:
            save_file(self._bridge_state(), str(tmp))
        llm = portable_path(self.llm_path, directory)
        with self.bridge.detached(self.llm):
            if hasattr(self.llm, "peft_config"):  # added rows (<image>, coordinates) are rebuilt on load: not saved
                self.llm.save_pretrained(str(directory / ADAPTER_DIR), save_embedding_layers=False)
            elif self.cfg.module_mode("llm") == "full":  # the whole LLM was trained: it is part of the checkpoint
                self.llm.save_pretrained(str(directory / LLM_DIR))
                self._tokenizer.save_pretrained(str(directory / LLM_DIR))
                llm = LLM_DIR
        if not self.tower.frozen:  # trained fully or through LoRA (saved merged)
            self.tower.save_pretrained(directory / VISION_DIR)
        vision = VISION_DIR if not self.tower.frozen else portable_path(self.vision_path, directory)
        save_config(self._saved_config(directory, llm=llm, vision_tower=vision), directory / CONFIG_FILE)

    def merge_and_save(self, directory: Union[str, Path]) -> None:
        """Write a standalone checkpoint: LoRA merged into a plain LLM (``dir/llm``), the tower
        (``dir/vision``), the bridge and ``vlm.yaml``; ``from_pretrained`` loads it without peft."""
        if self.cfg.load_in_4bit:
            raise ValueError("merge_and_save needs full-precision LLM weights; reload the checkpoint with "
                             "model.load_in_4bit=false before merging")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with self.bridge.detached(self.llm):
            llm = copy.deepcopy(self.llm)
        merged = llm.merge_and_unload() if hasattr(llm, "peft_config") else llm
        merged.save_pretrained(str(directory / LLM_DIR))
        self._tokenizer.save_pretrained(str(directory / LLM_DIR))
        self.tower.save_pretrained(directory / VISION_DIR)
        with atomic_path(directory / BRIDGE_FILE) as tmp:
            save_file(self._bridge_state(), str(tmp))
        train = self.cfg.train
        modes = TrainingControl(tower=dataclasses.replace(train.tower), bridge=dataclasses.replace(train.bridge),
                                llm=dataclasses.replace(train.llm, mode="frozen"))  # merged: no adapter to load
        cfg = self._saved_config(directory, llm=LLM_DIR, vision_tower=VISION_DIR, train=modes,
                                 lora=dataclasses.replace(self.cfg.lora, enabled=False))
        save_config(cfg, directory / CONFIG_FILE)

    def _saved_config(self, directory: Path, **changes) -> VLMConfig:
        """``self.cfg`` with ``changes``, as ``directory/vlm.yaml`` records it: an oracle tower stays
        ``oracle`` (its world dir a ``portable_path``), whatever ``vision_tower`` the caller would write."""
        if isinstance(self.tower, OracleTower):
            changes.update(vision_tower=ORACLE, oracle_world=portable_path(self.tower.index.world_dir, directory))
        return dataclasses.replace(self.cfg, **changes)


def _legacy_features(cfg: VLMConfig, cfg_path: Path, vision_path: Path) -> VLMConfig:
    """``cfg`` as saved, or, when ``vlm.yaml`` predates ``vision_feature_layer``, the features the
    checkpoint was trained on: the tower's final post-norm patch tokens (``encoders.towers.patch_tokens``),
    i.e. ``vision_feature_layer=None`` with "default" for CLIP (drop CLS) and "full" for SigLIP
    (no CLS to drop). Saving the model again writes these values, so it stays what it was.

    Such a checkpoint's flamingo blocks sat before layers 0, k, 2k, ...; with ``xattn_every > 1``
    today's rule ((i+1) % k == 0) would put them elsewhere, so that raises ``ConfigError``. With
    k = 1 it loads, with a warning: it was trained without the ``<image>`` id and media mask.
    """
    saved = OmegaConf.create(cfg_path.read_text())
    if "vision_feature_layer" in saved:
        return cfg
    if cfg.bridge.name == "flamingo" and cfg.bridge.xattn_every > 1:
        raise ConfigError(f"bridge.xattn_every: this flamingo checkpoint predates the (i+1) % k == 0 placement of "
                          f"its cross-attention blocks (k={cfg.bridge.xattn_every}); retrain it")
    if cfg.bridge.name == "flamingo":
        warnings.warn(f"{cfg_path}: this flamingo checkpoint was trained without the <image> id and the media "
                      "mask (every token attended to the image); it now runs with both, so its outputs differ "
                      "from before", stacklevel=3)
    strategy = "full" if tower_model_type(vision_path).startswith("siglip") else "default"
    return dataclasses.replace(cfg, vision_feature_layer=None, vision_feature_select_strategy=strategy)


def load_tower(cfg: VLMConfig, vision_path: Path, trainable: bool) -> VLMVisionTower | OracleTower:
    """The VLM's tower: the oracle (``cfg.vision_tower == "oracle"``, reading ``cfg.oracle_world``)
    or a loaded tower, as ``cfg.module_mode("tower")`` says when ``trainable`` (frozen, LoRA adapters
    on its used linear layers, or fully trained), else frozen."""
    if is_oracle(cfg.vision_tower):
        if not cfg.oracle_world:
            raise ConfigError("model.oracle_world: the oracle tower needs the world export it reads")
        return OracleTower(cfg.oracle_world)
    mode = cfg.module_mode("tower")
    tower = VLMVisionTower.load(vision_path, freeze=mode != "full" or not trainable,
                                feature_layer=cfg.vision_feature_layer,
                                select_strategy=cfg.vision_feature_select_strategy)
    if trainable and mode == "lora":
        tower.add_lora(cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout)
    return tower


def _llm_device(llm: nn.Module) -> torch.device:
    """The device the LLM's weights live on (CUDA for a 4-bit model, else where it was loaded)."""
    return next(llm.parameters()).device
