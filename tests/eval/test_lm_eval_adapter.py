"""The lm-eval adapter: log-likelihoods equal a direct computation; a local task runs offline through
lm_eval.simple_evaluate; run_language_drift compares the base LLM with the LLM + LoRA."""
import math
import os

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from eval.lm_eval_adapter import SparcLLM, evaluate_text_task, run_language_drift, write_text_task  # noqa: E402

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
    model = LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("llm")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model, tok


def test_loglikelihood_matches_direct(tiny_llm):
    _, model, tok = tiny_llm
    lm = SparcLLM(model, tok, batch_size=2)
    ctx, cont = "a small red", " circle is left"
    ctx_ids = tok(ctx, add_special_tokens=False)["input_ids"]
    whole = tok(ctx + cont, add_special_tokens=False)["input_ids"]
    cont_ids = whole[len(ctx_ids):]
    ids = torch.tensor([[tok.bos_token_id] + whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.double(), -1)[0]
    expected = sum(float(logp[len(ctx_ids) + j, t]) for j, t in enumerate(cont_ids))
    # Two more requests of other lengths in the same batch (right padding must not change anything).
    got = lm._loglikelihood_tokens([((ctx, cont), ctx_ids, cont_ids), (("x", "y"), ctx_ids[:1], cont_ids[:1]),
                                    ((ctx, cont), ctx_ids, cont_ids)])
    assert got[0][0] == pytest.approx(expected, abs=1e-4) and got[2][0] == pytest.approx(expected, abs=1e-4)


def test_rolling_covers_every_token_once(tiny_llm):
    _, model, tok = tiny_llm
    lm = SparcLLM(model, tok, max_length=8)
    text = TEXTS[0] + " " + TEXTS[1]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 8  # several windows

    class Req:
        args = (text,)

    [ll] = lm.loglikelihood_rolling([Req()], disable_tqdm=True)
    # Reference: each token scored once, with at most max_length tokens of context (BOS first).
    seq = [tok.bos_token_id] + ids
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(ids), 8):
            window_targets = list(range(start + 1, min(start + 9, len(seq))))
            ctx_start = max(0, window_targets[-1] - 8)
            inp = torch.tensor([seq[ctx_start:window_targets[-1]]])
            logp = torch.log_softmax(model(inp).logits.double(), -1)[0]
            for t in window_targets:
                total += float(logp[t - 1 - ctx_start, seq[t]])
    assert ll == pytest.approx(total, abs=1e-3)


def test_local_task_through_simple_evaluate(tiny_llm, tmp_path):
    _, model, tok = tiny_llm
    task_dir = write_text_task(tmp_path / "task", TEXTS)
    assert (task_dir / "sparc_world_text.jsonl").read_text().count("\n") == 4  # duplicates dropped
    m = evaluate_text_task(SparcLLM(model, tok), task_dir)
    assert set(m) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert all(math.isfinite(v) and v > 0 for v in m.values())
    # bits per byte = -sum(ll) / (sum(bytes) * ln 2): recompute from the adapter's own log-likelihoods.
    lm = SparcLLM(model, tok)

    class Req:
        def __init__(self, s):
            self.args = (s,)

    docs = list(dict.fromkeys(TEXTS))
    lls = lm.loglikelihood_rolling([Req(d) for d in docs], disable_tqdm=True)
    bpb = -sum(lls) / (sum(len(d.encode("utf-8")) for d in docs) * math.log(2))
    assert m["bits_per_byte"] == pytest.approx(bpb, rel=1e-6)


def test_run_language_drift(tiny_llm, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    from vlm.config import VLMConfig, save_config

    path, _, _ = tiny_llm
    ckpt = tmp_path / "ckpt"
    lora = get_peft_model(LlamaForCausalLM.from_pretrained(path),
                          PeftLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(ckpt / "adapter")
    save_config(VLMConfig(llm=str(path), vision_tower="unused"), ckpt / "vlm.yaml")
    from eval.lm_eval_adapter import METRICS, PROBE_METRICS
    from vlm.config import WorldConfig
    from vlm.world.export import export_world

    export_world(tmp_path / "world", WorldConfig(n_train=4, n_eval=3, seed=1), progress=False)
    out = tmp_path / "drift"
    res = run_language_drift(ckpt, out, texts=TEXTS, limit=3, world_dir=tmp_path / "world")
    assert res["n_docs"] == 3
    for side in ("before", "after"):
        assert set(res[side]) == set(METRICS + PROBE_METRICS)  # lm-eval's and the text probe's
        assert 0 <= res[side]["text_probe_pope_acc"] <= 1
        assert (out / side / "text_probe" / "predictions.jsonl").read_text().count("\n") >= 3 * 3  # POPE splits (+ VSR)
    assert res["after"]["bits_per_byte"] != pytest.approx(res["before"]["bits_per_byte"])  # the LoRA changes the LM
    assert res["delta"]["bits_per_byte"] == pytest.approx(res["after"]["bits_per_byte"] - res["before"]["bits_per_byte"])
    # "before" is exactly the base LLM: the same number from the saved base model directly.
    base = evaluate_text_task(SparcLLM(LlamaForCausalLM.from_pretrained(path), tiny_llm[2]), out / "task", limit=3)
    assert res["before"]["bits_per_byte"] == pytest.approx(base["bits_per_byte"], rel=1e-6)
    assert (out / "summary.json").is_file() and "with LoRA" in (out / "summary.md").read_text()


def test_registered_as_lm_eval_model(tiny_llm, tmp_path):
    """lm-eval finds the adapter by name and builds it from ``model_args``, with the same numbers."""
    from lm_eval import simple_evaluate
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    from eval.lm_eval_adapter import MODEL_NAME, TASK_NAME

    assert get_model(MODEL_NAME) is SparcLLM
    path, model, tok = tiny_llm
    task_dir = write_text_task(tmp_path / "task", TEXTS)
    res = simple_evaluate(model=MODEL_NAME, model_args=f"pretrained={path}", tasks=[TASK_NAME], limit=2,
                          task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                          bootstrap_iters=0, log_samples=False, cache_requests=False)
    by_name = res["results"][TASK_NAME]["bits_per_byte,none"]
    assert by_name == pytest.approx(evaluate_text_task(SparcLLM(model, tok), task_dir, limit=2)["bits_per_byte"], rel=1e-6)
