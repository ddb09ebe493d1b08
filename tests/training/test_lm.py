"""The world's LLM recipe: packing, corpus, and a tiny end-to-end run that loads with stock transformers."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from training.lm import build_corpus, pack_blocks, run, tokenize_documents
from vlm.config import replace, LMConfig, LMModelConfig, OptimConfig, RunConfig, TextDataConfig, WorldConfig


def test_pack_blocks_shuffles_documents_and_keeps_boundaries():
    docs = [[1, 10 + i, 10 + i, 2] for i in range(10)]  # <s> x x </s>
    blocks = pack_blocks(docs, block_size=8, seed=0)
    assert blocks.shape == (5, 8) and blocks.dtype == torch.long
    flat = blocks.flatten().tolist()
    assert sorted(flat[1::4]) == [10 + i for i in range(10)] and flat[0::4] == [1] * 10 and flat[3::4] == [2] * 10
    assert flat[1::4] != [10 + i for i in range(10)]  # shuffled
    assert torch.equal(blocks, pack_blocks(docs, 8, seed=0)) and not torch.equal(blocks, pack_blocks(docs, 8, seed=1))
    assert pack_blocks(docs, block_size=12, seed=0).shape == (3, 12)  # 40 tokens: the 4-token tail is dropped
    with pytest.raises(ValueError, match="fewer than one block"):
        pack_blocks(docs[:1], block_size=8, seed=0)


def tiny_cfg(tmp_path, text_file):
    return LMConfig(
        model=LMModelConfig(vocab_size=384, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4,
                            max_position=64),
        data=TextDataConfig(world_dir=str(tmp_path / "world"), text_files=[str(text_file)], block_size=32),
        world=WorldConfig(n_train=40, n_eval=4, seed=3),
        optim=OptimConfig(lr=5e-3, warmup_steps=5, max_steps=40, batch_size=8, weight_decay=0.01),
        run=RunConfig(out_dir=str(tmp_path / "lm"), log_every=5, ckpt_every=20, progress=False, tensorboard=False,
                      device="cpu"),
    )


def test_tiny_world_lm_trains_and_loads_with_auto_classes(tmp_path):
    text_file = tmp_path / "extra.txt"
    text_file.write_text("zebra quokka axolotl\n\n  a second extra document  \n")
    cfg = tiny_cfg(tmp_path, text_file)
    docs = build_corpus(cfg)
    assert docs[-2:] == ["zebra quokka axolotl", "a second extra document"]
    assert len(docs) > 40 * 5 and all(isinstance(d, str) and d for d in docs)

    capped = build_corpus(replace(cfg, data=replace(cfg.data, max_world_samples=10, text_files=[])))
    assert 0 < len(capped) < len(docs) - 2 and capped == docs[: len(capped)]

    final = run(cfg)
    assert final == tmp_path / "lm" / "final"
    rows = [json.loads(ln) for ln in (tmp_path / "lm" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 40 and rows[-1]["loss"] < 0.6 * rows[0]["loss"]
    assert rows[0]["tokens_per_s"] > 0

    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == len(tok)
    assert model.config._attn_implementation == "sdpa"
    assert len(tok.tokenize("<image>")) == 1 and tok.convert_tokens_to_ids("<image>") != tok.unk_token_id
    assert tokenize_documents(tok, docs[:60] + docs[:5]) == tok(docs[:60] + docs[:5])["input_ids"]
    ids = tok("a red circle", return_tensors="pt").input_ids
    assert ids[0, 0] == tok.bos_token_id and ids[0, -1] == tok.eos_token_id
    prompt = ids[:, :-1]  # generate after the text, not after </s>
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    assert out.shape[1] > prompt.shape[1]
    assert isinstance(tok.decode(out[0, prompt.shape[1]:]), str)
    # the exported weights are the trained ones: the loss on training text is far below chance
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert loss < torch.log(torch.tensor(float(len(tok))))
