"""Configuration of a sparse Mixture-of-Experts FFN layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class MoEOptions:
    """What the layer computes. How its experts are laid out over ranks is not part of
    it: that is the caller's `MoE.shard_experts(group)`."""

    kind: str = "moe"
    n_experts: int = 8
    top_k: int = 2  # 1: Switch, 2: Mixtral, any k <= n_experts
    n_shared: int = 0  # shared experts that see every token
    expert_hidden_mult: float = 4.0  # expert width = mult * d_model; fine-grained: e.g. 0.5
    activation: Literal["gelu", "swiglu"] = "gelu"
    capacity_factor: float | None = None  # None: dropless; else capacity = ceil(k*T/E*factor)
    # sequence: T is a sequence's length and slots go in position order within each
    # sequence (causal); batch: T counts the whole batch, which competes for one pool
    # (rows of the batch take slots from each other: not causal, for comparison only)
    capacity_policy: Literal["sequence", "batch"] = "sequence"
    capacity_seq_len: int | None = None  # sequence policy's T; None: the input's length
    score: Literal["softmax", "sigmoid"] = "softmax"
    renormalize: bool = True  # renormalise the top-k gate weights to sum to 1
    jitter: float = 0.0  # multiplicative input noise U(1-eps, 1+eps) on the router, training only
    balance: Literal["aux", "loss_free", "none"] = "aux"
    aux_coef: float = 0.01  # Switch load-balancing loss coefficient (balance: aux)
    z_coef: float = 0.001  # router z-loss coefficient (any balance mode)
    bias_rate: float = 0.001  # loss-free bias update rate (balance: loss_free)
    # loop: one hand-fused pass per expert; grouped: torch's grouped GEMM; auto: grouped
    # where torch has a fused kernel (CUDA bf16 on SM 9.x/10.x, aligned), the loop elsewhere
    expert_matmul: Literal["auto", "loop", "grouped"] = "auto"
    moe_every: int = 1  # MoE in every n-th block (the last of each n), dense FFNs elsewhere


def check_options(o: MoEOptions) -> None:
    """Raise ValueError naming the offending field (the caller adds its config path)."""
    positive_ints = {"n_experts": o.n_experts, "top_k": o.top_k, "moe_every": o.moe_every}
    for name, value in positive_ints.items():
        if value < 1:
            raise ValueError(f"{name}: must be >= 1, got {value}")
    if o.top_k > o.n_experts:
        raise ValueError(f"top_k: must be <= n_experts ({o.n_experts}), got {o.top_k}")
    if o.n_shared < 0:
        raise ValueError(f"n_shared: must be >= 0, got {o.n_shared}")
    if o.expert_hidden_mult <= 0:
        raise ValueError(f"expert_hidden_mult: must be positive, got {o.expert_hidden_mult}")
    if o.capacity_factor is not None and o.capacity_factor <= 0:
        raise ValueError(
            f"capacity_factor: must be positive (omit it for dropless), got {o.capacity_factor}"
        )
    if o.capacity_policy not in ("sequence", "batch"):
        raise ValueError(f"capacity_policy: expected sequence or batch, got {o.capacity_policy!r}")
    if o.expert_matmul not in ("auto", "loop", "grouped"):
        raise ValueError(f"expert_matmul: expected auto, loop or grouped, got {o.expert_matmul!r}")
    if o.capacity_seq_len is not None and o.capacity_seq_len < 1:
        raise ValueError(f"capacity_seq_len: must be >= 1, got {o.capacity_seq_len}")
    for name in ("jitter", "aux_coef", "z_coef", "bias_rate"):
        if getattr(o, name) < 0:
            raise ValueError(f"{name}: must be >= 0, got {getattr(o, name)}")
    if o.jitter >= 1:
        raise ValueError(f"jitter: must be < 1, got {o.jitter}")
