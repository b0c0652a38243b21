"""Where a run's numbers go: metrics.jsonl (the record of truth) and W&B."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from leviathan.errors import StorageError
from leviathan.storage import atomic_write_text, read_records


class MetricsLog:
    """Appends one JSON object per step; on resume, drops records past the resumed step
    so a run that crashed after its last checkpoint never shows a step twice, and a last
    line torn by a crash or a full disk (with a warning)."""

    def __init__(self, path: Path, resume_step: int = 0, log: Callable[[str], None] = print):
        self.path = path
        if resume_step and path.exists():
            kept = [r for r in read_records(path, log) if r["step"] <= resume_step]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        elif not resume_step:
            path.write_text("", encoding="utf-8")
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def log(self, record: dict[str, Any]) -> None:
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as err:
            raise StorageError(f"cannot write {self.path}: {err.strerror}") from err

    def close(self) -> None:
        self.file.close()


def resolve_wandb_mode(mode: str) -> str:
    """`auto` is online when an API key is configured, offline otherwise."""
    if mode != "auto":
        return mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class WandbRun:
    """A W&B run resumed across restarts by an id kept in the run folder."""

    def __init__(self, run_dir: Path, mode: str, project: str, config: dict[str, Any]):
        self.mode = resolve_wandb_mode(mode)
        self.run = None
        if self.mode == "disabled":
            return
        import wandb

        id_file = run_dir / "wandb_id"
        if not id_file.exists():
            id_file.write_text(secrets.token_hex(4), encoding="utf-8")
        self.run = wandb.init(
            project=project,
            dir=run_dir,
            id=id_file.read_text(encoding="utf-8").strip(),
            resume="allow",
            mode=self.mode,
            config=config,
            name=run_dir.name,
        )

    def log(self, record: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log(scalars(record), step=record["step"])

    def log_image(self, key: str, path: Path, step: int) -> None:
        """A PNG (the expert-load heatmap) as a W&B image at `step`."""
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path))}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Flatten nested metrics to `moe/layer1/imbalance` keys, keeping numbers only."""
    flat = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(scalars(value, f"{name}/"))
        elif isinstance(value, (int, float)) and name != "step":
            flat[name] = value
    return flat
