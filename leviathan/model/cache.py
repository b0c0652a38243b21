"""The key-value cache of cached generation: what each mixer keeps between steps.

A generated token needs only its own query against every earlier key, so the keys and
values of the context are kept, exactly as the attention kernel sees them: `dot` keeps k,
`channel_xcorr` the circulant keys C k, `token_xcorr` the filtered keys K~. Filtering the
new position's q and k needs the raw q and k of the W-1 positions before it, so
`token_xcorr` also keeps those (`history`); `involution` keeps only its last K-1 values.
A step then costs O(T) at context length T instead of a forward over the whole context,
O(T^2).
"""

from __future__ import annotations

import torch
from torch import Tensor


class LayerCache:
    """One mixer's cache for a batch of B sequences that all have `length` positions.

    keys, values: (B, H, capacity, width) buffers whose first `length` rows are filled
    (allocated at the first `append`, in the dtype and device of what is appended).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.length = 0
        self.keys: Tensor | None = None
        self.values: Tensor | None = None
        self._history: dict[str, Tensor] = {}

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the keys and values (B, H, T, .) of the next T positions; return all so far."""
        start, end = self.length, self.advance(k.shape[2])
        if self.keys is None:
            B, H = k.shape[:2]
            self.keys = k.new_empty(B, H, self.capacity, k.shape[3])
            self.values = v.new_empty(B, H, self.capacity, v.shape[3])
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        return self.keys[:, :, :end], self.values[:, :, :end]

    def advance(self, n: int) -> int:
        """Count n more positions (a kind that keeps only `history`, involution); the end."""
        end = self.length + n
        if end > self.capacity:
            raise ValueError(f"cache holds {self.capacity} positions, {end} asked for")
        self.length = end
        return end

    def history(self, name: str, x: Tensor, keep: int) -> Tensor | None:
        """The last `keep` rows of signal `name` before x (B, H, T, d), fewer near the start
        (None when there are none); remembers the last `keep` rows including x for the next
        call. Call it before `append` of the same step."""
        past = self._history.get(name)
        if keep > 0:
            full = x if past is None else torch.cat([past, x], dim=2)
            # standard strides whatever full was (a compiled step guards on them)
            self._history[name] = full[:, :, -keep:].clone(memory_format=torch.contiguous_format)
        return past


class KVCache:
    """The caches of every layer of a model for one batch of sequences being generated."""

    def __init__(self, n_layer: int, capacity: int) -> None:
        self.layers = [LayerCache(capacity) for _ in range(n_layer)]

    @property
    def length(self) -> int:
        """Positions cached: the next input starts at this position."""
        return self.layers[0].length
