"""What a checkpoint holds beyond the folder mechanics (`checkpoint`), and what a resume checks.

A step folder holds the engine's own files, the loop's step and world size
(`trainer.pt`), every rank's RNG (`rng_rank<r>.pt`) and the config (`config.json`).
Every step's batch and learning rate are pure functions of (seed, step), so with these a
resumed run takes exactly the steps the uninterrupted run would have taken.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from leviathan.config import Config, translate_moved_keys
from leviathan.data import DataIndex
from leviathan.data.shards import TOKENIZER_FILE
from leviathan.errors import CheckpointError
from leviathan.parallel.step import Engine
from leviathan.train.checkpoint import (
    checkpoint_at,
    checkpoint_step,
    latest_checkpoint,
    offer_previous,
    verify_checkpoint,
)

TRAINER_FILE = "trainer.pt"
CONFIG_FILE = "config.json"


class TrainingState:
    """One rank's side of a checkpoint: written by every rank, restored by every rank."""

    def __init__(self, engine: Engine, cfg: Config):
        self.engine, self.cfg = engine, cfg

    def write(self, step: int, directory: Path) -> None:
        """Everything a resume needs: engine state, the loop's step, every rank's RNG, config."""
        engine = self.engine
        engine.save(directory)
        torch.save(rng_state(engine.device), directory / f"rng_rank{engine.rank}.pt")
        if engine.rank == 0:
            torch.save({"step": step, "world_size": engine.world_size}, directory / TRAINER_FILE)
            (directory / CONFIG_FILE).write_text(
                json.dumps(self.cfg.to_dict(), indent=1), encoding="utf-8"
            )

    def restore(self, directory: Path, log: Callable[[str], None]) -> int:
        """Load checkpoint `directory`; return the step it was taken at.

        The data position is the step itself (batches are a function of the step). The RNG
        of each rank is restored when the world size is unchanged; on another world size
        dropout masks cannot continue bit for bit, so each rank reseeds from (seed, step).
        """
        try:
            verify_checkpoint(directory)
        except CheckpointError as err:
            how = "resume from it with --resume-from {}".format
            raise offer_previous(err, directory, lambda p: how(checkpoint_step(p))) from None
        saved = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
        check_same_model(saved, self.cfg, directory)
        engine = self.engine
        engine.load(directory)
        state = torch.load(directory / TRAINER_FILE, weights_only=True)
        rng = directory / f"rng_rank{engine.rank}.pt"
        if state["world_size"] == engine.world_size and rng.is_file():
            set_rng_state(torch.load(rng, weights_only=True), engine.device)
        else:
            torch.manual_seed(hash((self.cfg.train.seed, state["step"], engine.rank)) % 2**63)
        log(
            f"resumed from {directory} at step {state['step']} "
            f"({state['world_size']} -> {engine.world_size} ranks)"
        )
        return state["step"]


def resume_source(
    root: Path, resume: bool | Path, resume_from: int | None, log: Callable[[str], None]
) -> Path | None:
    """The checkpoint folder a run continues from, or None for a fresh run."""
    if resume_from is not None:
        return checkpoint_at(root, resume_from)
    if isinstance(resume, Path):
        return resume
    if not resume:
        return None
    source = latest_checkpoint(root, log)
    if source is None:
        raise CheckpointError(f"--resume: no checkpoint in {root}")
    return source


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The CPU generator, and that of `device` (the training device, whose dropout draws
    from it: not necessarily the current CUDA device) when it is a GPU."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Put back what `rng_state(device)` saved, the GPU part into `device`'s generator."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def check_same_model(saved: dict, cfg: Config, directory: Path) -> None:
    """The checkpoint's model config (`saved`: its whole config) is the run's, key by key;
    a checkpoint from before `parallel.ep_size` is read with the key in its new place."""
    saved = translate_moved_keys(saved)["model"]
    current = cfg.to_dict()["model"]
    diffs = [
        f"model.{k}: checkpoint {saved.get(k)!r}, config {v!r}"
        for k, v in current.items()
        if saved.get(k) != v
    ]
    if diffs:
        raise CheckpointError(
            f"checkpoint {directory} is from a different model: " + "; ".join(diffs)
        )


def check_same_tokenizer(run_dir: Path, index: DataIndex) -> None:
    """A resumed model must read the token ids it was trained on: the run's tokenizer
    (copied into run.dir at its start) must be the dataset's, not one of the same size."""
    used = run_dir / TOKENIZER_FILE
    if not used.is_file():
        return
    if used.read_bytes() != index.tokenizer_path.read_bytes():
        raise CheckpointError(
            f"run.dir {run_dir} was trained with another tokenizer than data.dir "
            f"{index.dir} holds ({used} differs from {index.tokenizer_path}, though both may "
            f"have {index.vocab_size} pieces): resume with the run's dataset, or start a new "
            "run.dir"
        )
