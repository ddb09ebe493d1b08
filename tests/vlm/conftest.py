"""Session fixtures: the tiny LLM and vision tower of ``tiny_vlm``, saved once, read-only afterwards."""
from __future__ import annotations

from pathlib import Path

import pytest

from tiny_vlm import save_tiny_llm, save_tiny_tower


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory) -> Path:
    return save_tiny_llm(tmp_path_factory.mktemp("llm"))


@pytest.fixture(scope="session")
def tiny_tower_dir(tmp_path_factory) -> Path:
    return save_tiny_tower(tmp_path_factory.mktemp("tower"))

