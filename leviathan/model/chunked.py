"""Causal attention in blocks of query rows, for a V narrower than q and k (CPU).

token_xcorr of rank r feeds SDPA a q and k r*d wide and a V d wide. The fused CPU kernel
wants equal widths, so V was zero-padded to r*d: r times the work in P @ V, dV and
dO @ V^T, for columns that are thrown away. This is the same attention computed in
blocks of query rows with ordinary matmuls, flash-attention style: a block of queries
meets only the keys at or before its last row (blocks above the diagonal are skipped),
only q, k, v, the output and the row log-sum-exp are kept for backward (O(T d)), and P
is rebuilt there block by block (one block's rows x T scores in flight). P @ V is d wide.

Measured (one thread, B=4 H=4 d=64, rank 2, fwd+bwd, alternating with dot's fused
kernel in one process): 1.41x dot's time at T=512 and 1.81x at T=2048; the padded SDPA
it replaces was 2.2x at T=512 (`benchmarks/attention.py` has the tables).
"""

from __future__ import annotations

import torch
from torch import Tensor


def block_rows(seq_len: int) -> int:
    """Query rows per block: 64 up to T=1024, then T/16 (larger blocks pay at long T)."""
    return max(64, seq_len // 16)


def _block_scores(q: Tensor, k: Tensor, start: int, end: int, scale: float) -> Tensor:
    """Scores of query rows start:end over keys 0:end, future keys at -inf (a new tensor:
    the callers work on it in place)."""
    s = torch.matmul(q[:, :, start:end], k[:, :, :end].transpose(-2, -1)).mul_(scale)
    n = end - start
    future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
    s[..., start:end].masked_fill_(future, float("-inf"))
    return s


class _ChunkedCausalAttention(torch.autograd.Function):
    """In place on each block's own temporaries: the out-of-place form measured 1.13x
    this one's time at T=512 and 1.22x at T=2048."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        T = q.shape[2]
        rows = block_rows(T)
        outs, lses = [], []
        for start in range(0, T, rows):
            end = min(start + rows, T)
            s = _block_scores(q, k, start, end, scale)
            m = s.amax(-1, keepdim=True)
            p = s.sub_(m).exp_()
            total = p.sum(-1, keepdim=True)
            outs.append(torch.matmul(p, v[:, :, :end]).div_(total))
            lses.append(m.add_(total.log_()))
        out, lse = torch.cat(outs, dim=2), torch.cat(lses, dim=2)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, d_out: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        q, k, v, out, lse = ctx.saved_tensors
        T = q.shape[2]
        rows = block_rows(T)
        row_dot = (d_out * out).sum(-1, keepdim=True)  # D_i = <dO_i, O_i>
        dq_blocks = []
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        for start in range(0, T, rows):
            end = min(start + rows, T)
            p = _block_scores(q, k, start, end, ctx.scale).sub_(lse[:, :, start:end]).exp_()
            d_o = d_out[:, :, start:end]
            dv[:, :, :end] += torch.matmul(p.transpose(-2, -1), d_o)
            d_s = torch.matmul(d_o, v[:, :, :end].transpose(-2, -1))
            d_s.sub_(row_dot[:, :, start:end]).mul_(p).mul_(ctx.scale)
            dq_blocks.append(torch.matmul(d_s, k[:, :, :end]))
            dk[:, :, :end] += torch.matmul(d_s.transpose(-2, -1), q[:, :, start:end])
        return torch.cat(dq_blocks, dim=2), dk, dv, None


def chunked_causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """softmax(mask(q k^T * scale)) @ v for q, k (B, H, T, e) and v (B, H, T, d), any d."""
    return _ChunkedCausalAttention.apply(q, k, v, scale)
