"""Token dispatch: group the (token, expert) assignments by expert and scatter results back.

Dropless (default): every assignment is kept; one stable sort by expert id gives each
expert one contiguous slice of exactly its tokens (no padding, no (T, E, C) one-hot).

Capacity mode: each expert keeps at most `capacity = ceil(k * T / E * factor)`
assignments from each group of T consecutive tokens. Priority rule: within a group,
assignments are ranked in POSITION order - by token position, then by choice slot
0..k-1 (the row-major order of the (T, k) index tensor) - and an expert keeps its first
`capacity` of them. With one group per sequence (the `sequence` policy) a token's fate
depends only on the tokens at or before it in its own sequence: causal. With the whole
batch as one group (`batch`) earlier rows take slots from later ones. A dropped
assignment contributes zero, so for that slot the token passes through the residual
unchanged.

A `Dispatcher` takes the plan's rows to their experts and the gated outputs back to
their tokens. `LocalDispatch` (every expert on this process) fuses gather -> expert ->
gated scatter-add expert by expert; `gather` and `combine` are the whole-tensor halves
that the expert-parallel one (`moe.parallel.AllToAllDispatch`) puts around its exchange.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from moe.experts import Experts


@dataclass
class Plan:
    """Where each kept assignment goes; rows are grouped by expert in expert-id order.

    N kept rows out of the T*k assignments.
    """

    token_idx: torch.Tensor  # (N,) token of each kept row
    slot_idx: torch.Tensor  # (N,) flat assignment t * k + j of each kept row
    counts: list[int]  # (E,) kept rows per expert: the slice lengths
    # (E,) assignments routed to each expert, before any dropping: CPU bookkeeping, read
    # off the one host transfer the split sizes need anyway (no extra sync per layer)
    routed: torch.Tensor
    dropped_idx: torch.Tensor | None = None  # flat assignments dropped (None: dropless)

    @property
    def dropped(self) -> int:
        """Assignments dropped for capacity (0 when dropless)."""
        return 0 if self.dropped_idx is None else self.dropped_idx.numel()


def capacity(n_tokens: int, n_experts: int, top_k: int, factor: float) -> int:
    """Per-expert slot count ceil(k * T / E * factor), evaluated in that order."""
    return math.ceil(top_k * n_tokens / n_experts * factor)


def plan(
    indices: torch.Tensor, n_experts: int, cap: int | None = None, group: int | None = None
) -> Plan:
    """Sort the (T, k) assignments by expert (stable: position order within an expert).

    With `cap`, an expert keeps its first `cap` assignments of every `group` consecutive
    tokens (None: of all of them); the rest are dropped.
    """
    top_k = indices.shape[1]
    flat = indices.reshape(-1)
    routed = torch.bincount(flat, minlength=n_experts)
    if cap is None:
        order = torch.argsort(flat, stable=True)
        counts = routed.tolist()
        return Plan(order // top_k, order, counts, torch.tensor(counts, device="cpu"))
    n_groups = 1 if group is None else -(-indices.shape[0] // group)
    # one key per (expert, group): a stable sort by it groups by expert, then by group,
    # in position order; an assignment's rank within its key decides its fate
    key = (
        flat
        if group is None
        else flat * n_groups + torch.arange(flat.numel(), device=flat.device) // (group * top_k)
    )
    order = torch.argsort(key, stable=True)
    sizes = torch.bincount(key, minlength=n_experts * n_groups)
    starts = sizes.cumsum(0) - sizes
    rank = torch.arange(flat.numel(), device=flat.device) - starts[key[order]]
    keep = rank < cap
    kept_order = order[keep]
    kept = torch.bincount(flat[kept_order], minlength=n_experts)
    counts, routed_host = torch.stack([kept, routed]).tolist()  # one host transfer
    routed_cpu = torch.tensor(routed_host, device="cpu")
    return Plan(kept_order // top_k, kept_order, counts, routed_cpu, order[~keep])


def drops_per_position(p: Plan, top_k: int, seq_len: int) -> torch.Tensor:
    """(seq_len,) dropped assignments at each position of the sequences (all rows summed)."""
    if p.dropped_idx is None:
        return torch.zeros(seq_len, dtype=torch.long, device="cpu")
    pos = (p.dropped_idx // top_k) % seq_len
    return torch.bincount(pos, minlength=seq_len).cpu()


def gather(x: torch.Tensor, p: Plan) -> torch.Tensor:
    """Gather the tokens (T, d) into expert-grouped rows (N, d) (the expert-parallel path;
    a single process fuses gather, experts and combine per expert in `Experts.forward`)."""
    return x.index_select(0, p.token_idx)


def combine(y: torch.Tensor, gates: torch.Tensor, p: Plan, n_tokens: int) -> torch.Tensor:
    """Weight expert outputs (N, d) by their gates (T, k) and sum them per token -> (T, d).

    Dropped assignments have no row, so they add nothing.
    """
    g = kept_gates(gates, p, y.dtype)
    return y.new_zeros(n_tokens, y.shape[1]).index_add_(0, p.token_idx, y * g.unsqueeze(1))


def kept_gates(gates: torch.Tensor, p: Plan, dtype: torch.dtype) -> torch.Tensor:
    """(N,) the gate of each kept row, from the router's (T, k) gates."""
    return gates.reshape(-1).index_select(0, p.slot_idx).to(dtype)


class Dispatcher(Protocol):
    """Dispatch, experts, combine: x (T, d) -> (T, d), each token the gated sum of its kept
    assignments' expert outputs. How the rows reach the experts is the layout's business;
    the layer holds one dispatcher and `MoE.shard_experts` swaps it."""

    def __call__(
        self, x: torch.Tensor, gates: torch.Tensor, p: Plan, experts: Experts
    ) -> torch.Tensor: ...


class LocalDispatch:
    """Every expert on this process: `Experts.forward` gathers, runs and gate-adds one
    expert at a time, so no (T*k, d) tensor of all the rows is ever built."""

    def __call__(
        self, x: torch.Tensor, gates: torch.Tensor, p: Plan, experts: Experts
    ) -> torch.Tensor:
        return experts(x, p.token_idx, p.counts, kept_gates(gates, p, x.dtype))
