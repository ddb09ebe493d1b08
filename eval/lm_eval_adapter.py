"""Language drift: does stage two's LoRA hurt the LLM as a language model? Measured with lm-eval.

``SparcLLM`` wraps a causal LM (the stage-two LLM with its LoRA, text only; no image, no bridge)
as an lm-eval model, registered as ``"sparc-vlm-llm"``: ``loglikelihood`` (via ``TemplateLM``),
``loglikelihood_rolling`` (disjoint rolling windows, as lm-eval's HF model does) and
``generate_until`` (greedy). Sequences start with the tokenizer's BOS when it has one.

lm-eval's stock tasks download their datasets from the Hub, impossible offline, so
``run_language_drift`` writes a LOCAL task: a jsonl of held-out text (by default the world's
eval-split texts; or any text file) and a task YAML (``dataset_path: json``, ``data_files``
pointing at that jsonl, ``output_type: loglikelihood_rolling``, metrics word/byte perplexity and
bits per byte, like lm-eval's wikitext task), then runs it through ``lm_eval.simple_evaluate``
with ``HF_DATASETS_OFFLINE=1`` twice: the LLM with its LoRA disabled ("before", the frozen base
LLM) and enabled ("after"). A merged checkpoint (``llm/`` inside it) is compared with the base LLM
named in its ``vlm.yaml`` (or ``base_llm_path``).

When ``world_dir`` holds a world export, the same two LLMs also take the text-context probe
(``eval.text_probe``: the caption in the prompt, then the POPE / VSR question), so the summary says
whether stage two's LoRA kept the LLM's ability to answer from its context
(``text_probe_pope_acc``, ``text_probe_vsr_acc`` before / after).

lm-eval is the ``lmeval`` extra: importing this module without it raises ``MissingExtra``
(``vlm.extras``), which names the extra; ``vlm eval drift`` imports it only when run.
"""
from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from vlm.extras import require

require("lmeval", "lm_eval", "vlm eval drift (lm-eval)")  # before lm_eval's own imports, to name the extra
from lm_eval import utils  # noqa: E402
from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from eval.report import markdown_table, write_summary  # noqa: E402
from eval.text_probe import load_items, run_text_probe  # noqa: E402
from vlm.config import VLMConfig, WorldConfig, config_from_yaml_text, load_config, saved_path  # noqa: E402
from vlm.data.tokenizer import load_tokenizer  # noqa: E402
from vlm.model.llm import load_llm, load_lora  # noqa: E402
from vlm.world.generator import world_corpus  # noqa: E402

MODEL_NAME = "sparc-vlm-llm"
TASK_NAME = "sparc_world_text"
METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")
PROBE_METRICS = ("text_probe_pope_acc", "text_probe_pope_f1", "text_probe_vsr_acc")


@register_model(MODEL_NAME)
class SparcLLM(TemplateLM):
    """A causal LM (``transformers`` or peft-wrapped) + tokenizer as an lm-eval ``LM``.

    model: the LM (any module whose ``__call__(input_ids, attention_mask).logits`` is [B,T,V]);
    tokenizer: its tokenizer; max_length: context window (default: the model's
    ``max_position_embeddings``, else 512); batch_size: sequences per forward.
    Or, through lm-eval's registry: ``model_args="pretrained=DIR"`` loads a local HF causal LM.
    """

    def __init__(self, model=None, tokenizer=None, pretrained: Optional[str] = None, batch_size: int | str = 8,
                 max_length: Optional[int] = None, device: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__()
        if model is None:
            if pretrained is None:
                raise ValueError(f"{MODEL_NAME}: pass model= and tokenizer=, or pretrained=DIR")
            model = AutoModelForCausalLM.from_pretrained(str(pretrained))
            tokenizer = AutoTokenizer.from_pretrained(str(pretrained))
        if tokenizer is None:
            raise ValueError(f"{MODEL_NAME}: a tokenizer is required")
        self.model = model.eval()
        if device is not None:
            self.model.to(device)
        self.tokenizer = tokenizer
        self._batch_size = int(batch_size) if str(batch_size) != "auto" else 8
        cfg = getattr(model, "config", None)
        self._max_length = int(max_length or getattr(cfg, "max_position_embeddings", 0) or 512)

    # ---- tokenisation -------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        """End-of-text id (EOS, else PAD): generation stops there; padding uses it."""
        eos = self.tokenizer.eos_token_id
        return int(eos if eos is not None else self.tokenizer.pad_token_id)

    @property
    def prefix_token_id(self) -> int:
        """The id every scored sequence starts with: BOS when the tokenizer has one, else EOS."""
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        """Context window in tokens (longer inputs are cut on the left)."""
        return self._max_length

    @property
    def device(self) -> torch.device:
        """Where the model's parameters live."""
        return next(self.model.parameters()).device

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs: Any) -> list[int]:
        """Text -> token ids, never with specials (BOS is added once per sequence as the prefix)."""
        return list(self.tokenizer(string, add_special_tokens=False)["input_ids"])

    def tok_decode(self, tokens: Iterable[int]) -> str:
        """Token ids -> text (special tokens dropped)."""
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    # ---- scoring ------------------------------------------------------------------------------
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """Each request ((context, continuation), context_ids, continuation_ids) -> (sum of the
        continuation's log-probs, whether greedy decoding would produce it). Context ids are
        prefixed with BOS when they do not start with it; the left of an over-long sequence is cut."""
        out: list[tuple[float, bool]] = []
        reqs = list(requests)
        for start in tqdm(range(0, len(reqs), self._batch_size), disable=disable_tqdm or len(reqs) < 64,
                          desc="loglikelihood"):
            chunk = reqs[start:start + self._batch_size]
            seqs, n_cont = [], []
            for _, ctx, cont in chunk:
                ctx = list(ctx)
                if not ctx or ctx[0] != self.prefix_token_id:
                    ctx = [self.prefix_token_id] + ctx
                whole = (ctx + list(cont))[-(self._max_length + 1):]
                seqs.append(whole[:-1])  # inputs; the targets are whole[1:]
                n_cont.append(len(cont))
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), self.eot_token_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for i, s in enumerate(seqs):
                ids[i, : len(s)] = torch.tensor(s)
                mask[i, : len(s)] = 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            logp = F.log_softmax(logits.float(), dim=-1).cpu()
            for i, ((_, ctx, cont), s, n) in enumerate(zip(chunk, seqs, n_cont)):
                cont_t = torch.tensor(list(cont), dtype=torch.long)
                rows = logp[i, len(s) - n: len(s)]  # position t predicts token t + 1
                out.append((float(rows.gather(1, cont_t[:, None]).sum()), bool((rows.argmax(-1) == cont_t).all())))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each request (string,) -> total log-likelihood of the string, scored in disjoint
        windows of ``max_length`` tokens (lm-eval's ``get_rolling_token_windows``)."""
        results = []
        for (string,) in tqdm([r.args for r in requests], disable=disable_tqdm, desc="rolling"):
            windows = [((None, None),) + tuple(utils.make_disjoint_window(w)) for w in utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self._max_length, context_len=1)]
            results.append(sum(ll for ll, _ in self._loglikelihood_tokens(windows, disable_tqdm=True)))
        return results

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context, cut at the first of ``until`` (default: EOS text)."""
        out = []
        for context, gen_kwargs in tqdm([r.args for r in requests], disable=disable_tqdm, desc="generate"):
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", 64))
            ids = [self.prefix_token_id] + self.tok_encode(context)
            ids = ids[-max(1, self._max_length - max_new):]
            x = torch.tensor([ids], device=self.device)
            new: list[int] = []
            for _ in range(max_new):
                logits = self.model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1]
                tok = int(logits.argmax())
                if tok == self.eot_token_id:
                    break
                new.append(tok)
                x = torch.cat([x, torch.tensor([[tok]], device=self.device)], dim=1)[:, -self._max_length:]
                text = self.tok_decode(new)
                if any(u in text for u in until):
                    break
            text = self.tok_decode(new)
            for u in until:
                text = text.split(u)[0]
            out.append(text)
        return out


# ---- the local task -----------------------------------------------------------------------------


def write_text_task(task_dir: str | Path, texts: Iterable[str], task_name: str = TASK_NAME) -> Path:
    """Write ``task_dir/{name}.jsonl`` ({"text": ...} per line, blanks and duplicates dropped) and
    ``task_dir/{name}.yaml`` (a loglikelihood_rolling task on it). Returns the folder."""
    task_dir = Path(task_dir)
    task_dir.mkdir(parents=True, exist_ok=True)
    docs = [t.strip() for t in dict.fromkeys(texts) if t and t.strip()]
    if not docs:
        raise ValueError("no text for the language-drift task")
    data = task_dir / f"{task_name}.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    yaml = "\n".join([
        f"task: {task_name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data.resolve()))}",
        "test_split: test",
        "output_type: loglikelihood_rolling",
        'doc_to_text: ""',
        'doc_to_target: "{{text}}"',
        "metric_list:",
        *[f"  - metric: {m}" for m in METRICS],
        "metadata:",
        "  version: 1.0",
        "",
    ])
    (task_dir / f"{task_name}.yaml").write_text(yaml)
    return task_dir


def evaluate_text_task(lm: SparcLLM, task_dir: str | Path, task_name: str = TASK_NAME,
                       limit: Optional[int] = None) -> dict[str, float]:
    """Run the local task through ``lm_eval.simple_evaluate`` offline -> {metric: value}."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Imported here: ~8 s, and the datasets library they load reads the offline flags above at import.
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    res = simple_evaluate(model=lm, tasks=[task_name], task_manager=manager, limit=limit, bootstrap_iters=0,
                          log_samples=False, cache_requests=False)
    metrics = res["results"][task_name]
    return {m: float(metrics[f"{m},none"]) for m in METRICS if f"{m},none" in metrics}


def world_texts(world_dir: str | Path = "runs/world", n_samples: int = 100) -> list[str]:
    """Held-out text: the world's texts for the first ``n_samples`` eval-split samples (the world's
    LLM trains on the train split), with the WorldConfig saved in ``world_dir/world.json`` when present."""
    cfg = WorldConfig()
    meta = Path(world_dir) / "world.json"
    if meta.is_file():
        saved = json.loads(meta.read_text()).get("config", {})
        cfg = load_config(WorldConfig, None, [f"{k}={v}" for k, v in saved.items()])
    indices = range(cfg.n_train, cfg.n_train + min(n_samples, max(cfg.n_eval, 1)))
    return list(world_corpus(cfg, indices))


def _load_pair(vlm_ckpt: Path, base_llm_path: Optional[str | Path]):
    """((model, tokenizer, context manager) before, (...) after): the LLM without / with the LoRA."""
    cfg_path = vlm_ckpt / "vlm.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{vlm_ckpt} is not a stage-two checkpoint (no vlm.yaml)")
    cfg = config_from_yaml_text(VLMConfig, cfg_path.read_text())
    cfg.load_in_4bit = False
    llm_path = saved_path(vlm_ckpt, cfg.llm)
    adapter = vlm_ckpt / "adapter"
    if adapter.is_dir():
        base_path = Path(base_llm_path) if base_llm_path is not None else llm_path
        tokenizer = load_tokenizer(base_path)
        model = load_lora(load_llm(cfg, base_path), adapter)
        return (model, tokenizer, model.disable_adapter), (model, tokenizer, nullcontext)
    if base_llm_path is None:
        raise ValueError(f"{vlm_ckpt} has no adapter/ (a merged checkpoint): pass base_llm_path, the LLM it started from")
    base = load_llm(cfg, base_llm_path)
    merged = load_llm(cfg, llm_path)
    return (base, load_tokenizer(base_llm_path), nullcontext), (merged, load_tokenizer(llm_path), nullcontext)


def run_language_drift(vlm_ckpt: str | Path, out_dir: str | Path, base_llm_path: Optional[str | Path] = None,
                       limit: Optional[int] = None, texts: Optional[list[str]] = None,
                       world_dir: str | Path = "runs/world", batch_size: int = 8) -> dict[str, Any]:
    """Perplexity of held-out text under the frozen base LLM ("before") and the LLM with the
    stage-two LoRA ("after"), through lm-eval. ``texts`` default: ``world_texts(world_dir)``;
    ``limit``: at most this many documents (and probe questions per POPE split and of VSR). Writes
    ``out_dir/{summary.json, summary.md}``, the task files under ``out_dir/task`` and, with a world
    export in ``world_dir``, the probe's ``out_dir/{before,after}/text_probe/``. Returns {"before":
    {metric: v}, "after": {...}, "delta": {...}}, the metrics ``METRICS`` and ``PROBE_METRICS``.
    """
    out_dir = Path(out_dir)
    docs = list(dict.fromkeys(texts if texts is not None else world_texts(world_dir)))
    task_dir = write_text_task(out_dir / "task", docs)
    (before_model, before_tok, before_ctx), (after_model, after_tok, after_ctx) = _load_pair(Path(vlm_ckpt), base_llm_path)
    probe_items = load_items(world_dir, limit) if (Path(world_dir) / "world.json").is_file() else None
    result: dict[str, Any] = {}
    with torch.inference_mode():
        for name, model, tok, ctx in (("before", before_model, before_tok, before_ctx),
                                      ("after", after_model, after_tok, after_ctx)):
            with ctx():
                result[name] = evaluate_text_task(SparcLLM(model, tok, batch_size=batch_size), task_dir, limit=limit)
                if probe_items is not None:
                    probe = run_text_probe(model, tok, probe_items, out_dir / name, batch_size=batch_size)
                    result[name].update({k: probe[k] for k in PROBE_METRICS if k in probe})
    result["delta"] = {m: result["after"][m] - result["before"][m] for m in result["before"] if m in result["after"]}
    result["n_docs"] = min(len(docs), limit) if limit is not None else len(docs)
    result["task"] = TASK_NAME
    rows = [[m, result["before"].get(m), result["after"].get(m), result["delta"].get(m)]
            for m in METRICS + PROBE_METRICS if m in result["before"]]
    write_summary(out_dir, result, "# Language drift (lm-eval, local task; text-context probe)\n\n"
                  + markdown_table(["metric", "base LLM", "with LoRA", "delta"], rows) + "\n")
    return result
