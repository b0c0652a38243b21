"""Engines run one optimizer step; the training loop never touches the optimizer itself.

The loop hands an engine this rank's micro-batches and the step's learning rate and
gets back the loss. `TorchEngine` is plain PyTorch in one process; a DeepSpeed engine
implements the same protocol, so the loop is the same at every scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from leviathan.train.device import autocast
from leviathan.train.optim import build_adamw

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class StepResult:
    loss: float  # mean cross-entropy over this step's micro-batches (nats/token)
    aux_loss: float  # mean of the model's auxiliary (router balance) losses, already weighted
    grad_norm: float  # global gradient norm before clipping


class Engine(Protocol):
    model: nn.Module  # the bare model, for evaluation and sampling
    rank: int
    world_size: int

    def train_step(self, micro_batches: list[Batch], lr: float) -> StepResult: ...

    def barrier(self) -> None: ...

    def local_param_numel(self) -> int: ...

    def save(self, directory: Path) -> None: ...

    def load(self, directory: Path) -> None: ...


class TorchEngine:
    """One process: AdamW, gradient accumulation over micro-batches, norm clipping."""

    rank = 0
    world_size = 1

    def __init__(
        self,
        model: nn.Module,
        weight_decay: float,
        betas: tuple[float, float],
        grad_clip: float,
        device: torch.device,
        precision: str = "fp32",
    ):
        self.model = model.to(device)
        self.device = device
        self.precision = precision
        self.grad_clip = grad_clip
        self.optimizer = build_adamw(model, lr=0.0, weight_decay=weight_decay, betas=betas)

    def train_step(self, micro_batches: list[Batch], lr: float) -> StepResult:
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss, aux
        for x, y in micro_batches:
            with autocast(self.device, self.precision):
                _, loss = self.model(x.to(self.device), y.to(self.device))
                aux = self.model.aux_loss()
            ((loss + aux) / len(micro_batches)).backward()
            sums[0] += loss.detach()  # summed on the device: no sync per micro-batch
            sums[1] += aux.detach()
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.after_optimizer_step()
        mean_loss, mean_aux = (sums / len(micro_batches)).tolist()
        return StepResult(loss=mean_loss, aux_loss=mean_aux, grad_norm=float(grad_norm))

    def barrier(self) -> None:
        """One process: nothing to wait for."""

    def local_param_numel(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def save(self, directory: Path) -> None:
        torch.save(self.model.state_dict(), directory / "model.pt")
        torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")

    def load(self, directory: Path) -> None:
        self.model.load_state_dict(
            torch.load(directory / "model.pt", map_location=self.device, weights_only=True)
        )
        self.optimizer.load_state_dict(
            torch.load(directory / "optimizer.pt", map_location=self.device, weights_only=True)
        )
