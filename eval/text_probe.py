"""Text-context probe: can the LLM answer POPE / VSR questions from a caption, with no image at all?

For each eval-split question of the world's POPE files (``pope/{random,popular,adversarial}.jsonl``)
and VSR file (``vsr/test.jsonl``), the image is replaced by its caption: the prompt is stage two's,
built by the same ``VLMProcessor`` (plain format, no image tokens), with the caption where the image
tokens go::

    <s>{caption}\\n{pope_prompt(question)}\\n      -> "Yes" | "No"
    <s>{long caption}\\n{vsr_prompt(statement)}\\n -> "True" | "False"

POPE gets the image's short caption (it names every object), VSR the long caption (the only one
stating relations; it states one relation per pair, so some VSR statements are not decided by it:
``text_probe_vsr_decided_acc`` is the accuracy on those it decides, the statements
``vlm.world.mix.context_statements`` draws from it, as the LM's documents do).
Answers are read as the harness reads them: "score" compares the summed log-probabilities of the
choices (``eval.pope`` / ``eval.vsr`` score mode), "generate" parses greedy output with
``parse_yes_no`` / ``parse_true_false``; the metrics are ``eval.pope.pope_summary`` and
``eval.vsr.vsr_metrics``. A model that passes reads its context; stage two then has to put the
image where the caption was.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from transformers import AutoModelForCausalLM

from eval.io import batched
from eval.parsing import parse_true_false, parse_yes_no
from eval.pope import SPLITS, pope_summary
from eval.report import markdown_table, write_task_outputs
from eval.sources import first, resolve_sources
from eval.vsr import vsr_metrics
from vlm.config import WorldConfig, config_from_yaml_text
from vlm.data.formats import read_pope, read_vsr
from vlm.data.prompts import FALSE, NO, TRUE, YES, pope_prompt, vsr_prompt
from vlm.data.tokenizer import load_tokenizer
from vlm.files import loading_weights, read_json
from vlm.model.processor import IGNORE_INDEX, VLMProcessor
from vlm.world.generator import generate_sample
from vlm.world.mix import context_statements

TASK = "text_probe"
MAX_NEW_TOKENS = 8
MODES = ("score", "generate")


@dataclass
class ProbeItem:
    """One probe question: ``prompt`` (context + question, stage two's human turn text), ``gold``
    (True = yes / true), ``split`` (a POPE split or "vsr"), ``relation`` (VSR; "" for POPE), ``image``,
    ``decided`` (whether the context decides the answer; POPE: always)."""

    prompt: str
    gold: bool
    split: str
    relation: str
    image: str
    decided: bool = True


def world_config(world_dir: str | Path) -> WorldConfig:
    """The WorldConfig recorded in ``world_dir/world.json`` (FileNotFoundError naming ``vlm world`` when absent)."""
    meta = Path(world_dir) / "world.json"
    if not meta.is_file():
        raise FileNotFoundError(f"no world export in {world_dir} (no world.json): run `vlm world --out {world_dir}`")
    return config_from_yaml_text(WorldConfig, json.dumps(read_json(meta, "world export metadata")["config"]))


def load_items(world_dir: str | Path, limit: Optional[int] = None) -> dict[str, list[ProbeItem]]:
    """The probe's questions: {POPE split: items, "vsr": items}, the first ``limit`` of each, with
    each image's captions regenerated from the world's config (images ``{index:08d}.jpg``)."""
    cfg = world_config(world_dir)
    src = resolve_sources(None, world_dir)
    pope = {s: first(read_pope(src.file(f"pope_{s}")), limit) for s in SPLITS}
    vsr = first(read_vsr(src.file("vsr")), limit)
    images = {q.image for qs in pope.values() for q in qs} | {it.image for it in vsr}
    samples = {name: generate_sample(int(Path(name).stem), cfg.seed, cfg) for name in sorted(images)}
    out = {s: [ProbeItem(f"{samples[q.image].captions['short']}\n{pope_prompt(q.text)}", q.label == "yes", s, "",
                         q.image) for q in qs] for s, qs in pope.items()}
    decided = {name: {st.text for st in context_statements(s, cfg.image_size)} for name, s in samples.items()}
    out["vsr"] = [ProbeItem(f"{samples[it.image].long_caption}\n{vsr_prompt(it.caption)}", bool(it.label), "vsr",
                            it.relation, it.image, it.caption in decided[it.image]) for it in vsr]
    return out


def text_processor(tokenizer, max_len: int = 1024) -> VLMProcessor:
    """Stage two's processor without an image: the prompts of ``score_choices`` / ``generate_answers``."""
    return VLMProcessor(tokenizer, None, num_image_tokens=0, max_len=max_len)


@torch.no_grad()
def score_choices(lm, processor: VLMProcessor, prompts: Sequence[str], choices: Sequence[str]) -> torch.Tensor:
    """Summed log-probability [B, C] of each choice's tokens right after each prompt (as
    ``VisionLanguageModel.score``, without the image). ``lm``: a causal LM, logits [B, T, V]."""
    choice_ids = [processor.encode_answer(c) for c in choices]
    seqs, labels = [], []
    for prompt in prompts:
        p = processor.encode_prompt(prompt)
        for c in choice_ids:
            seqs.append(p + c)
            labels.append([IGNORE_INDEX] * len(p) + c)
    batch = processor.pad(seqs, labels, side="right")
    device = next(lm.parameters()).device
    logits = lm(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    targets = batch["labels"][:, 1:].to(device)
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(2, targets.clamp(min=0).unsqueeze(2)).squeeze(2) * (targets != IGNORE_INDEX)
    return picked.sum(1).view(len(prompts), len(choices)).cpu()


@torch.no_grad()
def generate_answers(lm, processor: VLMProcessor, prompts: Sequence[str], max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy answers (text, special tokens dropped) to ``prompts`` (left-padded batch)."""
    batch = processor.pad([processor.encode_prompt(p) for p in prompts], side="left")
    device = next(lm.parameters()).device
    tok = processor.tokenizer
    out = lm.generate(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                      max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=processor.pad_token_id,
                      eos_token_id=tok.eos_token_id)
    return tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def answer_items(lm, processor: VLMProcessor, items: Sequence[ProbeItem], mode: str) -> list[dict[str, Any]]:
    """One record per item: the prompt, the model's output, ``answer`` (True / False / None when
    unreadable), ``gold``, ``correct`` (and ``margin`` = logP(yes|true) - logP(no|false) in score mode)."""
    is_pope = items[0].split != "vsr"
    choices = [YES, NO] if is_pope else [TRUE, FALSE]
    prompts = [it.prompt for it in items]
    if mode == "score":
        logp = score_choices(lm, processor, prompts, choices).tolist()
        outputs = [{"margin": a - b} for a, b in logp]
        answers = [o["margin"] > 0 for o in outputs]
    else:
        texts = generate_answers(lm, processor, prompts)
        outputs = [{"text": t} for t in texts]
        answers = [parse_yes_no(t) == "yes" if is_pope else parse_true_false(t) for t in texts]
    return [{"split": it.split, "image": it.image, "relation": it.relation, "decided": it.decided, "prompt": it.prompt, **o,
             "answer": a, "gold": it.gold, "correct": a is not None and a == it.gold}
            for it, o, a in zip(items, outputs, answers)]


def probe_metrics(records: dict[str, list[dict[str, Any]]], mode: str) -> dict[str, Any]:
    """{split: records} -> the summary: ``text_probe_pope_acc`` (accuracy averaged over the POPE
    splits), ``text_probe_pope_f1``, ``text_probe_pope_yes_ratio``, ``text_probe_vsr_acc``, and the
    full ``pope`` / ``vsr`` metrics."""
    margin = (lambda rs: [r["margin"] for r in rs]) if mode == "score" else (lambda rs: None)
    pope = pope_summary({s: ([bool(r["answer"]) for r in records[s]], [r["gold"] for r in records[s]],
                             margin(records[s])) for s in SPLITS if records.get(s)})
    vsr = records.get("vsr") or []
    out: dict[str, Any] = {"mode": mode, "pope": pope}
    if "accuracy_avg" in pope:
        out["text_probe_pope_acc"] = pope["accuracy_avg"]
        out["text_probe_pope_f1"] = pope["f1_avg"]
        out["text_probe_pope_yes_ratio"] = sum(pope[s]["yes_ratio"] for s in SPLITS if s in pope) / len(
            [s for s in SPLITS if s in pope])
    if vsr:
        out["vsr"] = vsr_metrics([r["answer"] for r in vsr], [r["gold"] for r in vsr], [r["relation"] for r in vsr],
                                 margin(vsr))
        out["text_probe_vsr_acc"] = out["vsr"]["accuracy"]
        decided = [r["correct"] for r in vsr if r.get("decided", True)]
        out["text_probe_vsr_decided_n"] = len(decided)
        if decided:
            out["text_probe_vsr_decided_acc"] = sum(decided) / len(decided)
    return out


def run_text_probe(lm, tokenizer, items: dict[str, list[ProbeItem]], out_dir: Optional[str | Path] = None,
                   mode: str = "score", batch_size: int = 32) -> dict[str, Any]:
    """Answer every probe item with ``lm`` (a causal LM; ``tokenizer`` its tokenizer) and return
    ``probe_metrics``; with ``out_dir``, also write ``out_dir/text_probe/{predictions.jsonl,
    summary.json, summary.md}``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    processor = text_processor(tokenizer)
    was_training = lm.training
    lm.eval()
    records = {split: [r for chunk in batched(its, batch_size) for r in answer_items(lm, processor, chunk, mode)]
               for split, its in items.items() if its}
    lm.train(was_training)
    summary = probe_metrics(records, mode)
    if out_dir is not None:
        rows = [[k, summary[k]] for k in ("text_probe_pope_acc", "text_probe_pope_f1", "text_probe_pope_yes_ratio",
                                          "text_probe_vsr_acc", "text_probe_vsr_decided_acc",
                                          "text_probe_vsr_decided_n") if k in summary]
        md = f"# {TASK} ({mode}): the caption instead of the image\n\n" + markdown_table(["metric", "value"], rows) + "\n"
        write_task_outputs(out_dir, TASK, summary, [r for rs in records.values() for r in rs], md)
    return summary


def probe_llm(llm_dir: str | Path, world_dir: str | Path, out_dir: Optional[str | Path] = None,
              limit: Optional[int] = None, mode: str = "score", batch_size: int = 32) -> dict[str, Any]:
    """``run_text_probe`` on a saved causal LM (``AutoModelForCausalLM`` + its tokenizer from
    ``llm_dir``, e.g. ``runs/lm/final``) with the world in ``world_dir`` (first ``limit`` questions
    per POPE split and of VSR)."""
    with loading_weights(llm_dir, "LLM"):
        lm = AutoModelForCausalLM.from_pretrained(str(llm_dir), local_files_only=True, use_safetensors=True)
    return run_text_probe(lm, load_tokenizer(llm_dir), load_items(world_dir, limit), out_dir, mode, batch_size)
