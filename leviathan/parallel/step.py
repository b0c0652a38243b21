"""What an engine is: it runs one optimizer step; the training loop never touches the optimizer.

The loop hands an engine this rank's micro-batches and the step's learning rate and
gets back the loss. `TorchEngine` (`leviathan.parallel.torch_engine`) is plain PyTorch in
one process; the DeepSpeed engine (`leviathan.parallel.deepspeed.engine`) implements the
same protocol, so the loop is the same at every scale. `leviathan.parallel.engines.ENGINES`
names them; each reads its own checkpoints back (`read_state`), so an export needs no
knowledge of their files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from leviathan.config import Config
    from leviathan.parallel.world import World

Batch = tuple[torch.Tensor, torch.Tensor]


class TrainableModel(Protocol):
    """What an engine asks of the nn.Module it trains, beyond being one."""

    def __call__(
        self, idx: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...  # logits, mean cross-entropy

    def aux_loss(self) -> torch.Tensor: ...  # added to the loss: the last forward's

    def after_optimizer_step(self) -> None: ...  # state that moves outside the gradient


@dataclass
class StepResult:
    loss: float  # mean cross-entropy over this step's micro-batches (nats/token)
    aux_loss: float  # mean of the model's auxiliary (router balance) losses, already weighted
    grad_norm: float  # global gradient norm before clipping


class Engine(Protocol):
    model: nn.Module  # the bare model, for evaluation and sampling
    rank: int
    world_size: int
    zero_stage: int | None  # how the optimizer state is sharded (None: not at all)
    device: torch.device  # where it trains (whose generator the checkpoint keeps)

    def __init__(self, model: TrainableModel, cfg: Config, world: World) -> None: ...

    def train_step(self, micro_batches: list[Batch], lr: float) -> StepResult: ...

    def barrier(self) -> None: ...

    def local_param_numel(self) -> int: ...

    def save(self, directory: Path) -> None: ...

    def load(self, directory: Path) -> None: ...

    @staticmethod
    def read_state(directory: Path) -> dict[str, torch.Tensor]: ...  # full fp32 weights
