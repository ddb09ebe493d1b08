"""Language drift through lm-eval's own HFLM: a local task offline; the LoRA checkpoint and its merged
copy give the same "after"; a merged checkpoint needs --base-llm; --tasks is checked."""
import math
import os

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from eval.lm_eval_adapter import (METRICS, PROBE_METRICS, TASK_NAME, evaluate_tasks, hf_lm,  # noqa: E402
                                  run_language_drift, write_text_task)

TEXTS = ["a small red circle is left of a large blue square.", "two green triangles and one yellow star.",
         "is there a heart in the image? yes.", "the purple cross is above the orange diamond."] * 3


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlm.data.tokenizer import train_bpe_tokenizer

    torch.manual_seed(0)
    tok = train_bpe_tokenizer(TEXTS * 4, vocab_size=300)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=24,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    path = tmp_path_factory.mktemp("llm")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tiny_llm, tmp_path_factory):
    """A LoRA stage-two checkpoint (adapter + vlm.yaml) and its merged copy (llm/ + vlm.yaml naming it)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoTokenizer, LlamaForCausalLM

    from vlm.config import VLMConfig, save_config

    root = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(1)
    lora = get_peft_model(LlamaForCausalLM.from_pretrained(tiny_llm),
                          PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(root / "lora" / "adapter")
    save_config(VLMConfig(llm=str(tiny_llm), vision_tower="unused"), root / "lora" / "vlm.yaml")
    lora.merge_and_unload().save_pretrained(root / "merged" / "llm")
    AutoTokenizer.from_pretrained(tiny_llm).save_pretrained(root / "merged" / "llm")
    save_config(VLMConfig(llm="llm", vision_tower="unused"), root / "merged" / "vlm.yaml")
    return root


def test_local_task_through_hflm(tiny_llm, tmp_path):
    task_dir = write_text_task(tmp_path / "task", TEXTS)
    assert (task_dir / f"{TASK_NAME}.jsonl").read_text().count("\n") == 4  # duplicates dropped
    m = evaluate_tasks(hf_lm({"pretrained": str(tiny_llm)}, batch_size=2), task_dir)
    assert set(m) == set(METRICS) and all(math.isfinite(v) and v > 0 for v in m.values())
    with pytest.raises(ValueError, match="unknown lm-eval task"):
        evaluate_tasks(hf_lm({"pretrained": str(tiny_llm)}, batch_size=2), task_dir, tasks=["no_such_task_xyz"])


def test_drift_lora_and_merged_agree(checkpoints, tiny_llm, tmp_path):
    """Before = the base LLM; after = base + adapter (HFLM's peft=) = the merged llm/ (with --base-llm)."""
    from vlm.config import WorldConfig
    from vlm.world.export import export_world

    export_world(tmp_path / "world", WorldConfig(n_train=4, n_eval=3, seed=1), progress=False)
    lora = run_language_drift(checkpoints / "lora", tmp_path / "a", texts=TEXTS, limit=3, world_dir=tmp_path / "world")
    assert lora["n_docs"] == 3 and lora["after_model"]["peft"].endswith("adapter")
    for side in ("before", "after"):
        assert set(lora[side]) == set(METRICS + PROBE_METRICS)
    assert lora["after"]["bits_per_byte"] != pytest.approx(lora["before"]["bits_per_byte"])  # the LoRA changes the LM
    merged = run_language_drift(checkpoints / "merged", tmp_path / "b", base_llm_path=tiny_llm, texts=TEXTS, limit=3)
    assert merged["after"]["bits_per_byte"] == pytest.approx(lora["after"]["bits_per_byte"], rel=1e-4)
    assert merged["before"]["bits_per_byte"] == pytest.approx(lora["before"]["bits_per_byte"], rel=1e-6)
    assert "after stage two" in (tmp_path / "b" / "summary.md").read_text()


def test_merged_checkpoint_needs_base_llm(checkpoints, tmp_path, capsys):
    from vlm.cli import main

    with pytest.raises(ValueError, match="--base-llm"):
        run_language_drift(checkpoints / "merged", tmp_path / "c", texts=TEXTS)
    assert not (tmp_path / "c").exists()
    assert main(["eval", "drift", "--ckpt", str(checkpoints / "merged"), "--base-llm", str(checkpoints / "merged" / "llm"),
                 "--out", str(tmp_path / "d"), "--tasks", TASK_NAME, "--limit", "2", "--world-dir", str(tmp_path)]) == 0
    assert (tmp_path / "d" / "summary.json").is_file()
