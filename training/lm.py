"""Train the world's tiny Llama-architecture causal LM (``vlm train lm``).

Corpus (``data.documents``), generated from ``cfg.world`` for its train split (no exported world
is read), plus ``data.text_files`` (one document per line):

- ``image`` (default): per-image documents (``vlm.world.generator.world_documents``): a caption,
  then questions with their answers (POPE-style yes/no with absent objects, counts, true/false
  statements, boxes, captions), in stage two's text format with the caption where the image goes
  (encoded by ``vlm.model.processor.VLMProcessor`` without image tokens), so the LM arrives at stage
  two able to answer a question from what precedes it. Documents are packed whole into blocks of
  ``data.block_size`` (longer ones cut), the rest of a block padded and left out of the loss. With
  ``data.loss_on=answers`` (the default) only the answers (and their ``</s>``) are predicted, as
  in instruction tuning; ``all`` predicts every token.
- ``standalone``: every text of the world (``world_corpus``) its own ``<s>...</s>`` document,
  shuffled, concatenated and cut into blocks.

A byte-level BPE tokenizer is trained on the corpus's text (``<image>`` reserved as one special
token for stage two); the shared loop trains next-token prediction on the blocks.

``final/`` holds ``save_pretrained`` outputs of both model and tokenizer, so
``AutoModelForCausalLM.from_pretrained(final)`` and ``AutoTokenizer.from_pretrained(final)`` load
it like any hub LLM. No chat template is set: the VLM processor handles template-less LLMs.
"""
from __future__ import annotations

import dataclasses
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
from vlm.config import ConfigError, LMConfig, LMModelConfig
from vlm.data.prompts import IMAGE_TOKEN
from vlm.data.tokenizer import train_bpe_tokenizer
from vlm.model.llm import decoder, labelled_token_loss
from vlm.model.processor import IGNORE_INDEX, VLMProcessor
from vlm.world.generator import world_corpus, world_documents, world_split

Conversation = list[tuple[str, str]]  # ("human" | "gpt", text) turns



class CausalLMObjective(nn.Module):
    """Wraps a causal LM for the loop: ``forward({"input_ids": [B,T], "labels": [B,T]}) -> {"loss",
    "num_tokens"}``; the columns after the batch's last labelled token are not computed, and the output
    head runs only on labelled positions."""

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
        labels = batch.get("labels", input_ids)  # -100 on padding
        # Columns after the last labelled one change no loss (attention is causal): cut them off.
        last = max(int(labelled_lengths(labels).max()), 1)
        input_ids, labels = input_ids[:, :last], labels[:, :last]
        # The output head only where a label is (the recipe's answers-only documents label 6% of positions).
        hidden = decoder(self.lm)(input_ids=input_ids).last_hidden_state
        loss = labelled_token_loss(hidden, labels, self.lm.get_output_embeddings())
        return {"loss": loss, "num_tokens": input_ids.numel()}


def read_text_files(paths: Iterable[str]) -> list[str]:
    """Non-empty, stripped lines of each file (one document per line); a missing file is an error."""
    docs = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"data.text_files: {path} does not exist")
        docs += [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return docs


def _train_indices(cfg: LMConfig) -> range:
    """The world's train indices the corpus draws on (the first ``data.max_world_samples`` when set)."""
    train_indices, _ = world_split(cfg.world)
    return train_indices[: cfg.data.max_world_samples] if cfg.data.max_world_samples else train_indices


def build_corpus(cfg: LMConfig) -> list[str]:
    """Standalone documents: the world's train-split texts, then ``cfg.data.text_files`` lines."""
    docs = list(tqdm(world_corpus(cfg.world, _train_indices(cfg)), desc="world text", unit=" texts",
                     disable=not (cfg.run.progress and distributed.is_main())))
    docs += read_text_files(cfg.data.text_files)
    if not docs:
        raise ConfigError("the LM corpus is empty (no world texts and no data.text_files)")
    return docs


def build_image_documents(cfg: LMConfig) -> list[Conversation]:
    """Per-image documents (``world_documents``: ``data.documents_per_image`` per image, each of
    ``data.turns_per_document`` turns of the kinds ``data.mix`` weighs, else ``world.llava_mix``), then
    each ``data.text_files`` line as a one-turn document."""
    world = dataclasses.replace(cfg.world, llava_mix=dict(cfg.data.mix)) if cfg.data.mix else cfg.world
    docs = list(tqdm(world_documents(world, _train_indices(cfg), cfg.data.documents_per_image,
                                     cfg.data.turns_per_document, cfg.data.contexts),
                     desc="world documents", unit=" docs", disable=not (cfg.run.progress and distributed.is_main())))
    docs += [[("human", line)] for line in read_text_files(cfg.data.text_files)]
    if not docs:
        raise ConfigError("the LM corpus is empty (no world documents and no data.text_files)")
    return docs


def tokenizer_texts(cfg: LMConfig, conversations: list[Conversation]) -> list[str]:
    """What the BPE of image documents is trained on: the documents' texts, and with
    ``data.tokenizer_corpus: world`` every text of the same world samples too (``world_corpus``:
    stage two's prompts, boxes and captions), so the tokenizer the VLM inherits is compact on text
    the documents do not hold (a box is 9 tokens, one per number, instead of ~24, one per character)."""
    texts = [text for doc in conversations for _, text in doc]
    if cfg.data.tokenizer_corpus == "documents":
        return texts
    return texts + list(world_corpus(cfg.world, _train_indices(cfg)))


def encode_image_documents(tokenizer: PreTrainedTokenizerBase, docs: list[Conversation],
                           max_len: int) -> list[tuple[list[int], list[int]]]:
    """(token ids, answer labels) of each document in stage two's plain text format without image
    tokens: ``<s>{turn 1}\n{answer 1}</s>{turn 2}\n{answer 2}</s>...``, cut at ``max_len``; the labels
    are the ids on answers and ``</s>``, -100 on prompts (``VLMProcessor.encode_conversation``). A
    document of one human turn (a text file line) is ``<s>{text}</s>``, all of it labelled."""
    processor = VLMProcessor(tokenizer, None, num_image_tokens=0, max_len=max_len)
    out = []
    for doc in docs:
        if len(doc) == 1:
            ids = list(tokenizer(doc[0][1], add_special_tokens=True)["input_ids"][:max_len])
            out.append((ids, ids))
        else:
            ids, labels = processor.encode_conversation(doc)
            out.append((list(ids), list(labels)))
    return out


def pack_documents(docs: list[tuple[list[int], list[int]]], block_size: int, pad_id: int,
                   seed: int, one_per_block: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle (ids, labels) documents (seeded) and pack them whole into blocks -> (input_ids,
    labels), both ``[N, block_size]`` long. A document never straddles two blocks (one longer than a
    block is cut), and with ``one_per_block`` has its block to itself (no earlier document to read
    by mistake); the end of a block is ``pad_id``, with label -100 (no loss)."""
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    blocks: list[tuple[list[int], list[int]]] = [([], [])]
    for i in order:
        ids, labels = docs[i][0][:block_size], docs[i][1][:block_size]
        if len(blocks[-1][0]) + len(ids) > block_size or (one_per_block and blocks[-1][0]):
            blocks.append(([], []))
        blocks[-1][0].extend(ids)
        blocks[-1][1].extend(labels)
    blocks = [b for b in blocks if b[0]]
    if not blocks:
        raise ConfigError("the corpus has no tokens")
    input_ids = torch.full((len(blocks), block_size), pad_id, dtype=torch.long)
    targets = torch.full((len(blocks), block_size), IGNORE_INDEX, dtype=torch.long)
    for b, (ids, labels) in enumerate(blocks):
        input_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        targets[b, : len(labels)] = torch.tensor(labels, dtype=torch.long)
    return input_ids, targets


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
        raise ConfigError(f"the corpus has {len(stream)} tokens, fewer than one block of {block_size}")
    return torch.tensor(stream[: n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)


def build_lm(model: LMModelConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    """A randomly initialised ``LlamaForCausalLM`` sized by ``model`` with the tokenizer's vocabulary."""
    if model.hidden_size % model.num_heads:
        raise ConfigError(f"model.hidden_size {model.hidden_size} is not divisible by model.num_heads {model.num_heads}")
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


def corpus_blocks(cfg: LMConfig, resuming: bool = False):
    """The LM's training data for ``cfg.data``: (input_ids [N,T], labels [N,T] with IGNORE_INDEX off the
    loss, the tokenizer, the number of documents). Trains the BPE tokenizer and saves it under
    ``run.out_dir/tokenizer``, or with ``resuming`` loads the one saved there."""
    if cfg.data.documents == "standalone":
        docs = build_corpus(cfg)
        tokenizer = _tokenizer(cfg, docs, resuming)
        blocks = pack_blocks(tokenize_documents(tokenizer, docs), cfg.data.block_size, seed=cfg.run.seed)
        return blocks, blocks, tokenizer, len(docs)
    conversations = build_image_documents(cfg)
    tokenizer = _tokenizer(cfg, tokenizer_texts(cfg, conversations), resuming)
    encoded = encode_image_documents(tokenizer, conversations, cfg.data.block_size)
    if cfg.data.loss_on == "all":
        encoded = [(ids, ids) for ids, _ in encoded]
    blocks, labels = pack_documents(encoded, cfg.data.block_size, tokenizer.pad_token_id, seed=cfg.run.seed,
                                    one_per_block=not cfg.data.pack)
    return blocks, labels, tokenizer, len(conversations)


def labelled_lengths(labels: torch.Tensor) -> torch.Tensor:
    """labels [N,T] -> [N]: per row, 1 + the position of its last labelled token (0 if none); the
    columns ``CausalLMObjective`` keeps (their max over the batch) and the length-grouped sampler's key."""
    positions = torch.arange(1, labels.shape[1] + 1, device=labels.device)
    return ((labels != IGNORE_INDEX) * positions).amax(1)


def run(cfg: LMConfig) -> Path:
    """Train the world's LLM with ``cfg``; returns ``out_dir/final`` (HF model + tokenizer)."""
    if cfg.data.block_size > cfg.model.max_position:
        raise ConfigError(f"data.block_size {cfg.data.block_size} exceeds model.max_position {cfg.model.max_position}")
    info = distributed.setup(cfg.run.device)
    out_dir = Path(cfg.run.out_dir)
    resuming = check_out_dir(out_dir, cfg.run) is not None  # fails early on a non-resumed existing run
    distributed.barrier()

    blocks, labels, tokenizer, n_docs = corpus_blocks(cfg, resuming)
    if info.is_main:
        print(f"LM corpus ({cfg.data.documents} documents): {n_docs} documents, {int((labels != IGNORE_INDEX).sum())} "
              f"tokens in {len(blocks)} blocks of {cfg.data.block_size}; vocabulary {len(tokenizer)}")

    torch.manual_seed(cfg.run.seed)
    model = CausalLMObjective(build_lm(cfg.model, tokenizer), tokenizer)
    batches = ResumableBatches(len(blocks), cfg.optim.batch_size, lambda ids: {"input_ids": blocks[ids], "labels": labels[ids]},
                               seed=cfg.run.seed, rank=info.rank, world_size=info.world_size,
                               lengths=labelled_lengths(labels).tolist(), group_by_length=cfg.data.group_by_length)
    result = train(model, batches, cfg.optim, cfg.run, config=cfg)
    return result.final_dir
