"""Sequence mixers (attention kinds), chosen by name from the config: see ``MIXERS``.

Every mixer is the same causal multi-head attention block (fused qkv projection, an
attention kind, output projection ``proj``, residual dropout); a kind differs only in
the lag parameters it owns and the functional in ``correlation`` it calls. A kind also
describes itself: its options in a few words (``describe``, for ``leviathan compare``),
its materialised scores and lag weights (``scores``, ``lag_weights``, for ``leviathan
inspect``). Adding a kind is one subclass and one registry entry, nothing else.

Cached generation (``forward(x, cache)``): x holds only the new positions, which follow
the ``cache.length`` positions the cache holds. A kind says, in ``lagged``, what its
attention kernel is fed (q and k as they are, filtered, or circulant keys); the keys
are cached in that form, so a new position costs one query row against them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from leviathan.errors import ConfigError
from leviathan.model import correlation
from leviathan.model.cache import LayerCache

KEY = "model.mixer"  # config path of the options, for error messages


@dataclass
class DotOptions:
    kind: str = "dot"


@dataclass
class TokenXcorrOptions:
    kind: str = "token_xcorr"
    window_q: int = 4  # Wq: query lags 0..Wq-1
    window_k: int = 4  # Wk: key lags 0..Wk-1
    rank: int = 1  # rank-one terms of the Wq x Wk kernel: 1 = separable, min(Wq, Wk) = general


@dataclass
class ChannelXcorrOptions:
    kind: str = "channel_xcorr"
    lags: int = 2  # L: channel lags -L..L


def _check_int(
    name: str, value: Any, low: int, high: int | None = None, high_text: str = ""
) -> None:
    """Raise ConfigError unless low <= value (<= high), naming the key ``model.mixer.<name>``."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if is_int and value >= low and (high is None or value <= high):
        return
    expected = f"an integer >= {low}" if high is None else f"between {low} and {high_text or high}"
    raise ConfigError(f"{KEY}.{name}: must be {expected}, got {value!r}")


class Mixer(nn.Module):
    """Causal multi-head attention, (B, T, C) -> (B, T, C); subclasses pick the scores."""

    Options: ClassVar[type] = DotOptions

    def __init__(
        self, d_model: int, n_head: int, options: Any, dropout: float = 0.0, bias: bool = False
    ) -> None:
        super().__init__()
        self.check(options, d_model, n_head)
        self.options = options
        self.d_model = d_model
        self.n_head = n_head
        self.head_dim = d_model // n_head
        self.dropout = dropout  # attention dropout, inside the kernel, only while training
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        self.reference = False  # True: the materialised T x T path (for tests), same result

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> Tensor:
        """x: (B, T, C), positions 0..T-1, or with a cache the T positions after its own."""
        B, T, C = x.shape
        q, k, v = (
            t.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
            for t in self.qkv(x).split(C, dim=2)
        )
        dropout_p = self.dropout if self.training else 0.0
        if cache is None:
            y = self.attend(q, k, v, dropout_p=dropout_p)
        else:
            y = self.attend_cached(q, k, v, cache, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> Tensor:
        """Per-head attention, (B, H, T, d) -> (B, H, T, d)."""
        return correlation.dot_attention(q, k, v, reference=self.reference, dropout_p=dropout_p)

    def attend_cached(
        self, q: Tensor, k: Tensor, v: Tensor, cache: LayerCache, dropout_p: float
    ) -> Tensor:
        """`attend` for new positions after the cached ones, which it then caches.

        Always the fast kind of path (``reference`` is not consulted); the tests hold it
        to the uncached forward.
        """
        q, k = self.lagged(q, k, cache)
        keys, values = cache.append(k, v)
        return correlation.cached_attention(q, keys, values, self.head_dim**-0.5, dropout_p)

    def lagged(self, q: Tensor, k: Tensor, cache: LayerCache) -> tuple[Tensor, Tensor]:
        """The query and key rows the attention kernel sees for these new positions."""
        return q, k

    def lag_parameters(self) -> list[nn.Parameter]:
        """The lag weights (not projections): an optimizer may want to keep them out of
        weight decay, which would pull the delta initialisation towards zero."""
        return []

    def lag_weights(self) -> Tensor | None:
        """What the lag parameters weigh, per head, as ``leviathan inspect`` draws it: a
        (H, a, b) kernel over query and key lags, or (H, n) weights of n lags; None: none."""
        return None

    def scores(self, q: Tensor, k: Tensor) -> Tensor:
        """The materialised, unmasked scores (B, H, T, T) of queries q and keys k."""
        return correlation.dot_scores(q, k)

    def residual_projections(self) -> list[nn.Parameter]:
        """The weights that write into the residual stream (GPT-2 starts them smaller)."""
        return [self.proj.weight]

    def flops_per_token(self, seq_len: int) -> int:
        """Forward FLOPs per token (2 per multiply-add) at sequence length ``seq_len``.

        Counts the qkv and output projections, the scores, P @ V and the lag filtering.
        Attention is averaged over causal positions: query i sees i + 1 keys, (T+1)/2 on
        average. Softmax, masking and biases are not counted, nor the zero padding of V that
        the CPU fallback for rank > 1 (dropout, masks) uses (it does no useful work).
        """
        return self._projection_flops() + self._attention_flops(seq_len, self.head_dim)

    def _projection_flops(self) -> int:
        return 2 * self.d_model * 3 * self.d_model + 2 * self.d_model * self.d_model

    def _attention_flops(self, seq_len: int, score_width: int) -> int:
        # 2 * H * (T+1)/2 keys * (score_width for Q.K + head_dim for P.V)
        return self.n_head * (seq_len + 1) * (score_width + self.head_dim)

    @classmethod
    def describe(cls, options: Any) -> str:
        """The options in a few words, for tables (`leviathan compare`)."""
        return options.kind

    @classmethod
    def check(cls, options: Any, d_model: int, n_head: int) -> None:
        """Validate options against the model shape; raise ConfigError naming the key."""
        if not isinstance(options, cls.Options):
            raise ConfigError(
                f"{KEY}.kind: {cls.__name__} needs {cls.Options.__name__}, "
                f"got {type(options).__name__} (kind={getattr(options, 'kind', None)!r})"
            )
        if not (isinstance(n_head, int) and n_head >= 1 and d_model % n_head == 0):
            raise ConfigError(f"model.n_head: must divide model.d_model={d_model}, got {n_head!r}")


class DotMixer(Mixer):
    """Scaled dot-product attention: the baseline, and what the others start as."""

    Options = DotOptions


class TokenXcorrMixer(Mixer):
    """Token-lag correlation: scores correlate windows of past queries and keys.

    Per head, kernel w = sum_r f_r g_r^T (Wq x Wk); S_ij = sum_ab w_ab <q_{i-a}, k_{j-b}>/sqrt(d).
    """

    Options = TokenXcorrOptions

    def __init__(
        self,
        d_model: int,
        n_head: int,
        options: TokenXcorrOptions,
        dropout: float = 0.0,
        bias: bool = False,
    ) -> None:
        super().__init__(d_model, n_head, options, dropout, bias)
        self.f = nn.Parameter(torch.empty(n_head, options.rank, options.window_q))
        self.g = nn.Parameter(torch.empty(n_head, options.rank, options.window_k))
        self.init_lags()

    @torch.no_grad()
    def init_lags(self) -> None:
        """Start as exactly ``dot``: w = f_0 g_0^T = delta at (0, 0).

        The other factors get small random f_r and zero g_r, so w is still the delta
        but g_r has a nonzero gradient (f_r's follows one step later), as in LoRA.
        All-zero factors would sit on a saddle: each one's gradient is the other, zero.
        """
        self.f.zero_()
        self.g.zero_()
        self.f[:, 0, 0] = 1.0
        self.g[:, 0, 0] = 1.0
        nn.init.normal_(self.f[:, 1:], std=0.02)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> Tensor:
        return correlation.token_xcorr_attention(
            q, k, v, self.f, self.g, reference=self.reference, dropout_p=dropout_p
        )

    def lagged(self, q: Tensor, k: Tensor, cache: LayerCache) -> tuple[Tensor, Tensor]:
        """Q~ and K~ of the new positions, filtered with the last Wq-1 (Wk-1) raw q (k)."""
        q_past = cache.history("q", q, self.options.window_q - 1)
        k_past = cache.history("k", k, self.options.window_k - 1)
        return (
            correlation.causal_lag_stack(q, self.f, q_past),
            correlation.causal_lag_stack(k, self.g, k_past),
        )

    def lag_parameters(self) -> list[nn.Parameter]:
        return [self.f, self.g]

    def lag_weights(self) -> Tensor:
        return correlation.lag_kernel(self.f, self.g)

    def scores(self, q: Tensor, k: Tensor) -> Tensor:
        return correlation.token_xcorr_scores(q, k, self.f, self.g)

    def flops_per_token(self, seq_len: int) -> int:
        o = self.options
        filtering = 2 * o.rank * (o.window_q + o.window_k) * self.d_model
        scores_and_pv = self._attention_flops(seq_len, o.rank * self.head_dim)
        return self._projection_flops() + scores_and_pv + filtering

    @classmethod
    def check(cls, options: Any, d_model: int, n_head: int) -> None:
        super().check(options, d_model, n_head)
        _check_int("window_q", options.window_q, 1)
        _check_int("window_k", options.window_k, 1)
        full = min(options.window_q, options.window_k)
        _check_int("rank", options.rank, 1, full, f"min(window_q, window_k)={full}")

    @classmethod
    def describe(cls, options: TokenXcorrOptions) -> str:
        return f"token_xcorr W={options.window_q}x{options.window_k} r={options.rank}"


class ChannelXcorrMixer(Mixer):
    """Channel-lag correlation: S_ij = <q_i, C k_j>/sqrt(d), C a learned circulant."""

    Options = ChannelXcorrOptions

    def __init__(
        self,
        d_model: int,
        n_head: int,
        options: ChannelXcorrOptions,
        dropout: float = 0.0,
        bias: bool = False,
    ) -> None:
        super().__init__(d_model, n_head, options, dropout, bias)
        self.alpha = nn.Parameter(torch.empty(n_head, 2 * options.lags + 1))
        self.init_lags()

    @torch.no_grad()
    def init_lags(self) -> None:
        """Start as exactly ``dot``: alpha = delta at lag 0 (its gradient is not zero)."""
        self.alpha.zero_()
        self.alpha[:, self.options.lags] = 1.0

    def attend(self, q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> Tensor:
        return correlation.channel_xcorr_attention(
            q, k, v, self.alpha, reference=self.reference, dropout_p=dropout_p
        )

    def lagged(self, q: Tensor, k: Tensor, cache: LayerCache) -> tuple[Tensor, Tensor]:
        return q, correlation.circulant_keys(k, self.alpha)

    def lag_parameters(self) -> list[nn.Parameter]:
        return [self.alpha]

    def lag_weights(self) -> Tensor:
        return self.alpha

    def scores(self, q: Tensor, k: Tensor) -> Tensor:
        return correlation.channel_xcorr_scores(q, k, self.alpha)

    def flops_per_token(self, seq_len: int) -> int:
        circulant = 2 * (2 * self.options.lags + 1) * self.d_model
        return super().flops_per_token(seq_len) + circulant

    @classmethod
    def check(cls, options: Any, d_model: int, n_head: int) -> None:
        super().check(options, d_model, n_head)
        head_dim = d_model // n_head
        # lags wrap around the d channels: with 2L+1 > d two lags would be the same lag
        most = (head_dim - 1) // 2
        _check_int("lags", options.lags, 0, most, f"{most} (2*lags+1 <= head_dim={head_dim})")

    @classmethod
    def describe(cls, options: ChannelXcorrOptions) -> str:
        return f"channel_xcorr L={options.lags}"


MIXERS: dict[str, type[Mixer]] = {
    "dot": DotMixer,
    "token_xcorr": TokenXcorrMixer,
    "channel_xcorr": ChannelXcorrMixer,
}
