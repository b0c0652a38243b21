"""Rotary position embeddings (RoFormer): position i rotates each channel pair of q and k
by i * theta_p, so <R_i q, R_j k> depends on i - j only.

token_xcorr stays relative with them when q and k are rotated before the lag filter:
sum_ab w_ab <R_{i-a} q_{i-a}, R_{j-b} k_{j-b}> depends on the offsets (i-a) - (j-b) alone.
channel_xcorr does not: its circulant mixes channels of different rotation frequencies.
"""

from __future__ import annotations

import torch
from torch import Tensor

BASE = 10_000.0


def rope_angles(positions: Tensor, dim: int, base: float = BASE) -> tuple[Tensor, Tensor]:
    """cos and sin, (T, dim/2), of positions (T,) times theta_p = base^(-2p/dim), computed
    in float64 (angles reach T radians: float32 would lose their low digits)."""
    if dim % 2:
        raise ValueError(f"rotary embeddings need an even head dimension, got {dim}")
    exponents = torch.arange(0, dim, 2, device=positions.device, dtype=torch.float64) / dim
    angles = positions.double()[:, None] * (base**-exponents)[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the channel pairs (x[2p], x[2p+1]) of x (B, H, T, d) by the tables' angles."""
    pairs = x.unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(-2)
