"""Load-balancing terms: Switch auxiliary loss, router z-loss, loss-free bias update."""

from __future__ import annotations

import torch


def switch_aux_loss(probs: torch.Tensor, indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch Transformer balance loss E * sum_e f_e * P_e (1.0 when perfectly balanced).

    probs: (T, E) router probabilities, rows summing to 1 (normalise sigmoid scores first).
    indices: (T, k) chosen experts; f_e is the fraction of the T*k assignments sent to e
    (not differentiable), P_e the mean probability of e (carries the gradient).
    """
    counts = torch.bincount(indices.reshape(-1), minlength=n_experts)
    f = counts.to(probs.dtype) / indices.numel()
    return n_experts * (f * probs.mean(0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss mean(logsumexp(logits)^2) (ST-MoE): keeps router logits small."""
    return logits.logsumexp(-1).square().mean()


@torch.no_grad()
def update_bias(bias: torch.Tensor, load: torch.Tensor, rate: float) -> None:
    """Loss-free balancing step, in place: b += rate * sign(mean(load) - load).

    Underloaded experts get a higher selection bias, overloaded ones a lower one.
    """
    load = load.to(bias.dtype)
    bias.add_(rate * torch.sign(load.mean() - load))
