"""The bridge registry: name -> class. A new bridge is one file plus one line here.

Every bridge is built the same way, ``BRIDGES[cfg.name](cfg, vision_width, llm_width, num_llm_layers,
num_tokens)`` (``num_tokens``: the tower's feature tokens per image),
and follows the contract of ``vlm.model.bridges.base.Bridge``.
"""
from __future__ import annotations

from vlm.config import BridgeConfig
from vlm.model.bridges.base import Bridge
from vlm.model.bridges.flamingo import FlamingoBridge
from vlm.model.bridges.projector import ProjectorBridge

BRIDGES: dict[str, type[Bridge]] = {
    "projector": ProjectorBridge,
    "flamingo": FlamingoBridge,
}


def build_bridge(cfg: BridgeConfig, vision_width: int, llm_width: int, num_llm_layers: int,
                 num_tokens: int = 0) -> Bridge:
    """A freshly initialised bridge named ``cfg.name`` (``KeyError`` lists the valid names) for a
    tower of ``num_tokens`` feature tokens per image (0: unknown; a learned position table needs it)."""
    if cfg.name not in BRIDGES:
        raise KeyError(f"unknown bridge {cfg.name!r}; valid bridges: {sorted(BRIDGES)}")
    return BRIDGES[cfg.name](cfg, vision_width, llm_width, num_llm_layers, num_tokens)


__all__ = ["BRIDGES", "Bridge", "build_bridge"]
