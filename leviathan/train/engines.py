"""The engines by name: `ENGINES[world.engine](model, cfg, world)` builds one."""

from __future__ import annotations

from pathlib import Path

from leviathan.train.deepspeed import DeepSpeedEngine, read_layout
from leviathan.train.engine import Engine, TorchEngine

ENGINES: dict[str, type[Engine]] = {"torch": TorchEngine, "deepspeed": DeepSpeedEngine}


def written_by(directory: Path) -> type[Engine]:
    """The engine that wrote checkpoint `directory`: its layout file names it (the plain
    engine writes none)."""
    return ENGINES[read_layout(directory)["engine"]]
