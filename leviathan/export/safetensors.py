"""One consolidated safetensors file per run, whatever engine and layout trained it.

`model_state` asks the engine that wrote a checkpoint (a plain process, or N DeepSpeed
ranks at some ZeRO stage) for its full fp32 state dict; `export_run` writes it with the
run's config as `run_dir/model.safetensors`, which `leviathan sample` and `eval` load
directly, and `Leviathan.from_export` (the reader lives with the model) anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from leviathan.errors import CheckpointError, StorageError
from leviathan.model.gpt import read_export
from leviathan.parallel.engines import written_by
from leviathan.storage import atomic_write_bytes
from leviathan.train.checkpoint import offer_previous, verify_checkpoint

__all__ = ["EXPORT", "checked_state", "export_run", "model_state", "read_export"]

EXPORT = "model.safetensors"
TIED = ("head.weight",)  # the output head is the token embedding: stored once


def model_state(directory: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a verified checkpoint folder (tied head included)."""
    verify_checkpoint(directory)
    return written_by(directory).read_state(directory)


def checked_state(directory: Path) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint; a damaged one names the newest older one that
    verifies (`--checkpoint DIR`)."""
    try:
        return model_state(directory)
    except CheckpointError as err:
        raise offer_previous(err, directory, lambda p: f"use it with --checkpoint {p}") from None


def export_run(run_dir: Path, checkpoint: Path, out: Path | None = None) -> Path:
    """Write checkpoint `checkpoint` of `run_dir` as one safetensors file (atomically)."""
    from safetensors.torch import save

    out = out or run_dir / EXPORT
    if not out.parent.is_dir():  # checked before minutes of consolidating a large model
        raise StorageError(f"--out {out}: the folder {out.parent} does not exist")
    state = checked_state(checkpoint)
    config = (checkpoint / "config.json").read_text(encoding="utf-8")
    step = json.loads((checkpoint / "MANIFEST.json").read_text(encoding="utf-8"))["step"]
    tensors = {k: v.contiguous() for k, v in state.items() if k not in TIED}
    try:
        atomic_write_bytes(out, save(tensors, metadata={"config": config, "step": str(step)}))
    except OSError as err:
        raise StorageError(f"--out {out}: cannot write it: {err.strerror}") from None
    return out
