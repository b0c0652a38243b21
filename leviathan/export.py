"""One consolidated safetensors file per run, whatever engine and layout trained it.

A plain-engine checkpoint holds `model.pt`; a DeepSpeed one holds a sharded folder
(`deepspeed/`) written by N ranks at some ZeRO stage. `model_state` turns either into a
full fp32 state dict; `export_run` writes it with the run's config as
`run_dir/model.safetensors`, which `leviathan sample` and `eval` load directly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from leviathan.distributed.engine import CONSOLIDATED, LAYOUT, TAG
from leviathan.errors import CheckpointError, StorageError
from leviathan.train.checkpoint import atomic_write_bytes, verify_checkpoint

EXPORT = "model.safetensors"
TIED = ("head.weight",)  # the output head is the token embedding: stored once


def model_state(directory: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a verified checkpoint folder (tied head included)."""
    verify_checkpoint(directory)
    if (directory / "model.pt").is_file():
        return torch.load(directory / "model.pt", map_location="cpu", weights_only=True)
    state = deepspeed_state(directory)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    state.setdefault("head.weight", state["tok_emb.weight"])
    return state


def deepspeed_state(directory: Path) -> dict[str, torch.Tensor]:
    layout = json.loads((directory / LAYOUT).read_text(encoding="utf-8"))
    if layout["ep_size"] > 1:  # the engine wrote it whole: DeepSpeed's tools cannot
        return torch.load(directory / CONSOLIDATED, map_location="cpu", weights_only=True)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    if layout["zero_stage"] == 0:
        states = directory / TAG / "mp_rank_00_model_states.pt"
        return torch.load(states, map_location="cpu", weights_only=False)["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=TAG)


def export_run(run_dir: Path, checkpoint: Path, out: Path | None = None) -> Path:
    """Write checkpoint `checkpoint` of `run_dir` as one safetensors file (atomically)."""
    from safetensors.torch import save

    from leviathan.run import checked_state

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


def read_export(path: Path) -> tuple[dict[str, torch.Tensor], dict, int]:
    """(state dict with the tied head restored, config dict, step) of an exported file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        config, step = json.loads(metadata["config"]), int(metadata["step"])
    except (OSError, SafetensorError, KeyError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable Leviathan export ({err!r})") from err
    state["head.weight"] = state["tok_emb.weight"]
    return state, config, step
