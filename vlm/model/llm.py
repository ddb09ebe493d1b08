"""The VLM's language model: load a local causal LM frozen, add LoRA (peft), optionally in 4 bits.

Any local ``AutoModelForCausalLM`` directory works (the world's tiny Llama, Qwen2.5, Llama 3...).
The base weights are always frozen; LoRA adapters (``vlm.config.LoraConfig``) are the LLM's only
trainable parameters. ``load_in_4bit`` (QLoRA) loads the base in NF4 through bitsandbytes and
needs CUDA; ``attn_implementation="flash_attention_2"`` needs the flash-attn package. Both are
checked before anything is loaded and fail with a message naming the ``gpu`` extra, never with a
silent fallback that would change results.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase

from vlm.config import LoraConfig, VLMConfig
from vlm.extras import check_extra
from vlm.files import VlmError, loading_weights, read_json
from vlm.model.processor import IGNORE_INDEX

LLM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def check_attn_implementation(name: str) -> None:
    """Raise ``MissingExtra`` when ``name`` is ``flash_attention_2`` and flash-attn is not installed."""
    if name == "flash_attention_2":
        check_extra("flash", "flash_attn", "model.attn_implementation=flash_attention_2 (else use sdpa)")


def check_4bit_available() -> None:
    """Raise ``RuntimeError`` / ``MissingExtra`` when 4-bit (QLoRA) loading cannot work here."""
    if not torch.cuda.is_available():
        raise RuntimeError("model.load_in_4bit=true (QLoRA) needs a CUDA GPU: bitsandbytes' 4-bit kernels do not "
                           "run on the CPU. Set model.load_in_4bit=false to train LoRA on the full-precision LLM.")
    for module in ("bitsandbytes", "accelerate"):
        check_extra("qlora", module, "model.load_in_4bit=true (QLoRA)")


def check_llm_request(cfg: VLMConfig, path: Optional[str | Path] = None) -> Path:
    """Everything that can be checked before loading: the directory, flash-attn, 4-bit. Returns the path."""
    path = Path(path if path is not None else cfg.llm)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.llm: {path} is not a local model directory (no config.json)")
    check_attn_implementation(cfg.attn_implementation)
    if cfg.load_in_4bit:
        check_4bit_available()
    return path


def load_llm(cfg: VLMConfig, path: Optional[str | Path] = None) -> PreTrainedModel:
    """Load ``path`` (default ``cfg.llm``) with ``AutoModelForCausalLM``, frozen and in eval mode.

    Storage dtype ``cfg.llm_dtype`` (fp32 | bf16), or NF4 with bf16 compute under
    ``cfg.load_in_4bit`` (then prepared with peft's ``prepare_model_for_kbit_training``).
    """
    path = check_llm_request(cfg, path)
    kwargs: dict = dict(attn_implementation=cfg.attn_implementation, use_safetensors=True)  # never unpickle
    if cfg.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True)
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    else:
        kwargs["dtype"] = LLM_DTYPES[cfg.llm_dtype]
    with loading_weights(path, "LLM"):
        llm = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if cfg.load_in_4bit:
        llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=False)
    freeze(llm)
    return llm


def freeze(module: nn.Module) -> nn.Module:
    """Set ``requires_grad=False`` on every parameter and put ``module`` in eval mode; returns it."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def apply_lora(llm: PreTrainedModel, lora: LoraConfig, trainable_tokens: Sequence[int] = ()) -> nn.Module:
    """Wrap ``llm`` in a peft ``PeftModel`` with fresh LoRA adapters (B = 0, so outputs are unchanged).

    ``lora.target_modules`` may be ``["all-linear"]`` (every linear layer but the output head).
    ``trainable_tokens``: token ids whose embedding rows train too (peft ``trainable_token_indices``;
    with tied embeddings the output head's rows are the same rows). Only the adapter weights (and
    those rows) are trainable afterwards.
    """
    targets = lora.target_modules
    target = "all-linear" if list(targets) == ["all-linear"] else list(targets)
    extra = {"trainable_token_indices": sorted(int(i) for i in trainable_tokens)} if trainable_tokens else {}
    peft_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=target,
                              bias="none", task_type="CAUSAL_LM", **extra)
    return get_peft_model(llm, peft_cfg)


def load_lora(llm: PreTrainedModel, adapter_dir: str | Path, trainable: bool = False) -> nn.Module:
    """Attach a LoRA adapter saved by peft's ``save_pretrained`` (``adapter_dir``) to ``llm``. Only
    ``adapter_model.safetensors`` is read: peft would fall back to unpickling ``adapter_model.bin``."""
    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if not weights.is_file():
        raise VlmError(f"LoRA adapter weights not found: {weights} (a pickled adapter_model.bin is never loaded)")
    config = Path(adapter_dir) / "adapter_config.json"
    tokens = read_json(config, "LoRA adapter config").get("trainable_token_indices") if config.is_file() else None
    lists = (tokens.values() if isinstance(tokens, dict) else [tokens]) if tokens else []  # peft: a list or {layer: list}
    rows = llm.get_input_embeddings().weight.shape[0]
    if max((max(ids) for ids in lists if ids), default=-1) >= rows:
        raise VlmError(f"{config}: trainable_token_indices reach beyond the LLM's {rows} embedding rows: the adapter "
                       "was trained with added tokens this config does not add (model.coordinate_tokens: true?)")
    return PeftModel.from_pretrained(llm, str(adapter_dir), is_trainable=trainable)


def base_model(llm: nn.Module) -> PreTrainedModel:
    """The ``transformers`` model inside a peft wrapper (or ``llm`` itself)."""
    return llm.get_base_model() if hasattr(llm, "get_base_model") else llm


def decoder(llm: nn.Module) -> nn.Module:
    """The decoder stack (embeddings, layers, final norm) of a causal LM, e.g. ``LlamaModel``."""
    base = base_model(llm)
    inner = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", None)
    if inner is None or not hasattr(inner, "layers"):
        raise TypeError(f"{type(base).__name__}: cannot find its decoder layers (expected .model.layers)")
    return inner


def labelled_token_loss(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions, the output head run on those only.

    hidden [B,T,d] (position t predicts ``labels[:, t+1]``), labels [B,T] (``IGNORE_INDEX`` where
    nothing is predicted), head: hidden [N,d] -> logits [N,V] -> scalar. The same value as a
    ``transformers`` causal LM's ``labels=`` loss, without the [B,T,V] logits; when nothing is labelled
    (every answer cut off), a zero that keeps the graph instead of nan.
    """
    targets = labels[:, 1:]
    selected = targets != IGNORE_INDEX
    n = int(selected.sum())
    if n == 0:
        return hidden.sum() * 0.0
    logits = head(hidden[:, :-1][selected]).float()
    return F.cross_entropy(logits, targets[selected], reduction="sum") / n


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder layers of a causal LM (through a peft wrapper)."""
    return decoder(llm).layers


def ensure_image_token(tokenizer: PreTrainedTokenizerBase, llm: PreTrainedModel, image_token: str) -> int:
    """Id of ``image_token`` in ``tokenizer``, adding it as a special token when missing.

    A newly added id beyond the embedding matrix grows it (``resize_token_embeddings``; the new
    row stays frozen: the projector overwrites that position's embedding anyway).
    """
    if len(tokenizer(image_token, add_special_tokens=False)["input_ids"]) != 1:
        tokenizer.add_tokens([image_token], special_tokens=True)
    token_id = int(tokenizer.convert_tokens_to_ids(image_token))
    rows = llm.get_input_embeddings().weight.shape[0]
    if token_id >= rows:
        llm.resize_token_embeddings(token_id + 1)
        freeze(llm)
    return token_id


COORDINATE_TOKENS = tuple(f"{k / 100:.2f}" for k in range(101))  # what ``format_box`` writes: 2 decimals in [0, 1]


def ensure_coordinate_tokens(tokenizer: PreTrainedTokenizerBase, llm: PreTrainedModel, seed: int = 0) -> list[int]:
    """Ids of "0.00" ... "1.00" (``COORDINATE_TOKENS``) in ``tokenizer``, each added as one token when
    missing, so a box ``[0.12, 0.40, 0.53, 0.98]`` is 12 ids with one per coordinate.

    New ids beyond the embedding matrix grow it; their rows (input, and output when untied) are the old
    rows' mean plus ``seed``-ed Gaussian noise of the old rows' per-dimension std: distinct, and the same
    on every load (``apply_lora(trainable_tokens=...)`` trains them). Returns the 101 ids in order.
    """
    missing = [t for t in COORDINATE_TOKENS if len(tokenizer(t, add_special_tokens=False)["input_ids"]) != 1]
    if missing:
        tokenizer.add_tokens(missing)
    ids = [int(tokenizer.convert_tokens_to_ids(t)) for t in COORDINATE_TOKENS]
    rows = llm.get_input_embeddings().weight.shape[0]
    if max(ids) >= rows:
        llm.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
        fill_new_rows(llm, rows, seed=seed)
        freeze(llm)
    return ids


@torch.no_grad()
def fill_new_rows(llm: nn.Module, old_rows: int, seed: Optional[int] = None) -> None:
    """Embedding rows from ``old_rows`` on (input and output; one matrix when tied) := the old rows' mean,
    plus, with ``seed``, Gaussian noise of the old rows' per-dimension std drawn from that seed (distinct
    rows). Deterministic either way, so a reloaded model rebuilds the same (frozen) rows."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    weights = [getattr(e, "weight", None) for e in (llm.get_input_embeddings(), llm.get_output_embeddings())]
    for weight in {id(w): w for w in weights if w is not None and w.shape[0] > old_rows}.values():
        if generator is None:
            weight[old_rows:] = weight[:old_rows].mean(dim=0, keepdim=True).to(weight.dtype)
        else:
            old = weight[:old_rows].float()
            noise = torch.randn(weight.shape[0] - old_rows, old.shape[1], generator=generator)
            weight[old_rows:] = (old.mean(0) + noise * old.std(0)).to(weight.dtype)


@contextlib.contextmanager
def eager_attention(model: PreTrainedModel) -> Iterator[None]:
    """Run ``model`` (a transformers model, composite ones included) with eager attention inside the
    block, its own implementation restored after: SDPA and flash attention return no weights."""
    implementation = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(implementation)


def image_attention_rows(attentions: Sequence[torch.Tensor], input_ids: torch.Tensor, image_token_id: int,
                         where: str = "image_attention") -> torch.Tensor:
    """A forward's ``attentions`` (one [B,H,T,T] per layer) -> [B,L,P] on the CPU: the last position's
    weights over the positions holding ``image_token_id`` in ``input_ids`` [B,T], averaged over heads.
    Every row must hold the same number P > 0 of image tokens (ValueError naming ``where``)."""
    is_image = input_ids == image_token_id
    counts = is_image.sum(1)
    if not bool((counts == counts[0]).all()) or int(counts[0]) == 0:
        raise ValueError(f"{where}: image tokens per prompt {counts.tolist()}; image_attention needs the "
                         "same number in every prompt")
    last = torch.stack([a[:, :, -1, :].float().mean(1) for a in attentions], 1)  # [B,L,T]
    return torch.stack([last[b][:, is_image[b]] for b in range(len(input_ids))]).cpu()
