"""Language drift: does stage two's LoRA hurt the LLM as a language model? Measured with lm-eval's
own ``HFLM`` (``lm_eval.models.huggingface``), text only (no image, no bridge).

"before" is the base LLM, "after" the LLM stage two trained: ``HFLM(pretrained=BASE, peft=CKPT/adapter)``
for a LoRA checkpoint (lm-eval loads the adapter itself), ``HFLM(pretrained=CKPT/llm)`` for a merged
one, whose base LLM is not in its ``vlm.yaml`` any more and must be named (``base_llm_path``,
``vlm eval drift --base-llm``).

lm-eval's stock tasks download their datasets from the Hub, impossible offline, so the default
task is LOCAL: ``write_text_task`` writes a jsonl of held-out text (by default the world's eval-split
texts; or any text) and a task YAML (``dataset_path: json``, ``output_type: loglikelihood_rolling``,
metrics word/byte perplexity and bits per byte, like lm-eval's wikitext task). ``tasks`` may name
any other lm-eval task whose data is available locally (``--tasks``); every metric a task reports
goes into the summary. Runs go through ``lm_eval.simple_evaluate`` with ``HF_DATASETS_OFFLINE=1``.

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
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch
from vlm.extras import require

require("lmeval", "lm_eval", "vlm eval drift (lm-eval)")  # before lm_eval's own imports, to name the extra
from lm_eval.models.huggingface import HFLM  # noqa: E402

from eval.report import markdown_table, write_summary  # noqa: E402
from eval.text_probe import load_items, run_text_probe  # noqa: E402
from vlm.config import VLMConfig, WorldConfig, config_from_yaml_text, load_config, saved_path  # noqa: E402
from vlm.files import atomic_write_text, read_json  # noqa: E402
from vlm.world.generator import world_corpus  # noqa: E402

TASK_NAME = "sparc_world_text"
METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")
PROBE_METRICS = ("text_probe_pope_acc", "text_probe_pope_f1", "text_probe_vsr_acc")


def write_text_task(task_dir: str | Path, texts: Iterable[str], task_name: str = TASK_NAME) -> Path:
    """Write ``task_dir/{name}.jsonl`` ({"text": ...} per line, blanks and duplicates dropped) and
    ``task_dir/{name}.yaml`` (a loglikelihood_rolling task on it). Returns the folder."""
    task_dir = Path(task_dir)
    task_dir.mkdir(parents=True, exist_ok=True)
    docs = [t.strip() for t in dict.fromkeys(texts) if t and t.strip()]
    if not docs:
        raise ValueError("no text for the language-drift task")
    data = task_dir / f"{task_name}.jsonl"
    atomic_write_text(data, "".join(json.dumps({"text": t}) + "\n" for t in docs))
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
    atomic_write_text(task_dir / f"{task_name}.yaml", yaml)
    return task_dir


def evaluate_tasks(lm, task_dir: str | Path, tasks: Sequence[str] = (TASK_NAME,),
                   limit: Optional[int] = None) -> dict[str, float]:
    """Run ``tasks`` (the local task in ``task_dir`` and/or lm-eval's own) through
    ``lm_eval.simple_evaluate`` offline -> {metric: value}, metrics of other tasks than the local
    one prefixed "task/"."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Imported here: ~8 s, and the datasets library they load reads the offline flags above at import.
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir), include_defaults=any(t != TASK_NAME for t in tasks))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"--tasks: unknown lm-eval task(s) {unknown}; the local one is {TASK_NAME}")
    res = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, bootstrap_iters=0,
                          log_samples=False, cache_requests=False)
    out: dict[str, float] = {}
    for task, metrics in res["results"].items():
        for key, value in metrics.items():  # "metric,filter" keys; "alias", "sample_len" are bookkeeping
            name, comma, _ = key.partition(",")
            if comma and isinstance(value, (int, float)) and "stderr" not in name:
                out[name if task == TASK_NAME else f"{task}/{name}"] = float(value)
    return out


def world_texts(world_dir: str | Path = "runs/world", n_samples: int = 100) -> list[str]:
    """Held-out text: the world's texts for the first ``n_samples`` eval-split samples (the world's
    LLM trains on the train split), with the WorldConfig saved in ``world_dir/world.json`` when present."""
    cfg = WorldConfig()
    meta = Path(world_dir) / "world.json"
    if meta.is_file():
        saved = read_json(meta, "world export metadata").get("config", {})
        cfg = load_config(WorldConfig, None, [f"{k}={v}" for k, v in saved.items()])
    indices = range(cfg.n_train, cfg.n_train + min(n_samples, max(cfg.n_eval, 1)))
    return list(world_corpus(cfg, indices))


def drift_models(vlm_ckpt: Path, base_llm_path: Optional[str | Path]) -> tuple[dict, dict]:
    """The ``HFLM`` arguments of the LLM before and after stage two (see the module docstring)."""
    cfg_path = vlm_ckpt / "vlm.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{vlm_ckpt} is not a stage-two checkpoint (no vlm.yaml)")
    cfg = config_from_yaml_text(VLMConfig, cfg_path.read_text())
    llm_path = saved_path(vlm_ckpt, cfg.llm)
    adapter = vlm_ckpt / "adapter"
    if adapter.is_dir():
        base = Path(base_llm_path) if base_llm_path is not None else llm_path
        return {"pretrained": str(base)}, {"pretrained": str(base), "peft": str(adapter)}
    if base_llm_path is None:
        raise ValueError(f"{vlm_ckpt} has no adapter/ (a merged checkpoint): name the LLM it started from with "
                         "--base-llm DIR (base_llm_path)")
    return {"pretrained": str(base_llm_path)}, {"pretrained": str(llm_path)}


def hf_lm(args: dict, batch_size: int) -> HFLM:
    """lm-eval's ``HFLM`` on a local LLM (and adapter), fp32, on CUDA when there is one."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return HFLM(**args, batch_size=batch_size, device=device, dtype="float32")


def run_language_drift(vlm_ckpt: str | Path, out_dir: str | Path, base_llm_path: Optional[str | Path] = None,
                       limit: Optional[int] = None, texts: Optional[list[str]] = None,
                       world_dir: str | Path = "runs/world", batch_size: int = 8,
                       tasks: Sequence[str] = (TASK_NAME,)) -> dict[str, Any]:
    """lm-eval ``tasks`` (default: perplexity of held-out text, the local task) under the base LLM
    ("before") and the stage-two LLM ("after"), both through ``HFLM``. ``texts`` default:
    ``world_texts(world_dir)``; ``limit``: at most this many documents (and probe questions per POPE
    split and of VSR). Writes ``out_dir/{summary.json, summary.md}``, the local task under
    ``out_dir/task`` and, with a world export in ``world_dir``, the probe's
    ``out_dir/{before,after}/text_probe/``. Returns {"before": {metric: v}, "after": {...}, "delta": {...}}.
    """
    out_dir = Path(out_dir)
    before_args, after_args = drift_models(Path(vlm_ckpt), base_llm_path)  # fails before any work
    docs = list(dict.fromkeys(texts if texts is not None else world_texts(world_dir)))
    task_dir = write_text_task(out_dir / "task", docs)
    probe_items = load_items(world_dir, limit) if (Path(world_dir) / "world.json").is_file() else None
    result: dict[str, Any] = {}
    with torch.inference_mode():
        for name, args in (("before", before_args), ("after", after_args)):
            lm = hf_lm(args, batch_size)
            result[name] = evaluate_tasks(lm, task_dir, tasks, limit=limit)
            if probe_items is not None:
                probe = run_text_probe(lm.model, lm.tokenizer, probe_items, out_dir / name, batch_size=batch_size)
                result[name].update({k: probe[k] for k in PROBE_METRICS if k in probe})
            result[f"{name}_model"] = args
    result["delta"] = {m: result["after"][m] - result["before"][m] for m in result["before"] if m in result["after"]}
    result["n_docs"] = min(len(docs), limit) if limit is not None else len(docs)
    result["tasks"] = list(tasks)
    rows = [[m, result["before"].get(m), result["after"].get(m), result["delta"].get(m)] for m in result["before"]]
    write_summary(out_dir, result, "# Language drift (lm-eval HFLM; text-context probe)\n\n"
                  + markdown_table(["metric", "base LLM", "after stage two", "delta"], rows) + "\n")
    return result
