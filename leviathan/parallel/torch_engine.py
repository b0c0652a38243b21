"""The plain engine: one process, AdamW, accumulation over micro-batches, norm clipping."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from leviathan.parallel.optim import build_adamw
from leviathan.parallel.precision import autocast
from leviathan.parallel.step import Batch, StepResult, TrainableModel

if TYPE_CHECKING:
    from leviathan.config import Config
    from leviathan.parallel.world import World


class TorchEngine:
    """One process: AdamW, gradient accumulation over micro-batches, norm clipping."""

    rank = 0
    world_size = 1
    zero_stage = None

    def __init__(self, model: TrainableModel, cfg: Config, world: World):
        t = cfg.train
        self.model = model.to(world.device)
        self.device = world.device
        self.precision = t.precision
        self.grad_clip = t.grad_clip
        self.optimizer = build_adamw(
            model, lr=0.0, weight_decay=t.weight_decay, betas=(t.beta1, t.beta2)
        )

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
        """The optimizer state is read onto the CPU: `load_state_dict` moves the moments to
        their parameters' device itself and keeps AdamW's `step` on the CPU, where its
        non-fused, non-capturable kernels expect it."""
        self.model.load_state_dict(
            torch.load(directory / "model.pt", map_location=self.device, weights_only=True)
        )
        self.optimizer.load_state_dict(
            torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)
        )

    @staticmethod
    def read_state(directory: Path) -> dict[str, torch.Tensor]:
        return torch.load(directory / "model.pt", map_location="cpu", weights_only=True)
