"""Routing statistics of the training forwards, summed until a caller reports them."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from moe import balance
from moe.dispatch import Plan, drops_per_position
from moe.router import Routing

POSITION_BINS = 16  # spans of the sequence the per-position drop fractions are reported in


def _add_padded(total: torch.Tensor, more: torch.Tensor) -> torch.Tensor:
    """total + more, the shorter zero-padded (sequence lengths may differ between calls)."""
    n = max(total.numel(), more.numel())
    return F.pad(total, (0, n - total.numel())) + F.pad(more, (0, n - more.numel()))


def _binned_fraction(part: torch.Tensor, whole: torch.Tensor, bins: int) -> list[float]:
    """sum(part) / sum(whole) over `bins` equal spans (fewer when shorter)."""
    spans = torch.arange(whole.numel(), device="cpu") * min(bins, whole.numel()) // whole.numel()
    n = int(spans.max()) + 1
    num = torch.zeros(n, dtype=torch.float64, device="cpu").index_add_(0, spans, part.double())
    den = torch.zeros(n, dtype=torch.float64, device="cpu").index_add_(0, spans, whole.double())
    return (num / den.clamp(min=1)).tolist()


def _no_positions() -> torch.Tensor:
    return torch.zeros(0, dtype=torch.long, device="cpu")


@dataclass(frozen=True, eq=False)
class RoutingStats:
    """Detached sums over the training forwards since the last report (CPU, this rank).

    CPU whatever the model's device: every factory names it (under ZeRO-3's `zero.Init`
    an unnamed one lands on the GPU), and the per-forward scalars reach the host in one
    transfer.

    A value: `add` returns the new sums and changes nothing in place, so whoever saves a
    layer's attributes and puts them back (activation checkpointing, around the forward
    it recomputes) undoes that forward's count by that alone.
    """

    load: torch.Tensor  # (E,) routed assignments per expert
    steps: int = 0
    dropped: int = 0
    assigned: int = 0
    dropped_at: torch.Tensor = field(default_factory=_no_positions)  # per position
    assigned_at: torch.Tensor = field(default_factory=_no_positions)  # (capacity mode)
    entropy: float = 0.0
    aux_loss: float = 0.0
    z_loss: float = 0.0

    @classmethod
    def empty(cls, n_experts: int) -> RoutingStats:
        """Nothing counted yet."""
        return cls(load=torch.zeros(n_experts, dtype=torch.long, device="cpu"))

    @torch.no_grad()
    def add(
        self,
        r: Routing,
        p: Plan,
        probs: torch.Tensor,
        seq_len: int,
        aux: torch.Tensor | None,
        z: torch.Tensor | None,
    ) -> RoutingStats:
        """These sums plus one forward's: `probs` (T, E) normalised scores; `aux` and `z`
        the raw Switch and z-losses where the forward computed them (None: computed here);
        per-position drops when `p` was planned with a capacity (`p.dropped_idx` set)."""
        n_experts, assigned = self.load.numel(), r.indices.numel()
        positions: dict[str, torch.Tensor] = {}
        if p.dropped_idx is not None:
            drops = drops_per_position(p, r.indices.shape[1], seq_len)
            per_pos = torch.full((seq_len,), assigned // seq_len, device="cpu")
            positions = dict(
                dropped_at=_add_padded(self.dropped_at, drops),
                assigned_at=_add_padded(self.assigned_at, per_pos),
            )
        if aux is None:
            aux = balance.switch_aux_loss(probs, r.indices, n_experts)
        if z is None:
            z = balance.z_loss(r.logits)
        entropy = torch.special.entr(probs).sum(-1).mean()
        scalars = torch.stack([entropy.double(), aux.double(), z.double()]).tolist()
        return replace(
            self,
            steps=self.steps + 1,
            load=self.load + p.routed,
            dropped=self.dropped + p.dropped,
            assigned=self.assigned + assigned,
            entropy=self.entropy + scalars[0],
            aux_loss=self.aux_loss + scalars[1],
            z_loss=self.z_loss + scalars[2],
            **positions,
        )

    def summary(self) -> dict[str, float | list[int]]:
        """The reported statistics ({} when nothing was counted); `MoE.pop_metrics` says
        what each one is."""
        if not self.steps:
            return {}
        load = self.load.double()
        mean = load.mean().item()
        out: dict[str, float | list[int]] = {
            "load": self.load.tolist(),
            "imbalance": load.max().item() / mean if mean else 0.0,
            "load_cv": load.std(unbiased=False).item() / mean if mean else 0.0,
            "dropped_frac": self.dropped / max(1, self.assigned),
            "router_entropy": self.entropy / self.steps,
            "aux_loss": self.aux_loss / self.steps,
            "z_loss": self.z_loss / self.steps,
        }
        if self.assigned_at.numel():
            out["dropped_frac_by_position"] = _binned_fraction(
                self.dropped_at, self.assigned_at, POSITION_BINS
            )
        return out
