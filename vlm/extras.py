"""Optional parts of the package, each an extra of ``pyproject.toml``, imported only when used.

``require(extra, module, what)`` imports ``module`` or raises ``MissingExtra`` with one line naming
the extra to install; the command line prints that line and exits with status 3. The extras:
``lmeval`` (``vlm eval drift``), ``wandb`` (``run.wandb=true``), ``qlora`` (``model.load_in_4bit``:
bitsandbytes, accelerate), ``flash`` (``model.attn_implementation=flash_attention_2``), ``gpu``
(qlora + flash), ``timm`` (a ``TimmWrapperModel`` directory as a vision tower).

This module is at the bottom of the import graph: it imports nothing from the project.
"""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

EXTRAS = {"lmeval": "lm-eval", "wandb": "wandb", "qlora": "bitsandbytes, accelerate", "flash": "flash-attn",
          "timm": "timm"}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def missing_extra_message(extra: str, what: str) -> str:
    """The one line: ``what needs the `vlm[extra]` extra (...): pip install 'sparc-vlm[extra]'``."""
    return f"{what} needs the `vlm[{extra}]` extra ({EXTRAS[extra]}): pip install 'sparc-vlm[{extra}]'"


def require(extra: str, module: str, what: str = "") -> ModuleType:
    """Import ``module`` (part of ``extra``) or raise ``MissingExtra`` naming the extra.
    ``what`` says what needs it (default: the module)."""
    if extra not in EXTRAS:
        raise KeyError(f"unknown extra {extra!r}; extras: {', '.join(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtra(missing_extra_message(extra, what or module)) from e


def check_extra(extra: str, module: str, what: str = "") -> None:
    """``require`` without importing (for heavy modules checked before any work starts)."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module set to None
        found = False
    if not found:
        raise MissingExtra(missing_extra_message(extra, what or module))
