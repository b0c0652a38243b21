"""The engines by name: `ENGINES[world.engine](model, cfg, world)` builds one."""

from __future__ import annotations

from pathlib import Path

from leviathan.parallel.deepspeed.engine import DeepSpeedEngine, read_layout
from leviathan.parallel.step import Engine
from leviathan.parallel.torch_engine import TorchEngine

ENGINES: dict[str, type[Engine]] = {"torch": TorchEngine, "deepspeed": DeepSpeedEngine}


def written_by(directory: Path) -> type[Engine]:
    """The engine that wrote checkpoint `directory`: its layout file names it (the plain
    engine writes none)."""
    return ENGINES[read_layout(directory)["engine"]]
