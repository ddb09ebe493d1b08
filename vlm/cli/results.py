"""The demo's headline numbers: ``DIR/results.json`` (one flat object) and the report's chance table.

Every headline key is read from one *source* (a flat metrics row, ``vlm.cli.pipeline.flatten_metrics``
of one eval summary) at one path; ``RESULT_KEYS`` is the whole wiring:

    source      what ``vlm.cli.demo`` puts there
    encoder     the encoder eval of the headline tower (``stage1/<stage2_tower>``)
    vlm         the VLM eval of the headline model (that tower + the headline bridge)
    vlm_blank   the same model with every image blanked (``run_vlm_eval(blank_image=True)``)
    oracle      the VLM with the oracle tower (``vlm.model.oracle``), same stage-two recipe
    lm          the frozen LLM's text-context probe (``eval.text_probe``, ``demo.lm_rows``)

A key whose source or path is absent is written as null and listed as "not measured" in the
report; wiring a new producer is one entry here (and, for a new source, one row in the demo).
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional

import numpy as np

from eval.report import markdown_table
from vlm.config import WorldConfig
from vlm.world.generator import generate_sample
from vlm.world.vocab import COLORS, SHAPES

# key -> (source, path in that source's flat metrics)
RESULT_KEYS: dict[str, tuple[str, str]] = {
    "zero_shot_top1": ("encoder", "zero_shot/top1"),
    "zero_shot_single_top1": ("encoder", "zero_shot_single_top1"),
    "zero_shot_single_color_top1": ("encoder", "zero_shot_single_color_top1"),
    "pointing_acc": ("encoder", "pointing_acc"),
    "patch_miou": ("encoder", "segmentation/zero_shot_miou"),
    "cider": ("vlm", "caption/CIDEr"),
    "chair_i": ("vlm", "chair/chair_i"),
    "chair_s": ("vlm", "chair/chair_s"),
    "pope_acc": ("vlm", "pope/accuracy_avg"),
    "pope_f1": ("vlm", "pope/f1_avg"),
    "pope_yes_ratio": ("vlm", "pope/yes_ratio_avg"),
    "refcoco_acc50": ("vlm", "refcoco/acc"),
    "vsr_acc": ("vlm", "vsr/accuracy"),
    "pope_acc_blank": ("vlm_blank", "pope/accuracy_avg"),
    "vsr_acc_blank": ("vlm_blank", "vsr/accuracy"),
    "refcoco_acc50_blank": ("vlm_blank", "refcoco/acc"),
    "oracle_pope_acc": ("oracle", "pope/accuracy_avg"),
    "oracle_vsr_acc": ("oracle", "vsr/accuracy"),
    "text_probe_pope_acc": ("lm", "text_probe_pope_acc"),
    "text_probe_vsr_acc": ("lm", "text_probe_vsr_acc"),
    "text_probe_vsr_decided_acc": ("lm", "text_probe_vsr_decided_acc"),
}
ENCODER_KEYS = [k for k, (src, _) in RESULT_KEYS.items() if src == "encoder"]
VLM_KEYS = [k for k, (src, _) in RESULT_KEYS.items() if src == "vlm"]

# key -> (chance level or None, how it is computed); "pointing" and "vsr" are measured on the data.
CHANCE: dict[str, tuple[Optional[float], str]] = {
    "zero_shot_top1": (1 / len(SHAPES), f"a uniform guess among the {len(SHAPES)} shapes"),
    "zero_shot_single_top1": (1 / len(SHAPES), f"a uniform guess among the {len(SHAPES)} shapes"),
    "zero_shot_single_color_top1": (1 / len(COLORS), f"a uniform guess among the {len(COLORS)} colours"),
    "pointing_acc": (None, "the mean fraction of the patch grid whose centres lie inside the named object(s)"),
    "pope_acc": (0.5, "balanced yes/no questions: a coin, always-yes or always-no"),
    "pope_f1": (2 / 3, "always answering yes (precision 0.5, recall 1)"),
    "pope_yes_ratio": (0.5, "the share of yes labels (an unbiased model's ratio)"),
    "refcoco_acc50": (0.0, "~0: a box that ignores the image (any fixed box) reaches IoU >= 0.5 with a "
                           "16-40%-side object almost never"),
    "vsr_acc": (0.5, "the majority-label rate of the statements evaluated"),
    "oracle_pope_acc": (0.5, "as pope_acc"),
    "oracle_vsr_acc": (0.5, "as vsr_acc"),
    "text_probe_pope_acc": (0.5, "as pope_acc"),
}
for _key in ("pope_acc", "vsr_acc", "refcoco_acc50"):
    CHANCE[f"{_key}_blank"] = CHANCE[_key]


def pick(rows: Mapping[str, Mapping[str, float]], keys: Optional[list[str]] = None) -> dict[str, Optional[float]]:
    """{key: value or None} for ``keys`` (default: all of ``RESULT_KEYS``) from the source rows."""
    out: dict[str, Optional[float]] = {}
    for key in keys or list(RESULT_KEYS):
        source, path = RESULT_KEYS[key]
        value = rows.get(source, {}).get(path)
        out[key] = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
    return out


def headline_results(rows: Mapping[str, Mapping[str, float]], by_objective: Mapping[str, Mapping[str, float]],
                     by_bridge: Mapping[str, Mapping[str, float]], wall_s: float,
                     stage_s: Mapping[str, float]) -> dict[str, Any]:
    """The flat ``results.json`` object: every ``RESULT_KEYS`` key (null when not measured), ``wall_s``,
    ``by_objective`` {objective: encoder keys}, ``by_bridge`` {bridge: VLM keys}, ``stage_s`` {stage: s}."""
    out: dict[str, Any] = pick(rows)
    out["wall_s"] = float(wall_s)
    out["by_objective"] = {obj: pick({"encoder": r}, ENCODER_KEYS) for obj, r in by_objective.items()}
    out["by_bridge"] = {b: pick({"vlm": r}, VLM_KEYS) for b, r in by_bridge.items()}
    out["stage_s"] = {k: float(v) for k, v in stage_s.items()}
    return out


def chance_levels(measured: Mapping[str, Optional[float]]) -> dict[str, Optional[float]]:
    """``CHANCE``'s levels with the data-dependent ones (``measured``: pointing_acc, vsr_acc) filled."""
    levels = {k: v for k, (v, _) in CHANCE.items()}
    for key, value in measured.items():
        levels[key] = value
    if "vsr_acc" in measured:
        levels["vsr_acc_blank"] = levels["oracle_vsr_acc"] = measured["vsr_acc"]
    return levels


def results_markdown(results: Mapping[str, Any], levels: Mapping[str, Optional[float]]) -> str:
    """The report's headline table (key, value, chance, how chance is computed) and the keys not measured."""
    rows = [[k, results[k] if results[k] is not None else "not measured", levels.get(k),
             CHANCE.get(k, (None, ""))[1]] for k in RESULT_KEYS]
    missing = [k for k in RESULT_KEYS if results[k] is None]
    lines = [markdown_table(["metric", "value", "chance", "chance is"], rows, digits=3), ""]
    if missing:
        lines += [f"Not measured (no producer in this run, null in results.json): {', '.join(missing)}.", ""]
    return "\n".join(lines)


def pointing_chance(world: WorldConfig, indices: Iterable[int], patch: int) -> float:
    """Pointing's chance rate: over every (image, shape present), the fraction of patch centres (a
    ``patch``-px grid) inside that shape's pixels, averaged (a uniformly random patch is a hit this often)."""
    centres = np.arange(patch // 2, world.image_size, patch)
    fractions = []
    for index in indices:
        mask = generate_sample(index, world.seed, world).class_mask
        grid = mask[np.ix_(centres, centres)]
        fractions += [float((grid == c).mean()) for c in np.unique(mask[mask > 0])]
    return float(np.mean(fractions)) if fractions else math.nan


def majority_rate(labels: list[int]) -> float:
    """The share of the more frequent of two labels (0/1): what always answering it scores."""
    if not labels:
        return math.nan
    ones = sum(1 for y in labels if y) / len(labels)
    return max(ones, 1 - ones)
