"""Where a VLM eval's files live: the world export or real files, and the checks every task's loader runs.

The world (``data=None``): the export layout under ``world_dir`` (``vlm world``), ``WORLD_LAYOUT``.
Real data (``data=DIR``): ``REAL_LAYOUT`` under DIR; ``DIR/paths.yaml`` (or ``data=some.yaml``
directly) may map any of its keys to other paths, relative to the yaml's folder (see
``eval.harness``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

WORLD_LAYOUT = {
    "captions": "coco/captions_val.json",
    "instances": "coco/instances_val.json",
    "images": "images",
    "pope_random": "pope/random.jsonl",
    "pope_popular": "pope/popular.jsonl",
    "pope_adversarial": "pope/adversarial.jsonl",
    "pope_images": "images",
    "refcoco_refs": "refcoco/refs.json",
    "refcoco_instances": "refcoco/instances.json",
    "refcoco_images": "images",
    "vsr": "vsr/test.jsonl",
    "vsr_images": "images",
}
REAL_LAYOUT = {
    "captions": "coco/captions_val2014.json",
    "instances": "coco/instances_val2014.json",
    "images": "coco/val2014",
    "pope_random": "pope/random.jsonl",
    "pope_popular": "pope/popular.jsonl",
    "pope_adversarial": "pope/adversarial.jsonl",
    "pope_images": "coco/val2014",
    "refcoco_refs": "refcoco/refs.json",
    "refcoco_instances": "refcoco/instances.json",
    "refcoco_images": "coco/train2014",
    "vsr": "vsr/test.jsonl",
    "vsr_images": "vsr/images",
}
MAPPING_FILES = ("paths.yaml", "paths.yml", "paths.json")


@dataclass
class EvalSources:
    """Resolved file locations (key -> Path) and whether they are the world's (``kind``)."""

    kind: str  # "world" | "real"
    root: Path
    paths: dict[str, Path] = field(default_factory=dict)

    def file(self, key: str) -> Path:
        """The path of layout key ``key``; FileNotFoundError naming the key when it is no file."""
        path = self.paths[key]
        if not path.is_file():
            raise FileNotFoundError(f"{key}: file not found: {path}")
        return path

    def folder(self, key: str) -> Path:
        """The path of layout key ``key``; FileNotFoundError naming the key when it is no folder."""
        path = self.paths[key]
        if not path.is_dir():
            raise FileNotFoundError(f"{key}: folder not found: {path}")
        return path


def _mapping(data: Path) -> tuple[Path, Optional[Path]]:
    """(root folder, the yaml/json mapping file or None) of a ``--data`` argument."""
    if data.is_file() and data.suffix in (".yaml", ".yml", ".json"):
        return data.parent, data
    if data.is_dir():
        return data, next((data / n for n in MAPPING_FILES if (data / n).is_file()), None)
    raise FileNotFoundError(f"--data {data}: neither a folder nor a yaml/json mapping file")


def _overrides(mapping_file: Path) -> dict[str, Any]:
    """The key -> path entries of a mapping file (every key one of ``REAL_LAYOUT``)."""
    loaded = OmegaConf.to_container(OmegaConf.load(mapping_file))
    if not isinstance(loaded, dict):
        raise ValueError(f"{mapping_file}: should map keys to paths, got {type(loaded).__name__}")
    unknown = sorted(set(loaded) - set(REAL_LAYOUT))
    if unknown:
        raise ValueError(f"{mapping_file}: unknown key(s) {unknown}; valid: {sorted(REAL_LAYOUT)}")
    return loaded


def resolve_sources(data: Optional[str | Path], world_dir: str | Path) -> EvalSources:
    """Where each file lives: the world export under ``world_dir`` (data None) or real files under
    ``data`` (a folder, optionally with paths.yaml, or a yaml mapping keys to paths)."""
    if data is None:
        root = Path(world_dir)
        return EvalSources("world", root, {k: root / v for k, v in WORLD_LAYOUT.items()})
    root, mapping_file = _mapping(Path(data))
    overrides = _overrides(mapping_file) if mapping_file is not None else {}
    paths = {k: (root / str(overrides.get(k, v))) for k, v in REAL_LAYOUT.items()}
    return EvalSources("real", root, paths)


def check_images(paths: list[Path], task: str) -> None:
    """FileNotFoundError (with the count and a few names) when any of ``paths`` is no file."""
    missing = [str(p) for p in dict.fromkeys(paths) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{task}: {len(missing)} image(s) missing, e.g. {missing[:3]}")


def first(items: list, limit: Optional[int]) -> list:
    """The first ``limit`` items (all of them when ``limit`` is None)."""
    return items[: limit if limit is not None else None]
