"""Atomic, resumable training checkpoints.

Layout of one checkpoint, ``out_dir/checkpoints/step_XXXXXXXX/``::

    model.safetensors      trainable parameters (+ persistent buffers of modules that own them)
    optimizer.pt           optimiser and LR-scheduler state (tensors and plain containers only)
    sharded/               under FSDP instead of the above but the scheduler: every rank's shards
                           of the trainable tensors and their optimiser state (torch.distributed.checkpoint)
    rng_rank{r}.pt         python / numpy / torch CPU / torch CUDA RNG states of rank r
    meta.json              step, micro-batches consumed, world size, loss; written LAST

Everything is written into ``checkpoints/.tmp-step_XXXXXXXX`` and fsynced; ``meta.json`` goes in
last and the directory is then renamed (``os.replace``) to its final name. A checkpoint is
complete exactly when ``step_XXXXXXXX/meta.json`` exists, so a crash at any point leaves either the
previous checkpoints or a ``.tmp-*`` directory that every reader ignores.

Nothing here unpickles arbitrary objects: ``.pt`` files are read with ``torch.load(weights_only=True)``.
A file that cannot be read (truncated, not the format, a hostile pickle) raises
``DamagedCheckpointError`` naming it; ``load_latest_good`` then falls back to the previous checkpoint.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from vlm.files import VlmError, atomic_write_text, fsync_path, naming_disk_full

CKPT_RE = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = ".tmp-"
META = "meta.json"
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.pt"
SHARDED_DIR = "sharded"


class CheckpointError(VlmError, RuntimeError):
    """A checkpoint is missing, incomplete, or does not match the model being resumed."""


class DamagedCheckpointError(CheckpointError):
    """A file of a checkpoint cannot be read (truncated, wrong format, refused pickle); names the file."""


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint on disk: its directory and its ``meta.json``."""

    path: Path
    step: int
    meta: dict


def ckpt_name(step: int) -> str:
    """Directory name of the checkpoint after ``step`` optimiser steps: ``step_00000042``."""
    return f"step_{step:08d}"


# ----------------------------------------------------------------------------------------------
# What gets saved
# ----------------------------------------------------------------------------------------------


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of parameters with ``requires_grad`` plus persistent buffers of the modules
    that own such parameters (e.g. BatchNorm running stats). Tensors are detached CPU clones, so
    shared storage cannot trip safetensors."""
    out: dict[str, torch.Tensor] = {}
    for mod_name, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        prefix = f"{mod_name}." if mod_name else ""
        for n, p in own:
            out[prefix + n] = p.detach().to("cpu", copy=True).contiguous()
        non_persistent = getattr(module, "_non_persistent_buffers_set", set())
        for n, b in module.named_buffers(recurse=False):
            if b is not None and n not in non_persistent:
                out[prefix + n] = b.detach().to("cpu", copy=True).contiguous()
    return out


def load_trainable_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` (from ``trainable_state_dict``) into ``model``; every key must exist and
    every trainable parameter must be present, else ``CheckpointError`` listing the mismatch."""
    expected = set(trainable_state_dict_names(model))
    got = set(tensors)
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not match the model: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''} (was the model built "
            "with the same config and the same frozen/trainable split?)")
    # remove_duplicate=False: a tied weight (an LLM's lm_head.weight = embed_tokens.weight) is
    # saved under both names by trainable_state_dict and must be found under both here
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(dict(model.named_buffers(remove_duplicate=False)))
    with torch.no_grad():
        for name, value in tensors.items():
            target = state[name]
            if target.shape != value.shape:
                raise CheckpointError(f"{name}: checkpoint shape {tuple(value.shape)} != model {tuple(target.shape)}")
            target.copy_(value.to(target.device, target.dtype))


def trainable_state_dict_names(model: nn.Module) -> list[str]:
    """The keys ``trainable_state_dict`` would produce, without copying any tensor."""
    names = []
    for mod_name, module in model.named_modules():
        own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        prefix = f"{mod_name}." if mod_name else ""
        names += [prefix + n for n in own]
        non_persistent = getattr(module, "_non_persistent_buffers_set", set())
        names += [prefix + n for n, b in module.named_buffers(recurse=False) if b is not None and n not in non_persistent]
    return names


def rng_state() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU, every CUDA device) as tensors and lists."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_kind, torch.from_numpy(np.asarray(np_keys, dtype=np.int64)), int(np_pos),
                  int(np_has_gauss), float(np_cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_kind, np_keys, np_pos, np_has_gauss, np_cached = state["numpy"]
    np.random.set_state((np_kind, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def tmp_dir_for(ckpt_root: Path, step: int) -> Path:
    """The temporary directory a checkpoint of ``step`` is written into before the rename."""
    return Path(ckpt_root) / f"{TMP_PREFIX}{ckpt_name(step)}"


def write_rank_files(tmp: Path, rank: int, rng: dict[str, Any]) -> None:
    """Write the per-rank part of a checkpoint (the RNG states) into ``tmp``; called on every rank."""
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / f"rng_rank{rank}.pt"
    with naming_disk_full(path):
        torch.save(rng, path)
    fsync_path(path)


def write_main_files(tmp: Path, model_tensors: Optional[dict[str, torch.Tensor]], optim_state: dict[str, Any]) -> None:
    """Write the rank-0 part (trainable tensors and optimiser/scheduler state) into ``tmp``;
    ``model_tensors`` None when they are in ``SHARDED_DIR`` (FSDP)."""
    tmp.mkdir(parents=True, exist_ok=True)
    names = [OPTIM_FILE]
    if model_tensors is not None:
        with naming_disk_full(tmp / MODEL_FILE):
            save_file(model_tensors, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        names.append(MODEL_FILE)
    with naming_disk_full(tmp / OPTIM_FILE):
        torch.save(optim_state, tmp / OPTIM_FILE)
    for name in names:
        fsync_path(tmp / name)


def commit(tmp: Path, meta: dict) -> Path:
    """Write ``meta.json`` last, fsync, and rename ``tmp`` to its final name. Returns the final dir.

    An existing directory with the final name (only possible when re-saving a step) is replaced.
    """
    if not tmp.name.startswith(TMP_PREFIX):
        raise ValueError(f"{tmp} is not a temporary checkpoint directory")
    atomic_write_text(tmp / META, json.dumps(meta, indent=1))
    fsync_path(tmp)
    final = tmp.parent / tmp.name[len(TMP_PREFIX):]
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(final.parent)
    return final


# ----------------------------------------------------------------------------------------------
# Finding, reading, pruning
# ----------------------------------------------------------------------------------------------


def list_checkpoints(ckpt_root: Path, warn: bool = False) -> list[CheckpointInfo]:
    """Complete checkpoints under ``ckpt_root``, oldest first. ``.tmp-*`` dirs and dirs without a
    readable ``meta.json`` are skipped (the latter with a warning on stderr when ``warn``)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = CKPT_RE.match(d.name)
        if not (m and d.is_dir() and (d / META).is_file()):
            continue
        try:
            meta = json.loads((d / META).read_text())
            if not (isinstance(meta, dict) and isinstance(meta.get("step"), int)):
                raise ValueError(f"not an object with an integer step: {str(meta)[:40]}")
        except (OSError, ValueError) as e:
            if warn:
                print(f"warning: skipping checkpoint {d}: unreadable {META} ({e})", file=sys.stderr)
            continue
        found.append(CheckpointInfo(path=d, step=int(m.group(1)), meta=meta))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(ckpt_root: Path) -> Optional[CheckpointInfo]:
    """The complete checkpoint with the highest step, or None."""
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def _read(path: Path, reader: Any) -> Any:
    """``reader(path)``; any failure to read raises ``DamagedCheckpointError`` naming ``path``."""
    try:
        return reader(path)
    except FileNotFoundError as e:
        raise DamagedCheckpointError(f"checkpoint file missing: {path}") from e
    except (OSError, RuntimeError, ValueError, EOFError, SafetensorError, pickle.UnpicklingError) as e:
        reason = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise DamagedCheckpointError(f"damaged checkpoint file {path}: {reason[:200]}") from e


def _torch_load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint(path: Path, rank: int = 0) -> dict[str, Any]:
    """Read a complete checkpoint dir: ``{"model": tensors, "optim": state, "rng": state | None, "meta": dict}``.

    ``rng`` is this ``rank``'s RNG file (None if the checkpoint has none for it). A sharded (FSDP)
    checkpoint has ``model`` None and only the scheduler in ``optim``: its ``SHARDED_DIR`` is read by
    ``training.parallel.load_sharded``. A file that cannot be read raises ``DamagedCheckpointError``
    naming it.
    """
    path = Path(path)
    if not (path / META).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {META})")
    meta = _read(path / META, lambda p: json.loads(p.read_text()))
    model = None if (path / SHARDED_DIR).is_dir() else _read(path / MODEL_FILE, lambda p: load_file(str(p)))
    optim = _read(path / OPTIM_FILE, _torch_load)
    rng_path = path / f"rng_rank{rank}.pt"
    rng = _read(rng_path, _torch_load) if rng_path.is_file() else None
    return {"model": model, "optim": optim, "rng": rng, "meta": meta}


def load_latest_good(ckpt_root: Path, rank: int = 0, warn: bool = True) -> Optional[tuple[CheckpointInfo, dict]]:
    """The newest checkpoint under ``ckpt_root`` whose files all read, with its state
    (``load_checkpoint``); damaged newer ones are skipped with a warning naming the file. None when
    there is no checkpoint; ``DamagedCheckpointError`` when every one is damaged."""
    found = list_checkpoints(ckpt_root, warn=warn)
    error: Optional[DamagedCheckpointError] = None
    for info in reversed(found):
        try:
            return info, load_checkpoint(info.path, rank)
        except DamagedCheckpointError as e:
            error = e
            if warn:
                print(f"warning: {e}; falling back to the previous checkpoint", file=sys.stderr)
    if error is not None:
        raise DamagedCheckpointError(f"no readable checkpoint under {ckpt_root} (newest error: {error})")
    return None


def prune_checkpoints(ckpt_root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints; returns what was removed."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    found = list_checkpoints(ckpt_root)
    removed = []
    for c in found[:-keep_last]:
        shutil.rmtree(c.path, ignore_errors=True)
        removed.append(c.path)
    return removed


def remove_stale_tmp(ckpt_root: Path) -> list[Path]:
    """Delete ``.tmp-*`` directories left by a crash mid-write; returns what was removed."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    stale = [d for d in root.iterdir() if d.name.startswith(TMP_PREFIX)]
    for d in stale:
        shutil.rmtree(d, ignore_errors=True)
    return stale
