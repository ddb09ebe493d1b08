"""The VLM eval task registry: task name -> the module that implements it.

Every task module exposes

    TASK            its name (the registry key and its output folder ``out_dir/<TASK>/``)
    load(src, limit) -> data          read and check its files (``eval.sources.EvalSources``)
    run(model, data, out_dir, limit=None, batch_size=16, options=None) -> summary dict
    HEADLINE        summary keys of the harness's combined summary.md
    REPORT_COLUMNS  summary keys of the demo / ablation tables

A new task is one module and one line here (``vlm.config.VLM_TASK_NAMES`` validates configs
without importing eval and must list the same names; a test checks that).
"""
from __future__ import annotations

from types import ModuleType

from eval import captioning, chair, grounding_attention, pope, refcoco, vsr

VLM_TASKS: dict[str, ModuleType] = {
    "caption": captioning,
    "chair": chair,
    "grounding_attention": grounding_attention,
    "pope": pope,
    "refcoco": refcoco,
    "vsr": vsr,
}

# The demo / ablation table columns: each task's REPORT_COLUMNS, prefixed by the task name.
VLM_REPORT_COLUMNS = [f"{name}/{key}" for name, module in VLM_TASKS.items() for key in module.REPORT_COLUMNS]
