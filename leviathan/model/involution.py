"""Generated lag filters (docs/design.md, Mixers): involution and involution in correlation.

A filter generated per position from that position's own input (involution, Li et al.
2021; fairseq's dynamic convolution) weighs the lags of a signal:
``y[..., i, :] = sum_a w[..., i, a] * x[..., i - a, :]``, x zero before the start. Each
kind has a fast path (the lags as shifted views, O(T W d)) and a reference path that
materialises the T x T matrix the filter makes (`involution`) or the score matrix
(`inv_xcorr`); the tests hold both to numpy loops.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from leviathan.model.correlation import _sdpa, causal_softmax_attend, with_history

__all__ = ["generated_lag_stack", "banded", "involution", "inv_xcorr_scores", "inv_xcorr_attention"]


def generated_lag_stack(x: Tensor, weights: Tensor, history: Tensor | None = None) -> Tensor:
    """`causal_lag_stack` with a filter per position: x (B, H, T, d), weights
    (B, H, T, r, W), ``weights[b, h, i, r, a]`` multiplies x at i - a. Returns (B, H, T, r*d);
    a filter equal to e_0 returns x bit for bit. history: the positions before x (cache)."""
    B, H, T, d = x.shape
    rank, width = weights.shape[-2:]
    x, _ = with_history(x, width, history)
    return _LagSum.apply(x, weights).reshape(B, H, T, rank * d)


class _LagSum(torch.autograd.Function):
    """y[..., i, r, :] = sum_a w[..., i, r, a] x[..., P+i-a, :] over the lags that reach
    x: x (B, H, P+T, d) holds P positions of history before the T that weights
    (B, H, T, r, W) filter; y (B, H, T, r, d).

    Both passes accumulate lag by lag into one buffer, on x as it is (no padded copy):
    autograd over a sum of W shifted products kept a gradient buffer the size of x for
    every lag (measured at K=31, T=256: 35 MiB for an x of 1 MiB; now 4.8 MiB)."""

    @staticmethod
    def forward(ctx, x: Tensor, weights: Tensor) -> Tensor:
        ctx.save_for_backward(x, weights)
        *lead, T, rank, width = weights.shape
        dtype = torch.promote_types(x.dtype, weights.dtype)  # bf16 x, fp32 filters
        y = x.new_zeros(*lead, T, rank, x.shape[-1], dtype=dtype)
        for a, out, src in _lags(x.shape[-2] - T, T, width):
            y[..., out, :, :].addcmul_(weights[..., out, :, a, None], x[..., src, None, :])
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, weights = ctx.saved_tensors
        T, width = weights.shape[-3], weights.shape[-1]
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weights) if ctx.needs_input_grad[1] else None
        for a, out, src in _lags(x.shape[-2] - T, T, width):
            g = grad[..., out, :, :]
            if grad_x is not None:
                grad_x[..., src, :] += (g * weights[..., out, :, a, None]).sum(-2)
            if grad_w is not None:
                grad_w[..., out, :, a] = (g * x[..., src, None, :]).sum(-1)
        return grad_x, grad_w


def _lags(past: int, T: int, width: int) -> list[tuple[int, slice, slice]]:
    """(a, the outputs lag a reaches, the rows of x they read) for each lag that reaches x:
    output i reads row past + i - a, which exists from i = max(0, a - past) on."""
    return [
        (a, slice(max(0, a - past), T), slice(past + max(0, a - past) - a, past + T - a))
        for a in range(width)
        if a - past < T
    ]


def banded(weights: Tensor) -> Tensor:
    """The (B, H, T, T) matrix M of per-position filters (B, H, T, W): M[i, i-a] = w[i, a]."""
    T, width = weights.shape[-2:]
    return sum(torch.diag_embed(weights[..., a:, a], offset=-a) for a in range(min(width, T)))


def involution(v: Tensor, weights: Tensor, *, reference: bool) -> Tensor:
    """y_i = sum_{a<K} w_{i,a} v_{i-a} per group: v (B, G, T, d), weights (B, G, T, K).

    Reference: M @ v with M the materialised T x T band of the filters."""
    if reference:
        return banded(weights) @ v
    return generated_lag_stack(v, weights.unsqueeze(-2))


def inv_xcorr_scores(q: Tensor, k: Tensor, f: Tensor, g: Tensor) -> Tensor:
    """S_ij = (1/sqrt d) sum_{r,a,b} f_{i,r,a} g_{j,r,b} <q_{i-a}, k_{j-b}>, unmasked.

    f: (B, H, T, r, Wq), g: (B, H, T, r, Wk), per-position filters. As
    `token_xcorr_scores`, from shifted copies of S0 = q k^T, each weighted per row and column.
    """
    T, d = q.shape[-2:]
    window_q, window_k = f.shape[-1], g.shape[-1]
    s0 = torch.nn.functional.pad(q @ k.transpose(-2, -1), (window_k - 1, 0, window_q - 1, 0))
    rows, cols = window_q - 1, window_k - 1
    s = sum(
        f[..., :, r, a, None]
        * g[..., None, :, r, b]
        * s0[..., rows - a : rows - a + T, cols - b : cols - b + T]
        for r in range(f.shape[-2])
        for a in range(window_q)
        for b in range(window_k)
    )
    return s * d**-0.5


def inv_xcorr_attention(
    q: Tensor, k: Tensor, v: Tensor, f: Tensor, g: Tensor, *, reference: bool, dropout_p: float
) -> Tensor:
    """Token-lag correlation attention with per-position filters f (B, H, T, r, Wq) and
    g (B, H, T, r, Wk). Fast path: Q~_i = [sum_a f_{i,r,a} q_{i-a}]_r, K~ likewise, then
    SDPA (causal) at scale 1/sqrt(d); no T x T matrix."""
    if reference:
        return causal_softmax_attend(inv_xcorr_scores(q, k, f, g), v, dropout_p)
    q_lags, k_lags = generated_lag_stack(q, f), generated_lag_stack(k, g)
    return _sdpa(q_lags, k_lags, v, q.shape[-1] ** -0.5, dropout_p)
