"""Top-k router: scores every token against every expert and picks k of them."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class Routing(NamedTuple):
    """What the router decided for T tokens (k = top_k, E = n_experts).

    A NamedTuple, so wrappers that walk module outputs (ZeRO-3's backward hooks, which
    gather the router weight for the backward pass) see the tensors inside.
    """

    logits: torch.Tensor  # (T, E) raw router outputs, for the z-loss
    scores: torch.Tensor  # (T, E) softmax probabilities or sigmoid scores
    indices: torch.Tensor  # (T, k) chosen experts, best first
    gates: torch.Tensor  # (T, k) weights of the chosen experts' outputs


class Router(nn.Module):
    """Linear d -> E in fp32 (or better), softmax or sigmoid scores, top-k selection.

    The router is kept and computed in at least fp32 even under autocast: top-k decisions
    flip on small logit differences and the z-loss squares logsumexp, both of which bf16
    rounding would distort. A float64 input is routed in float64 (exact reference tests).

    `bias` is the loss-free balancing buffer: it is added to the scores for *selection
    only*; gate weights always come from the unbiased scores, so the bias steers load
    without entering the function the model computes (DeepSeek-V3's auxiliary-loss-free
    balancing). It stays zero unless `moe.balance.update_bias` changes it, and stays fp32.
    """

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        score: str = "softmax",
        top_k: int = 2,
        renormalize: bool = True,
        jitter: float = 0.0,
    ) -> None:
        super().__init__()
        if score not in ("softmax", "sigmoid"):
            raise ValueError(f"score: expected softmax or sigmoid, got {score!r}")
        self.n_experts, self.score, self.top_k = n_experts, score, top_k
        self.renormalize, self.jitter = renormalize, jitter
        self.weight = nn.Parameter(torch.empty(n_experts, d_model, dtype=torch.float32))
        nn.init.normal_(self.weight, std=0.02)
        # .float() after torch.zeros: zero.Init casts what the factories make to bf16
        self.register_buffer("bias", torch.zeros(n_experts).float())

    def forward(self, x: torch.Tensor) -> Routing:
        """Route x (T, d). Jitter multiplies the router input by U(1-eps, 1+eps) in training."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.to(dtype)
            if self.training and self.jitter > 0:
                x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            logits = F.linear(x, self.weight.to(dtype))
            scores = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()
            with torch.no_grad():
                indices = (scores + self.bias.to(dtype)).topk(self.top_k, dim=-1).indices
            gates = scores.gather(1, indices)
            if self.renormalize:
                gates = gates / gates.sum(-1, keepdim=True)
        return Routing(logits, scores, indices, gates)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        """Casts apply to the weight, but the bias stays fp32: bf16 (8-bit mantissa) would
        round away most bias_rate-sized updates."""
        super()._apply(fn, recurse)
        self.bias = self.bias.float()
        return self

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, score={self.score}, top_k={self.top_k}"
