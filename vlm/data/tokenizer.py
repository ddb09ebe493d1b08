"""Train a byte-level BPE tokenizer on a corpus and wrap it as a transformers tokenizer.

The world's text tower and the world's tiny LLM each get one; real checkpoints bring their own
and load with ``AutoTokenizer.from_pretrained(path)``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Union

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]
# GPT-2's pre-tokenizer pattern, except that a decimal number (" 0.53") stays one piece, so BPE can
# learn it as one token: a normalised box "[0.12, 0.40, 0.53, 0.98]" is then 9 tokens, not 17.
PRETOKENIZE_PATTERN = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+(?:\.\p{N}+)?| ?[^\s\p{L}\p{N}]+"
                       r"|\s+(?!\S)|\s+")


def pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Split on ``PRETOKENIZE_PATTERN`` (pieces kept), then map bytes to GPT-2's byte alphabet."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 1024, model_max_length: int = 256,
                        extra_special_tokens: tuple[str, ...] = (), add_bos: bool = True,
                        add_eos: bool = False) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and return a ``PreTrainedTokenizerFast``.

    Pre-tokenisation: ``pre_tokenizer`` (GPT-2's, with decimal numbers kept whole).
    Specials: ``<pad>`` (id 0), ``<s>``, ``</s>``, ``<unk>``, then ``extra_special_tokens`` (e.g.
    ``<image>``), each a single id. Encoding prepends ``<s>`` when ``add_bos`` and appends ``</s>``
    when ``add_eos``. Save it with ``save_pretrained``; load it with ``AutoTokenizer``.
    """
    specials = SPECIAL_TOKENS + [t for t in extra_special_tokens if t not in SPECIAL_TOKENS]
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    single = " ".join(([f"{BOS}:0"] if add_bos else []) + ["$A:0"] + ([f"{EOS}:0"] if add_eos else []))
    special_ids = [(t, tok.token_to_id(t)) for t in (BOS, EOS)]
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=special_ids)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=model_max_length,
        pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        additional_special_tokens=[t for t in specials if t not in SPECIAL_TOKENS] or None,
    )
    return wrapped


def load_tokenizer(path: Union[str, Path]) -> PreTrainedTokenizerBase:
    """``AutoTokenizer`` from ``path/tokenizer`` (our encoder checkpoints) or ``path`` (an LLM or
    tokenizer directory); local files only, never remote code. A missing directory names the path."""
    path = Path(path)
    directory = path / "tokenizer" if (path / "tokenizer").is_dir() else path
    if not directory.is_dir():
        raise FileNotFoundError(f"no tokenizer directory at {path}")
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
