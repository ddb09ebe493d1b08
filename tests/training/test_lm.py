"""The world's LLM recipe: packing, corpus, and a tiny end-to-end run that loads with stock transformers."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from training.lm import (build_corpus, build_image_documents, encode_image_documents, pack_blocks, pack_documents, run,
                         tokenize_documents, tokenizer_texts)
from vlm.data.tokenizer import train_bpe_tokenizer
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


def test_pack_documents_keeps_each_document_whole_and_pads_out_of_the_loss():
    docs = [[1] + [10 + i] * (2 + i % 4) + [2] for i in range(12)]  # 4..7 tokens each
    ids, labels = pack_documents([(d, [-100] * (len(d) - 2) + d[-2:]) for d in docs], block_size=10, pad_id=0, seed=0)
    assert ids.shape == labels.shape and ids.shape[1] == 10
    seen = []
    for row, lab in zip(ids.tolist(), labels.tolist()):
        n = sum(t != 0 for t in row)
        assert row[n:] == [0] * (10 - n) and lab[n:] == [-100] * (10 - n)
        assert all(a in (-100, t) for a, t in zip(lab[:n], row[:n])) and lab[:n].count(2) == row[:n].count(2)
        starts = [k for k, t in enumerate(row[:n]) if t == 1]
        assert starts[0] == 0  # a block starts with a document, never inside one
        seen += [tuple(row[a:b]) for a, b in zip(starts, starts[1:] + [n])]
    assert sorted(seen) == sorted(map(tuple, docs))
    long = [1] + [7] * 20 + [2]
    cut, _ = pack_documents([(long, long)], block_size=8, pad_id=0, seed=0)
    assert cut.tolist() == [[1] + [7] * 7]  # a document longer than a block is cut


def test_image_documents_use_stage_two_text_format(tmp_path):
    cfg = LMConfig(data=TextDataConfig(max_world_samples=6, block_size=256, documents_per_image=2, turns_per_document=3),
                   world=WorldConfig(n_train=6, n_eval=0, seed=2), run=RunConfig(progress=False))
    docs = build_image_documents(cfg)
    assert len(docs) == 12 and all(len(d) == 6 for d in docs)
    tok = train_bpe_tokenizer([t for d in docs for _, t in d], vocab_size=400, extra_special_tokens=("<image>",),
                              add_bos=True, add_eos=True)
    encoded = encode_image_documents(tok, docs, max_len=256)
    (_, h1), (_, a1), (_, h2), (_, a2), (_, h3), (_, a3) = docs[0]
    ids, labels = encoded[0]
    assert tok.decode(ids) == f"<s>{h1}\n{a1}</s>{h2}\n{a2}</s>{h3}\n{a3}</s>"
    assert tok.decode([t for t in labels if t != -100]) == f"{a1}</s>{a2}</s>{a3}</s>"  # answers only
    assert encode_image_documents(tok, docs[:1], max_len=10)[0] == (ids[:10], labels[:10])


def tiny_cfg(tmp_path, text_file):
    return LMConfig(
        model=LMModelConfig(vocab_size=384, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4,
                            max_position=64),
        data=TextDataConfig(world_dir=str(tmp_path / "world"), text_files=[str(text_file)], block_size=32,
                            documents="standalone"),
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


def test_tiny_world_lm_on_image_documents(tmp_path):
    text_file = tmp_path / "extra.txt"
    text_file.write_text("zebra quokka axolotl\n")
    cfg = tiny_cfg(tmp_path, text_file)
    cfg = replace(cfg, data=replace(cfg.data, documents="image", block_size=64, max_world_samples=20),
                  optim=replace(cfg.optim, max_steps=10))
    final = run(cfg)
    rows = [json.loads(ln) for ln in (tmp_path / "lm" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 10 and rows[-1]["loss"] < rows[0]["loss"]
    tok = AutoTokenizer.from_pretrained(final)
    assert AutoModelForCausalLM.from_pretrained(final).config.vocab_size == len(tok)


def test_image_document_tokenizer_is_compact_on_what_stage_two_shows():
    """The documents hold no box (their mix has no grounding), yet with data.tokenizer_corpus=world the
    tokenizer has seen the world's stage-two texts: a box is one token per number, the grounding prompt short."""
    from vlm.data.prompts import format_box, grounding_prompt
    cfg = LMConfig(data=TextDataConfig(max_world_samples=200, mix={"exist": 1.0, "count": 1.0}, tokenizer_corpus="world"),
                   world=WorldConfig(n_train=200, n_eval=0, seed=2), run=RunConfig(progress=False))
    docs = build_image_documents(cfg)
    assert not any("[0." in text for doc in docs for _, text in doc)
    tok = train_bpe_tokenizer(tokenizer_texts(cfg, docs), vocab_size=1024, add_bos=False, add_eos=False)
    assert len(tok(format_box((0.36, 0.28, 0.61, 0.53)))["input_ids"]) == 9
    assert len(tok(grounding_prompt("the red circle"))["input_ids"]) < 40
    # the default trains on the documents alone: a box is then one token per character
    cfg = replace(cfg, data=replace(cfg.data, tokenizer_corpus="documents"))
    assert tokenizer_texts(cfg, docs) == [text for doc in docs for _, text in doc]
    with pytest.raises(ValueError, match="data.tokenizer_corpus"):
        TextDataConfig(tokenizer_corpus="bogus")


def test_pack_documents_one_per_block():
    docs = [([1, 5, 2], [-100, 5, 2]), ([1, 6, 6, 2], [-100, -100, 6, 2])]
    ids, labels = pack_documents(docs, block_size=8, pad_id=0, seed=0, one_per_block=True)
    assert sorted(map(tuple, ids.tolist())) == [(1, 5, 2, 0, 0, 0, 0, 0), (1, 6, 6, 2, 0, 0, 0, 0)]
    assert sorted(map(tuple, labels.tolist()))[0] == (-100, -100, 6, 2, -100, -100, -100, -100)


def test_data_mix_chooses_the_documents_turn_kinds():
    cfg = LMConfig(data=TextDataConfig(max_world_samples=8, documents_per_image=2, turns_per_document=3,
                                       mix={"exist": 1.0, "count": 1.0}),
                   world=WorldConfig(n_train=8, n_eval=0, seed=2), run=RunConfig(progress=False))
    questions = [text for doc in build_image_documents(cfg) for role, text in doc if role == "human"]
    assert len(questions) == 8 * 2 * 3
    assert all(("Is there a" in q) or ("How many" in q) for q in questions)  # no box, caption or statement
    assert any("Is there a" in q for q in questions) and any("How many" in q for q in questions)
    with pytest.raises(ValueError, match="data.mix"):
        TextDataConfig(mix={"boxes": 1.0})


def test_lm_objective_skips_the_columns_after_the_last_label():
    from training.lm import CausalLMObjective
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
    ids = torch.randint(3, 20, (3, 12))
    labels = torch.full_like(ids, -100)
    labels[0, 4:6], labels[2, 2:8] = ids[0, 4:6], ids[2, 2:8]  # the last label is in column 7
    full = lm(input_ids=ids, labels=labels).loss
    want = [g.clone() for g in torch.autograd.grad(full, list(lm.parameters()))]
    out = CausalLMObjective(lm)({"input_ids": ids, "labels": labels})
    assert torch.allclose(out["loss"], full, atol=1e-6) and out["num_tokens"] == 3 * 8
    # the output head runs on the labelled positions only: the same gradients as HF's full-logits loss
    for got, ref in zip(torch.autograd.grad(out["loss"], list(lm.parameters())), want):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    empty = CausalLMObjective(lm)({"input_ids": ids, "labels": torch.full_like(ids, -100)})["loss"]
    assert empty.item() == 0.0 and empty.requires_grad  # a block without labels adds nothing (HF's gives nan)
