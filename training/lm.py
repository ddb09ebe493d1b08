"""Train the world's tiny Llama-architecture causal LM (``vlm train lm``).

Corpus: every text the synthetic world produces for its train split
(``vlm.world.generator.world_corpus``, generated from ``cfg.world``: no exported world is read)
plus ``data.text_files`` (one document per line). A byte-level BPE tokenizer is trained on it
(``<image>`` reserved as one special token for stage two; ``<s>`` and ``</s>`` around every
document). Documents are shuffled deterministically, concatenated and cut
into blocks of ``data.block_size`` tokens; the shared loop trains next-token prediction on them.

``final/`` holds ``save_pretrained`` outputs of both model and tokenizer, so
``AutoModelForCausalLM.from_pretrained(final)`` and ``AutoTokenizer.from_pretrained(final)`` load
it like any hub LLM. No chat template is set: the VLM processor handles template-less LLMs.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from training import distributed
from training.data import ResumableBatches
from training.loop import check_out_dir, train
from vlm.config import LMConfig, LMModelConfig
from vlm.data.prompts import IMAGE_TOKEN
from vlm.data.tokenizer import train_bpe_tokenizer
from vlm.world.generator import world_corpus, world_split



class CausalLMObjective(nn.Module):
    """Wraps a causal LM for the loop: ``forward({"input_ids": [B,T]}) -> {"loss", "num_tokens"}``."""

    def __init__(self, lm: LlamaForCausalLM, tokenizer: Optional[PreTrainedTokenizerBase] = None):
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer

    def save_pretrained(self, directory: Path) -> None:
        """The HF model (and its tokenizer, when given) as one ``from_pretrained`` directory."""
        self.lm.save_pretrained(str(directory))
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(directory))

    def forward(self, batch: dict) -> dict:
        input_ids = batch["input_ids"]
        out = self.lm(input_ids=input_ids, labels=input_ids)  # HF shifts labels internally
        return {"loss": out.loss, "num_tokens": input_ids.numel()}


def read_text_files(paths: Iterable[str]) -> list[str]:
    """Non-empty, stripped lines of each file (one document per line); a missing file is an error."""
    docs = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"data.text_files: {path} does not exist")
        docs += [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return docs


def build_corpus(cfg: LMConfig) -> list[str]:
    """The training documents: the world's train-split texts (the first ``data.max_world_samples``
    images when set), then ``cfg.data.text_files`` lines."""
    train_indices, _ = world_split(cfg.world)
    if cfg.data.max_world_samples:
        train_indices = train_indices[: cfg.data.max_world_samples]
    docs = list(tqdm(world_corpus(cfg.world, train_indices), desc="world text", unit=" texts",
                     disable=not (cfg.run.progress and distributed.is_main())))
    docs += read_text_files(cfg.data.text_files)
    if not docs:
        raise ValueError("the LM corpus is empty (no world texts and no data.text_files)")
    return docs


def tokenize_documents(tokenizer: PreTrainedTokenizerBase, docs: list[str]) -> list[list[int]]:
    """Token ids (with ``<s>``/``</s>``) of each document; repeated documents (common in the templated
    world text) are tokenized once."""
    unique = list(dict.fromkeys(docs))
    ids = dict(zip(unique, tokenizer(unique, add_special_tokens=True)["input_ids"]))
    return [ids[d] for d in docs]


def pack_blocks(token_ids: list[list[int]], block_size: int, seed: int) -> torch.Tensor:
    """Shuffle documents (seeded), concatenate, cut into ``[N, block_size]`` (tail dropped).

    ``token_ids`` are per-document ids that already carry ``<s>``/``</s>``, so documents in a block
    are separated by ``</s> <s>``.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    order = list(range(len(token_ids)))
    random.Random(seed).shuffle(order)
    stream = [t for i in order for t in token_ids[i]]
    n_blocks = len(stream) // block_size
    if n_blocks == 0:
        raise ValueError(f"the corpus has {len(stream)} tokens, fewer than one block of {block_size}")
    return torch.tensor(stream[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)


def build_lm(model: LMModelConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    """A randomly initialised ``LlamaForCausalLM`` sized by ``model`` with the tokenizer's vocabulary."""
    if model.hidden_size % model.num_heads:
        raise ValueError(f"model.hidden_size {model.hidden_size} is not divisible by model.num_heads {model.num_heads}")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=model.hidden_size, intermediate_size=model.intermediate_size,
        num_hidden_layers=model.num_layers, num_attention_heads=model.num_heads,
        num_key_value_heads=model.num_heads, max_position_embeddings=model.max_position,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


def _tokenizer(cfg: LMConfig, docs: list[str], resuming: bool) -> PreTrainedTokenizerBase:
    """Train the BPE on rank 0 (or reuse the one saved by the run being resumed); every rank loads it."""
    tok_dir = Path(cfg.run.out_dir) / "tokenizer"
    if distributed.is_main() and not (resuming and tok_dir.is_dir()):
        tok = train_bpe_tokenizer(docs, vocab_size=cfg.model.vocab_size, model_max_length=cfg.model.max_position,
                                  extra_special_tokens=(IMAGE_TOKEN,), add_bos=True, add_eos=True)
        tok.save_pretrained(str(tok_dir))
    distributed.barrier()
    return AutoTokenizer.from_pretrained(str(tok_dir))


def run(cfg: LMConfig) -> Path:
    """Train the world's LLM with ``cfg``; returns ``out_dir/final`` (HF model + tokenizer)."""
    if cfg.data.block_size > cfg.model.max_position:
        raise ValueError(f"data.block_size {cfg.data.block_size} exceeds model.max_position {cfg.model.max_position}")
    info = distributed.setup(cfg.run.device)
    out_dir = Path(cfg.run.out_dir)
    resuming = check_out_dir(out_dir, cfg.run) is not None  # fails early on a non-resumed existing run
    distributed.barrier()

    docs = build_corpus(cfg)
    tokenizer = _tokenizer(cfg, docs, resuming)
    token_ids = tokenize_documents(tokenizer, docs)
    blocks = pack_blocks(token_ids, cfg.data.block_size, seed=cfg.run.seed)
    if info.is_main:
        print(f"LM corpus: {len(docs)} documents, {blocks.numel()} tokens in {len(blocks)} blocks of "
              f"{cfg.data.block_size}; vocabulary {len(tokenizer)}")

    torch.manual_seed(cfg.run.seed)
    model = CausalLMObjective(build_lm(cfg.model, tokenizer), tokenizer)
    batches = ResumableBatches(len(blocks), cfg.optim.batch_size, lambda ids: {"input_ids": blocks[ids]},
                               seed=cfg.run.seed, rank=info.rank, world_size=info.world_size)
    result = train(model, batches, cfg.optim, cfg.run, config=cfg)
    return result.final_dir
