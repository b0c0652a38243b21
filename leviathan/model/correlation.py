"""Correlation attention as pure functions on per-head tensors (docs/design.md, Mixers).

Every function takes q, k, v of shape (B, H, T, d) and returns (B, H, T, d).

Each kind has two paths that compute the same thing:

- fast (``reference=False``): the lags are folded into the inputs (causal filtering of
  q and k, or a circulant applied to k) and the rest is
  ``F.scaled_dot_product_attention(..., is_causal=True)``, so the fused (flash)
  kernels run and no T x T matrix is ever built;
- reference (``reference=True``): the score matrix is materialised exactly as the
  formula reads, masked, softmaxed and applied to v. Slow and obviously correct; the
  tests hold the fast path to it.

Positions before the start of the sequence are zero (x_t = 0 for t < 0), so the score
of query i only ever involves q and k at positions <= i: causal by construction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from leviathan.model.chunked import chunked_causal_attention

__all__ = [
    "causal_lag_stack",
    "causal_depthwise_conv",
    "lag_kernel",
    "circulant_keys",
    "dot_scores",
    "token_xcorr_scores",
    "channel_xcorr_scores",
    "causal_softmax_attend",
    "dot_attention",
    "token_xcorr_attention",
    "channel_xcorr_attention",
    "cached_attention",
]


# --- building blocks ---------------------------------------------------------------


def with_history(x: Tensor, width: int, history: Tensor | None) -> tuple[Tensor, int]:
    """x (B, H, T, d) with `history`, the positions before it, in front, and how many
    there are: filters of `width` lags reach back width - 1, so no more are taken."""
    past = 0 if history is None else history.shape[2]
    if past > width - 1:
        raise ValueError(f"history of {past} positions, the filters reach back {width - 1}")
    return (torch.cat([history, x], dim=2) if past else x), past


def _lag_views(x: Tensor, width: int, history: Tensor | None) -> list[Tensor]:
    """x (B, H, T, d) delayed by a = 0..width-1 positions: views of one left-padded copy,
    `history` (the h <= width-1 positions before x) or zeros shifted in."""
    T = x.shape[2]
    x, past = with_history(x, width, history)
    padded = F.pad(x, (0, 0, width - 1 - past, 0))
    return [padded[:, :, width - 1 - a : width - 1 - a + T] for a in range(width)]


def causal_lag_stack(x: Tensor, weights: Tensor, history: Tensor | None = None) -> Tensor:
    """Causally filter x along time with each of r filters and stack the results.

    x: (B, H, T, d); weights: (H, r, W), filter ``weights[h, r, a]`` multiplies lag a.
    Returns (B, H, T, r*d) whose r-th block of d channels is
    ``y[..., i, :] = sum_a weights[h, r, a] * x[..., i - a, :]`` (x_t = 0 for t < 0).
    A filter equal to e_0 returns x bit for bit (1*x + 0*... is exact).

    history: (B, H, h, d), h <= W-1, the positions just before x (cached generation);
    None: x starts the sequence. Either way the output covers x's T positions only, and
    each row is the same sum in the same order as when filtering the whole sequence.
    """
    n_head, rank, width = weights.shape
    B, H, T, d = x.shape
    if H != n_head:
        raise ValueError(f"weights have {n_head} heads, x has {H}")
    views = _lag_views(x, width, history)
    y = sum(weights[:, :, a, None, None] * v.unsqueeze(2) for a, v in enumerate(views))
    return y.transpose(2, 3).reshape(B, H, T, rank * d)  # (B, H, r, T, d) -> (B, H, T, r*d)


def causal_depthwise_conv(x: Tensor, weights: Tensor, history: Tensor | None = None) -> Tensor:
    """Causal convolution of each channel of x along time with its own filter (Primer's
    depthwise convolution): x (B, H, T, d), weights (H, d, K), ``weights[h, c, a]``
    multiplies lag a of channel c of head h; ``y[..., i, c] = sum_a w[c, a] x[..., i-a, c]``.
    A filter equal to e_0 returns x bit for bit. history: as for `causal_lag_stack`."""
    if weights.shape[:2] != x.shape[1::2]:
        raise ValueError(f"weights {tuple(weights.shape)} do not fit x {tuple(x.shape)}")
    views = _lag_views(x, weights.shape[2], history)
    return sum(weights[None, :, None, :, a] * v for a, v in enumerate(views))


def lag_kernel(f: Tensor, g: Tensor) -> Tensor:
    """The per-head token-lag kernel w = sum_r f_r g_r^T: (H, r, Wq), (H, r, Wk) -> (H, Wq, Wk)."""
    return torch.einsum("hra,hrb->hab", f, g)


def circulant_keys(k: Tensor, alpha: Tensor) -> Tensor:
    """K' = C k with C circulant: ``sum_tau alpha[h, tau + L] * k[..., (c + tau) mod d]``.

    alpha: (H, 2L+1) for lags tau = -L..L. ``torch.roll(k, -tau)[c] == k[(c + tau) mod d]``.
    """
    lags = (alpha.shape[-1] - 1) // 2
    return sum(
        alpha[:, i, None, None] * torch.roll(k, shifts=-(i - lags), dims=-1)
        for i in range(alpha.shape[-1])
    )


# --- materialised scores (reference path and test oracles) --------------------------
# All return the full (B, H, T, T) pre-softmax matrix, scaled by 1/sqrt(d) and NOT
# masked: entries j > i exist (they involve future keys) and the causal mask removes them.


def dot_scores(q: Tensor, k: Tensor) -> Tensor:
    """S_ij = <q_i, k_j> / sqrt(d), unmasked."""
    return (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5


def token_xcorr_scores(q: Tensor, k: Tensor, f: Tensor, g: Tensor) -> Tensor:
    """S_ij = (1/sqrt d) sum_{a<Wq, b<Wk} w_ab <q_{i-a}, k_{j-b}>, unmasked.

    That is the full 2-D convolution of S0 = q k^T with w = sum_r f_r g_r^T, cropped to
    T x T (``scipy.signal.convolve2d(S0, w)[:T, :T]``): shifting S0 down by a rows and
    right by b columns, with zeros shifted in, gives <q_{i-a}, k_{j-b}>.
    """
    w = lag_kernel(f, g)  # (H, Wq, Wk)
    _, window_q, window_k = w.shape
    T = q.shape[-2]
    s0 = F.pad(q @ k.transpose(-2, -1), (window_k - 1, 0, window_q - 1, 0))
    s = sum(
        w[:, a, b, None, None]
        * s0[..., window_q - 1 - a : window_q - 1 - a + T, window_k - 1 - b : window_k - 1 - b + T]
        for a in range(window_q)
        for b in range(window_k)
    )
    return s * q.shape[-1] ** -0.5


def channel_xcorr_scores(q: Tensor, k: Tensor, alpha: Tensor) -> Tensor:
    """S_ij = (1/sqrt d) sum_tau alpha_tau sum_c q_i[c] k_j[(c + tau) mod d], unmasked.

    One materialised score matrix per lag tau, weighted and summed.
    """
    lags = (alpha.shape[-1] - 1) // 2
    s = sum(
        alpha[:, i, None, None] * (q @ torch.roll(k, shifts=-(i - lags), dims=-1).transpose(-2, -1))
        for i in range(alpha.shape[-1])
    )
    return s * q.shape[-1] ** -0.5


def causal_softmax_attend(scores: Tensor, v: Tensor | None, dropout_p: float = 0.0) -> Tensor:
    """Mask j > i with -inf, softmax over j, optional dropout on P, then P @ v (v None: P)."""
    T = scores.shape[-1]
    future = torch.ones(T, T, dtype=torch.bool, device=scores.device).triu(1)
    p = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    if dropout_p > 0.0:
        p = F.dropout(p, p=dropout_p)
    return p if v is None else p @ v


# --- attention ----------------------------------------------------------------------


def _sdpa(
    q: Tensor, k: Tensor, v: Tensor, scale: float, dropout_p: float, mask: Tensor | None = None
) -> Tensor:
    """SDPA, causal unless a boolean `mask` is given, for a V as wide as q or narrower (the
    lag stack's q and k are r*d wide, V is d).

    A narrower V: on CUDA SDPA takes it as it is (the memory-efficient kernel accepts any
    V width). The fused CPU kernel wants equal widths (else the math path: ~3x the time
    and memory at T=4096), so on CPU the causal case runs `chunked_causal_attention`,
    d wide in P @ V; what it does not cover (dropout, a mask, half precision) gets V
    zero-padded to q's width and the output sliced back.
    """
    d, width = v.shape[-1], q.shape[-1]
    if width != d and v.device.type == "cpu":
        if mask is None and dropout_p == 0.0 and v.dtype in (torch.float32, torch.float64):
            return chunked_causal_attention(q, k, v, scale)
        v = F.pad(v, (0, width - d))
    y = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None, scale=scale
    )
    return y[..., :d]


def cached_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float, dropout_p: float = 0.0
) -> Tensor:
    """Causal attention of the Tq queries of the last positions over the keys and values of
    all Tk positions (a cache followed by the new ones): query i is position Tk - Tq + i.

    q and k are the kernel's inputs (filtered, circulant: whatever the kind feeds SDPA), so
    this serves every kind. One new query (a generation step) sees every key: no mask, and
    no padding of V (that would copy the whole cache per token); a first block (Tk == Tq,
    the prompt) is plain causal.
    """
    n_query, n_key = q.shape[-2], k.shape[-2]
    start = n_key - n_query
    if n_query == 1:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    mask = None  # query row i is position start + i: it sees keys j <= start + i
    if start:
        mask = torch.ones(n_query, n_key, dtype=torch.bool, device=q.device).tril(start)
    return _sdpa(q, k, v, scale, dropout_p, mask)


def dot_attention(
    q: Tensor, k: Tensor, v: Tensor, *, reference: bool, dropout_p: float = 0.0
) -> Tensor:
    """Causal scaled dot-product attention: the baseline every other kind reduces to."""
    if reference:
        return causal_softmax_attend(dot_scores(q, k), v, dropout_p)
    return _sdpa(q, k, v, q.shape[-1] ** -0.5, dropout_p)


def token_xcorr_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    f: Tensor,
    g: Tensor,
    *,
    reference: bool,
    dropout_p: float = 0.0,
) -> Tensor:
    """Token-lag correlation attention with kernel w = sum_r f_r g_r^T per head.

    f: (H, r, Wq) query filters, g: (H, r, Wk) key filters.

    Fast path: Q~ = [f_1 * q, ..., f_r * q] and K~ likewise (causal filters, r*d wide), so
    <Q~_i, K~_j> = sum_ab w_ab <q_{i-a}, k_{j-b}> and SDPA does the rest. The scale stays
    1/sqrt(d), not 1/sqrt(r*d); V stays d wide (`_sdpa`).
    """
    if f.shape[:2] != g.shape[:2]:
        raise ValueError(f"f {tuple(f.shape)} and g {tuple(g.shape)} differ in heads or rank")
    if reference:
        return causal_softmax_attend(token_xcorr_scores(q, k, f, g), v, dropout_p)
    q_lags, k_lags = causal_lag_stack(q, f), causal_lag_stack(k, g)
    return _sdpa(q_lags, k_lags, v, q.shape[-1] ** -0.5, dropout_p)


def channel_xcorr_attention(
    q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, *, reference: bool, dropout_p: float = 0.0
) -> Tensor:
    """Channel-lag correlation attention: S_ij = <q_i, C k_j>/sqrt(d), C circulant from alpha.

    alpha: (H, 2L+1), weights of lags tau = -L..L. Fast path: K' = C k, then SDPA.
    """
    if reference:
        return causal_softmax_attend(channel_xcorr_scores(q, k, alpha), v, dropout_p)
    return _sdpa(q, circulant_keys(k, alpha), v, q.shape[-1] ** -0.5, dropout_p)
