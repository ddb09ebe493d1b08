"""``BRIDGES``: bridge name -> class, and ``build_bridge`` (the one place bridges are constructed)."""
from __future__ import annotations

from vlm.bridges import Bridge
from vlm.bridges.flamingo import FlamingoBridge
from vlm.bridges.projector import ProjectorBridge
from vlm.config import BRIDGE_NAMES, BridgeConfig

BRIDGES: dict[str, type[Bridge]] = {"projector": ProjectorBridge, "flamingo": FlamingoBridge}
assert tuple(BRIDGES) == BRIDGE_NAMES, "vlm.config.BRIDGE_NAMES and BRIDGES disagree"


def build_bridge(cfg: BridgeConfig, vision_width: int, llm_width: int, num_llm_layers: int) -> Bridge:
    """A freshly initialised bridge named ``cfg.name`` (raises ``KeyError`` listing the valid names)."""
    if cfg.name not in BRIDGES:
        raise KeyError(f"unknown bridge {cfg.name!r}; valid bridges: {sorted(BRIDGES)}")
    if cfg.name == "flamingo":
        return FlamingoBridge(vision_width, llm_width, cfg, num_llm_layers)
    return ProjectorBridge(vision_width, llm_width)
