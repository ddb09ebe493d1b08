"""Stage-one model: a ``DualEncoder`` and an objective, one ``forward(batch) -> dict`` for the loop.

Cached accumulation (``optim.accum_freq``, open_clip's ``accum_freq``): a batch of B images is split
into ``accum_freq`` micro-batches. ``forward(batch, split=a)``, run under ``torch.no_grad``, encodes
every micro-batch and returns an ``AccumCache``; ``forward(micro_j, cache=cache, index=j)`` encodes
micro-batch j again, with grad, and returns the loss of the WHOLE batch on the cached features with
j's rows replaced by the fresh ones. Backpropagating every pass unscaled gives the whole batch's
gradient: the towers receive gradient only through the fresh rows, so pass j gives exactly the
full-batch gradient's share of micro-batch j, and the shares add up. The objective's own parameters
(logit scale and bias, FLAIR's pooling) read the whole loss in every pass, so summing would count
their gradient ``accum_freq`` times (open_clip does); here they are detached in every pass but the
last, which counts them once. The last pass is the one whose backward DDP / FSDP all-reduce
(``training.loop``), so every parameter has a gradient in it. Randomness the objective draws
(FLAIR's negatives) is drawn once per batch into the cache, so every pass scores the same loss.
The towers must be deterministic per sample (no dropout, no batch statistics): ours have neither.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from encoders.dual_encoder import DualEncoder
from encoders.features import ImageFeatures, TextFeatures, cat_features
from encoders.objectives.base import Objective, ObjectiveConfig
from encoders.registry import build_objective, objective_config_class
from vlm.config import config_from_yaml_text, save_config
from vlm.files import atomic_path

OBJECTIVE_STATE_FILE = "objective.safetensors"
OBJECTIVE_CONFIG_FILE = "objective.yaml"


ENCODED_KEYS = ("pixel_values", "input_ids", "attention_mask", "sub_input_ids", "sub_attention_mask")


@dataclass
class Encoded:
    """A (micro-)batch through the towers: ``img`` [b,...], ``txt`` (the captions [b,...], or FLAIR's
    sub-captions [b*K,...]) and ``sub_text`` (FLAIR's ``sub_input_ids`` [b*K,...]) or None."""

    img: ImageFeatures
    txt: TextFeatures
    sub_text: Optional[TextFeatures] = None


def cat_encoded(parts: list[Encoded]) -> Encoded:
    """Concatenate the ``Encoded`` of consecutive micro-batches row-wise (sub-captions stay image-major)."""
    sub = [p.sub_text for p in parts]
    return Encoded(cat_features([p.img for p in parts]), cat_features([p.txt for p in parts]),
                   None if sub[0] is None else cat_features(sub))


def split_batch(batch: dict, parts: int) -> list[dict]:
    """The encoder inputs of ``batch`` (``ENCODED_KEYS``) cut into ``parts`` consecutive row blocks:
    pixel_values [B,...] -> [B/parts,...], text rows [B*K,...] -> [B*K/parts,...] (FLAIR's image-major
    sub-captions go with their image). Raises ValueError unless ``parts`` divides every row count."""
    out: list[dict] = [{} for _ in range(parts)]
    for key in ENCODED_KEYS:
        if key not in batch:
            continue
        rows = batch[key].shape[0]
        if rows % parts:
            raise ValueError(f"cannot split {key!r} with {rows} rows into accum_freq={parts} micro-batches")
        for micro, chunk in zip(out, batch[key].split(rows // parts)):
            micro[key] = chunk
    return out


@dataclass
class AccumCache:
    """One batch prepared for cached accumulation: the whole ``batch``, its ``micro_batches`` (see
    ``split_batch``), their ``encoded`` features (computed without grad) and the objective's
    ``random_inputs`` drawn once for the whole batch."""

    batch: dict
    micro_batches: list[dict]
    encoded: list[Encoded]
    random_inputs: dict


class Stage1Model(nn.Module):
    """``forward(batch) -> dict`` of scalar loss terms with ``"loss"`` (the objective's output).

    batch: ``pixel_values`` [B,3,H,W], ``input_ids`` / ``attention_mask`` [B,L]; for FLAIR also
    ``sub_input_ids`` / ``sub_attention_mask`` [B,K,L], encoded as [B*K,L] (image-major) and
    passed to the objective as ``batch["sub_text"]``. Adds ``num_tokens`` (real caption tokens).
    ``forward(batch, split=a)`` and ``forward(micro, cache=..., index=j)`` are the two halves of
    cached accumulation (module docstring); the loop calls them when ``optim.accum_freq > 1``.
    """

    supports_cached_accumulation = True  # training.loop: optim.accum_freq > 1 is allowed

    def __init__(self, encoder: DualEncoder, objective: Objective) -> None:
        super().__init__()
        self.encoder = encoder
        self.objective = objective
        # Separate local heads go unused by an objective that reads no local embeddings (Stage1Config
        # forbids it; a model assembled by hand may still do it), and so does SigLIP's pooling head
        # under any pool but "cls": DDP must then skip them.
        self.ddp_find_unused_parameters = bool(encoder.cfg.local_heads and not objective.cfg.uses_local_embeddings
                                               or encoder.unused_tower_head)

    @classmethod
    def build(cls, encoder: DualEncoder, objective_cfg: ObjectiveConfig) -> "Stage1Model":
        """Build the objective named by ``objective_cfg`` for ``encoder``'s widths."""
        objective = build_objective(objective_cfg, encoder.cfg.embed_dim, encoder.vision_width)
        return cls(encoder, objective)

    def encode(self, batch: dict) -> Encoded:
        """Run both towers on ``batch`` (keys as the class docstring) -> ``Encoded``."""
        for key in ("pixel_values", "input_ids", "attention_mask"):
            if key not in batch:
                raise KeyError(f"stage-one batch lacks {key!r}; has {sorted(batch)}")
        img = self.encoder.encode_image(batch["pixel_values"])
        txt = self.encoder.encode_text(batch["input_ids"], batch["attention_mask"])
        if "sub_input_ids" not in batch:
            return Encoded(img, txt)
        sub_ids, sub_mask = batch["sub_input_ids"], batch["sub_attention_mask"]
        if sub_ids.dim() != 3 or sub_mask.shape != sub_ids.shape:
            raise ValueError(f"sub_input_ids / sub_attention_mask must be [B,K,L], got {tuple(sub_ids.shape)}"
                             f" / {tuple(sub_mask.shape)}")
        return Encoded(img, txt, self.encoder.encode_text(sub_ids.flatten(0, 1), sub_mask.flatten(0, 1)))

    def forward(self, batch: dict, split: int = 1, cache: Optional[AccumCache] = None,
                index: int = 0) -> Union[dict, AccumCache]:
        """The loss terms of ``batch`` (with ``cache``: of the cached batch, micro-batch ``index``
        re-encoded with grad from ``batch``), or with ``split > 1`` the ``AccumCache`` of ``batch``
        cut into ``split`` micro-batches (call that under ``torch.no_grad``)."""
        if split > 1:
            return self.cache_micro_batches(batch, split)
        encoded = self.encode(batch)
        if cache is None:
            return self.loss(encoded, batch)
        if not 0 <= index < len(cache.encoded):
            raise IndexError(f"micro-batch index {index} out of range for {len(cache.encoded)} cached micro-batches")
        merged = cat_encoded(cache.encoded[:index] + [encoded] + cache.encoded[index + 1:])
        last = index == len(cache.encoded) - 1
        return self.loss(merged, {**cache.batch, **cache.random_inputs}, objective_grad=last)

    def cache_micro_batches(self, batch: dict, parts: int) -> AccumCache:
        """Encode ``batch`` in ``parts`` micro-batches (under ``torch.no_grad``) -> ``AccumCache``."""
        if torch.is_grad_enabled():
            raise RuntimeError("cache the micro-batches under torch.no_grad(): their graphs would be kept")
        micro_batches = split_batch(batch, parts)
        encoded = [self.encode(micro) for micro in micro_batches]
        pixels = batch["pixel_values"]
        random_inputs = self.objective.fixed_random_inputs(batch, pixels.shape[0], pixels.device)
        return AccumCache(batch, micro_batches, encoded, random_inputs)

    def loss(self, encoded: Encoded, batch: dict, objective_grad: bool = True) -> dict:
        """The objective on ``encoded`` (``batch`` supplies its other inputs) plus ``num_tokens``.
        Without ``objective_grad`` the objective's parameters are detached (the features keep their
        gradient): cached passes but the last use it, so those parameters count once."""
        extra = dict(batch)
        if encoded.sub_text is not None:
            extra["sub_text"] = encoded.sub_text
        args = (encoded.img, encoded.txt, extra)
        if objective_grad:
            out = dict(self.objective(*args))
        else:
            detached = {name: p.detach() for name, p in self.objective.named_parameters()}
            out = dict(torch.func.functional_call(self.objective, detached, args))
        out["num_tokens"] = batch["attention_mask"].sum()
        return out

    def optimizer_overrides(self) -> dict[str, dict]:
        """The objective's per-parameter settings (``Objective.optimizer_overrides``) under ``objective.``,
        read by ``training.optim.build_optimizer``."""
        return {f"objective.{k}": v for k, v in self.objective.optimizer_overrides().items()}

    def after_optimizer_step(self) -> None:
        """The training loop's post-step hook: the objective clamps its learned scales in place
        (open_clip's ``logit_scale.clamp_(0, math.log(100))`` after ``optimizer.step()``)."""
        self.objective.after_optimizer_step()

    def save_pretrained(self, directory: Union[str, Path]) -> Path:
        """The encoder's checkpoint plus ``objective.safetensors`` (learned temperature / bias, FLAIR's
        pooling) and ``objective.yaml`` (its config, e.g. a ``SparcConfig``)."""
        directory = self.encoder.save_pretrained(directory)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.objective.state_dict().items()}
        with atomic_path(directory / OBJECTIVE_STATE_FILE) as tmp:
            save_file(tensors, str(tmp))
        save_config(self.objective.cfg, directory / OBJECTIVE_CONFIG_FILE)
        return directory

    @classmethod
    def from_pretrained(cls, directory: Union[str, Path]) -> "Stage1Model":
        """Reload what ``save_pretrained`` wrote (encoder + objective with its learned state)."""
        directory = Path(directory)
        encoder = DualEncoder.from_pretrained(directory)
        cfg_path = directory / OBJECTIVE_CONFIG_FILE
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{directory}: no {OBJECTIVE_CONFIG_FILE}; saved without its objective")
        text = cfg_path.read_text()
        name = str(OmegaConf.create(text).get("name", ""))
        model = cls.build(encoder, config_from_yaml_text(objective_config_class(name), text))
        model.objective.load_state_dict(load_file(str(directory / OBJECTIVE_STATE_FILE)), strict=True)
        return model
