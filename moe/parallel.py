"""Expert parallelism: experts split over the ranks of a group, tokens sent by all-to-all.

Every rank routes its own tokens with a replicated router and sorts them by global expert
id, which also groups them by destination rank (rank r owns experts r*E_local ..
(r+1)*E_local-1). The rows are exchanged with autograd-aware all-to-alls, so the
backward pass sends gradients back along the same paths.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import FunctionCtx

from moe.dispatch import Plan, combine, gather
from moe.experts import Experts


class AllToAll(torch.autograd.Function):
    """all_to_all_single whose backward sends the gradients back along the same paths."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any
    ) -> torch.Tensor:
        import torch.distributed as dist

        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor, None, None, None]:
        out_splits, in_splits = ctx.splits
        return AllToAll.apply(grad.contiguous(), in_splits, out_splits, ctx.group), None, None, None


def exchange_and_run(
    x_sorted: torch.Tensor, counts: list[int], experts: Experts, group: Any
) -> torch.Tensor:
    """Run the owning ranks' experts on rows grouped by global expert; rows come back in order.

    x_sorted: (N, d) this rank's assignments grouped by global expert id; counts: (E,) rows
    per global expert. Returns (N, d) expert outputs aligned with x_sorted (ungated).
    """
    import torch.distributed as dist

    ep_size, n_local = dist.get_world_size(group), experts.n_local
    send = torch.tensor(counts, dtype=torch.long, device=x_sorted.device)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # plain ints: split sizes for the rows
    recv = recv.view(ep_size, n_local)  # [source rank, local expert]
    send_splits = send.view(ep_size, n_local).sum(1).tolist()
    recv_splits = recv.sum(1).tolist()

    x_recv = AllToAll.apply(x_sorted, recv_splits, send_splits, group)
    # Received rows are source-major; the experts visit them expert-major (perm) and
    # write each result back to its received row.
    local_ids = torch.arange(n_local, device=x_sorted.device).repeat(ep_size)
    perm = torch.argsort(torch.repeat_interleave(local_ids, recv.reshape(-1)), stable=True)
    y_recv = experts(x_recv, perm, recv.sum(0).tolist())
    return AllToAll.apply(y_recv, send_splits, recv_splits, group)


class AllToAllDispatch:
    """Experts split over the ranks of `group`: each rank sends its rows to the ranks that
    own their experts and gets the outputs back, then weights and sums them itself."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def __call__(
        self, x: torch.Tensor, gates: torch.Tensor, p: Plan, experts: Experts
    ) -> torch.Tensor:
        ys = exchange_and_run(in_autocast_dtype(gather(x, p)), p.counts, experts, self.group)
        return combine(ys, gates, p, x.shape[0])


def in_autocast_dtype(x: torch.Tensor) -> torch.Tensor:
    """x in the autocast dtype when autocast is on: the experts compute in it anyway, and
    the rows sent both ways then cost half the bytes of fp32 ones."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.is_floating_point():
        return x.to(torch.get_autocast_dtype(device))
    return x
