"""Sequence mixers (attention kinds), chosen by name from the config: see ``MIXERS``.

Every mixer is the same causal multi-head attention block (fused qkv projection, an
attention kind, output projection ``proj``, residual dropout); a kind differs only in
the lag parameters it owns and the functional in ``correlation`` it calls. The kinds
with generated filters (``involution``, ``inv_xcorr``: functionals in ``involution``)
override ``mix``, the heads' outputs before ``proj``, as they need the input itself;
``involution`` has no q or k, only v (``projections``) and its groups as heads. A kind also
describes itself: its options in a few words (``describe``, for ``leviathan compare``),
its materialised scores and lag weights (``scores``, ``lag_weights``, for ``leviathan
inspect``). Adding a kind is one subclass and one registry entry, nothing else.

Cached generation (``forward(x, cache)``): x holds only the new positions, which follow
the ``cache.length`` positions the cache holds. A kind says, in ``lagged``, what its
attention kernel is fed (q and k as they are, filtered, or circulant keys); the keys
are cached in that form, so a new position costs one query row against them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leviathan.errors import ConfigError
from leviathan.model import correlation, involution
from leviathan.model.cache import LayerCache
from leviathan.model.rope import apply_rope, rope_angles

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
class DconvOptions:
    kind: str = "dconv"
    kernel: int = 3  # K: each channel of q, k and v filtered over lags 0..K-1 (Primer: 3)


@dataclass
class ChannelXcorrOptions:
    kind: str = "channel_xcorr"
    lags: int = 2  # L: channel lags -L..L


@dataclass
class InvolutionOptions:
    kind: str = "involution"
    kernel: int | list[int] = 7  # K lags 0..K-1, or one K per layer (lightconv: 3, 7, 15, 31)
    groups: int | None = None  # G channel groups, one generated filter each; None: C/16
    reduction: int = 4  # r: the generator's hidden layer is C/r wide
    softmax: bool = True  # normalise each filter over its K lags (fairseq's LM lightconv)


@dataclass
class InvXcorrOptions(TokenXcorrOptions):
    kind: str = "inv_xcorr"
    reduction: int = 4  # r: the filter generator's hidden layer is C/r wide


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
    # why the kind cannot take rotary positions (model.positions=rope), or None: it can
    refuses_rope: ClassVar[str | None] = None
    projections: ClassVar[int] = 3  # C-wide input projections in `qkv`: q, k, v (or v alone)
    # True: filters made per token from its input; `generated_lag_weights(x)` gives them
    # (B, T, ...), each as `lag_weights`
    generates: ClassVar[bool] = False
    first_lag: ClassVar[int | None] = None  # lag of an (H, n) `lag_weights`' column 0; None: -n//2

    def __init__(
        self,
        d_model: int,
        n_head: int,
        options: Any,
        dropout: float = 0.0,
        bias: bool = False,
        rope: bool = False,
    ) -> None:
        super().__init__()
        self.check(options, d_model, n_head)
        if rope:
            self.check_rope(d_model, n_head)
        self.rope = rope  # rotate q and k by their positions before anything else
        self.options = options
        self.d_model = d_model
        self.n_head = n_head
        self.head_dim = d_model // n_head
        self.dropout = dropout  # attention dropout, inside the kernel, only while training
        self.qkv = nn.Linear(d_model, self.projections * d_model, bias=bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        self.reference = False  # True: the materialised T x T path (for tests), same result

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> Tensor:
        """x: (B, T, C), positions 0..T-1, or with a cache the T positions after its own."""
        B, T, C = x.shape
        y = self.mix(x, cache).transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))

    def mix(self, x: Tensor, cache: LayerCache | None) -> Tensor:
        """The heads' outputs (B, H, T, d) before the output projection."""
        q, k, v = self.heads(x, 0 if cache is None else cache.length)
        dropout_p = self.dropout if self.training else 0.0
        if cache is None:
            return self.attend(q, k, v, dropout_p=dropout_p)
        return self.attend_cached(q, k, v, cache, dropout_p=dropout_p)

    def heads(self, x: Tensor, start: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v (B, H, T, d) of x (B, T, C) at positions start.., q and k rotated (rope)."""
        B, T, C = x.shape
        q, k, v = (
            t.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
            for t in self.qkv(x).split(C, dim=2)
        )
        if self.rope:
            angles = rope_angles(torch.arange(start, start + T, device=x.device), self.head_dim)
            q, k = apply_rope(q, *angles), apply_rope(k, *angles)
        return q, k, v

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

    def causal_weights(self, x: Tensor) -> Tensor:
        """The causal weights P (B, H, T, T) this mixer applies to its values at input x
        (`leviathan inspect`'s distance profile): the softmax of the masked scores."""
        q, k, _ = self.heads(x)
        return correlation.causal_softmax_attend(self.scores(q, k), None)

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
        return 2 * self.d_model * (self.projections + 1) * self.d_model

    def _attention_flops(self, seq_len: int, score_width: int) -> int:
        # 2 * H * (T+1)/2 keys * (score_width for Q.K + head_dim for P.V)
        return self.n_head * (seq_len + 1) * (score_width + self.head_dim)

    @classmethod
    def describe(cls, options: Any) -> str:
        """The options in a few words, for tables (`leviathan compare`)."""
        return options.kind

    @classmethod
    def for_layer(cls, options: Any, layer: int) -> Any:
        """The options of block `layer` (a kind with per-layer options picks its own)."""
        return options

    @classmethod
    def check_model(cls, options: Any, n_layer: int, block_size: int) -> None:
        """Validate options against the model's depth and length; raise ConfigError."""

    @classmethod
    def check_rope(cls, d_model: int, n_head: int) -> None:
        """Raise ConfigError (key model.positions) unless this kind can take rope here."""
        if cls.refuses_rope:
            raise ConfigError(
                f"model.positions: rope does not fit {cls.__name__}: {cls.refuses_rope}"
            )
        if (d_model // n_head) % 2:
            raise ConfigError(
                f"model.positions: rope rotates channel pairs; head_dim={d_model // n_head} is odd"
            )

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
        **kwargs: Any,
    ) -> None:
        super().__init__(d_model, n_head, options, **kwargs)
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
    refuses_rope = (
        "its circulant correlates channel c with c + tau, which rope rotates at other "
        "frequencies; use model.positions=learned"
    )

    def __init__(
        self,
        d_model: int,
        n_head: int,
        options: ChannelXcorrOptions,
        **kwargs: Any,
    ) -> None:
        super().__init__(d_model, n_head, options, **kwargs)
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


class DconvMixer(Mixer):
    """Primer's multi-dconv-head attention: `dot` after a causal depthwise convolution of
    q, k and v along time, one K-tap filter per channel. The short-convolution baseline
    token_xcorr has to beat: both see a window of recent q and k, but dconv filters each
    channel separately and v as well, while token_xcorr's kernel is shared by a head's
    channels and couples query and key lags (S_ij = sum_ab w_ab <q_{i-a}, k_{j-b}>)."""

    Options = DconvOptions

    def __init__(self, d_model: int, n_head: int, options: DconvOptions, **kwargs: Any) -> None:
        super().__init__(d_model, n_head, options, **kwargs)
        self.conv = nn.Parameter(torch.empty(3, n_head, self.head_dim, options.kernel))
        self.init_lags()

    @torch.no_grad()
    def init_lags(self) -> None:
        """Start as exactly ``dot``: every filter the delta at lag 0."""
        self.conv.zero_()
        self.conv[..., 0] = 1.0

    def filtered(self, q: Tensor, k: Tensor, v: Tensor, cache: LayerCache | None = None):
        """q, k, v through their filters (with a cache: the last K-1 raw rows before them)."""
        keep = self.options.kernel - 1
        return tuple(
            correlation.causal_depthwise_conv(
                x, w, None if cache is None else cache.history(name, x, keep)
            )
            for name, x, w in zip("qkv", (q, k, v), self.conv, strict=True)
        )

    def attend(self, q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> Tensor:
        q, k, v = self.filtered(q, k, v)
        return correlation.dot_attention(q, k, v, reference=self.reference, dropout_p=dropout_p)

    def attend_cached(
        self, q: Tensor, k: Tensor, v: Tensor, cache: LayerCache, dropout_p: float
    ) -> Tensor:
        q, k, v = self.filtered(q, k, v, cache)
        keys, values = cache.append(k, v)
        return correlation.cached_attention(q, keys, values, self.head_dim**-0.5, dropout_p)

    def lag_parameters(self) -> list[nn.Parameter]:
        return [self.conv]

    def lag_weights(self) -> Tensor:
        """The (H, K, K) kernel the q and k filters make over (query lag, key lag), averaged
        over a head's channels: sum_c w_q[c, a] w_k[c, b] / d."""
        return torch.einsum("hca,hcb->hab", self.conv[0], self.conv[1]) / self.head_dim

    def scores(self, q: Tensor, k: Tensor) -> Tensor:
        w_q, w_k, _ = self.conv
        conv = correlation.causal_depthwise_conv
        return correlation.dot_scores(conv(q, w_q), conv(k, w_k))

    def flops_per_token(self, seq_len: int) -> int:
        return super().flops_per_token(seq_len) + 2 * 3 * self.options.kernel * self.d_model

    @classmethod
    def check(cls, options: Any, d_model: int, n_head: int) -> None:
        super().check(options, d_model, n_head)
        _check_int("kernel", options.kernel, 1)

    @classmethod
    def describe(cls, options: DconvOptions) -> str:
        return f"dconv K={options.kernel}"


def _check_divides(name: str, value: Any, d_model: int) -> None:
    """Raise ConfigError unless value is a positive integer dividing d_model."""
    _check_int(name, value, 1)
    if d_model % value:
        raise ConfigError(f"{KEY}.{name}: must divide model.d_model={d_model}, got {value}")


class Generator(nn.Module):
    """A per-token two-layer MLP, x (B, T, C) -> (B, T, n): W1 gelu(W0 x). No batch norm
    (it would mix the batch and time). W1 starts at zero: the generated part starts at
    zero, W1 learns at once and W0 one step later (as LoRA). Raw parameters, not
    nn.Linear, so that the model's GPT-2 init leaves this init alone."""

    def __init__(self, d_model: int, reduction: int, n_out: int) -> None:
        super().__init__()
        self.w0 = nn.Parameter(torch.empty(d_model // reduction, d_model))
        self.w1 = nn.Parameter(torch.zeros(n_out, d_model // reduction))
        nn.init.normal_(self.w0, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.gelu(F.linear(x, self.w0)), self.w1)

    def flops_per_token(self) -> int:
        return 2 * self.w0.numel() + 2 * self.w1.numel()


class InvolutionMixer(Mixer):
    """Involution, attention-free: y_{t,c} = sum_{l<K} h_{t,g(c),l} v_{t-l,c}, with the
    filter h_t = softmax_l(W1 gelu(W0 x_t) + b) generated per token from its own input, one
    per group of C/G channels (the "heads" of `mix`). O(T K C), no T x T tensor. b starts
    with most weight on lag 0 (all of it without softmax), W1 at zero: a per-token
    projection at first."""

    Options = InvolutionOptions
    refuses_rope = "it has no queries or keys to rotate; its lags see relative positions"
    projections = 1  # qkv is v alone
    generates = True
    first_lag = 0

    def __init__(self, d_model: int, n_head: int, options: InvolutionOptions, **kw: Any) -> None:
        super().__init__(d_model, n_head, options, **kw)
        if not isinstance(options.kernel, int):
            raise ValueError("a kernel per layer: build each block with for_layer(options, i)")
        self.kernel = options.kernel
        self.groups = _groups(options, d_model)
        self.generator = Generator(d_model, options.reduction, self.groups * self.kernel)
        self.bias = nn.Parameter(torch.zeros(self.groups, self.kernel))
        self.init_lags()

    @torch.no_grad()
    def init_lags(self) -> None:
        """Lag 0 gets 90% of the softmax (exp(b_0) = 9 (K-1) exp(0)), or exactly 1 without."""
        self.bias.zero_()
        lag0 = torch.tensor(9.0 * max(self.kernel - 1, 1)).log() if self.options.softmax else 1
        self.bias[:, 0] = lag0

    def filters(self, x: Tensor) -> Tensor:
        """h (B, G, T, K): each token's generated filter per group."""
        B, T, _ = x.shape
        h = self.generator(x).view(B, T, self.groups, self.kernel) + self.bias
        if self.options.softmax:
            h = torch.softmax(h, dim=-1)
        return h.transpose(1, 2)

    def mix(self, x: Tensor, cache: LayerCache | None) -> Tensor:
        B, T, C = x.shape
        v = self.qkv(x).view(B, T, self.groups, C // self.groups).transpose(1, 2)
        h = self.filters(x)
        if cache is None:
            return involution.involution(v, h, reference=self.reference)
        past = cache.history("v", v, self.kernel - 1)
        cache.advance(T)
        return involution.generated_lag_stack(v, h.unsqueeze(-2), past)

    def causal_weights(self, x: Tensor) -> Tensor:
        """The band of the generated filters: M[i, i-a] = h_{i,a} per group."""
        return involution.banded(self.filters(x))

    def generated_lag_weights(self, x: Tensor) -> Tensor:
        """(B, T, G, K): each token's filter per group."""
        return self.filters(x).transpose(1, 2)

    def lag_parameters(self) -> list[nn.Parameter]:
        return [self.bias]

    def lag_weights(self) -> Tensor:
        """(G, K): the static filter, what every token's is at initialisation."""
        return torch.softmax(self.bias, dim=-1) if self.options.softmax else self.bias

    def flops_per_token(self, seq_len: int) -> int:
        lag_sum = 2 * self.kernel * self.d_model
        return self._projection_flops() + self.generator.flops_per_token() + lag_sum

    @classmethod
    def for_layer(cls, options: InvolutionOptions, layer: int) -> InvolutionOptions:
        if isinstance(options.kernel, list):
            return replace(options, kernel=options.kernel[layer])
        return options

    @classmethod
    def check(cls, options: Any, d_model: int, n_head: int) -> None:
        super().check(options, d_model, n_head)
        kernels = options.kernel if isinstance(options.kernel, list) else [options.kernel]
        for kernel in kernels:
            _check_int("kernel", kernel, 1)
        _check_divides("reduction", options.reduction, d_model)
        _check_divides("groups", _groups(options, d_model), d_model)  # the default C//16 too
        if not isinstance(options.softmax, bool):
            raise ConfigError(f"{KEY}.softmax: must be true or false, got {options.softmax!r}")

    @classmethod
    def check_model(cls, options: InvolutionOptions, n_layer: int, block_size: int) -> None:
        kernels = options.kernel if isinstance(options.kernel, list) else [options.kernel]
        if isinstance(options.kernel, list) and len(kernels) != n_layer:
            raise ConfigError(
                f"{KEY}.kernel: one per layer, model.n_layer={n_layer}, got {len(kernels)}"
            )
        _check_int("kernel", max(kernels), 1, block_size, f"model.block_size={block_size}")

    @classmethod
    def describe(cls, options: InvolutionOptions) -> str:
        kernel = options.kernel
        kernels = ",".join(map(str, kernel)) if isinstance(kernel, list) else kernel
        groups = "C/16" if options.groups is None else options.groups
        norm = "" if options.softmax else " linear"
        return f"involution K={kernels} G={groups} r={options.reduction}{norm}"


def _groups(options: InvolutionOptions, d_model: int) -> int:
    return options.groups if options.groups is not None else max(d_model // 16, 1)


class InvXcorrMixer(TokenXcorrMixer):
    """Token-lag correlation whose query and key filters are generated per position from
    that position's own input, added to the static ones: f_i = f + gen_q(x_i), g_j = g +
    gen_k(x_j), S_ij = (1/sqrt d) sum_r <sum_a f_{i,r,a} q_{i-a}, sum_b g_{j,r,b} k_{j-b}>.
    The generator starts at zero: token_xcorr at its delta, that is `dot`, exactly."""

    Options = InvXcorrOptions
    generates = True

    def __init__(self, d_model: int, n_head: int, options: InvXcorrOptions, **kw: Any) -> None:
        super().__init__(d_model, n_head, options, **kw)
        width = n_head * options.rank * (options.window_q + options.window_k)
        self.generator = Generator(d_model, options.reduction, width)

    def filters(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """f (B, H, T, r, Wq) and g (B, H, T, r, Wk): static plus generated, per position."""
        B, T, _ = x.shape
        o = self.options
        made = self.generator(x).view(B, T, self.n_head, o.rank, o.window_q + o.window_k)
        f, g = made.transpose(1, 2).split([o.window_q, o.window_k], dim=-1)
        return self.f[None, :, None] + f, self.g[None, :, None] + g

    def mix(self, x: Tensor, cache: LayerCache | None) -> Tensor:
        f, g = self.filters(x)
        q, k, v = self.heads(x, 0 if cache is None else cache.length)
        dropout_p = self.dropout if self.training else 0.0
        if cache is None:
            return involution.inv_xcorr_attention(
                q, k, v, f, g, reference=self.reference, dropout_p=dropout_p
            )
        q_past = cache.history("q", q, self.options.window_q - 1)
        k_past = cache.history("k", k, self.options.window_k - 1)
        q = involution.generated_lag_stack(q, f, q_past)
        keys, values = cache.append(involution.generated_lag_stack(k, g, k_past), v)
        return correlation.cached_attention(q, keys, values, self.head_dim**-0.5, dropout_p)

    def causal_weights(self, x: Tensor) -> Tensor:
        q, k, _ = self.heads(x)
        scores = involution.inv_xcorr_scores(q, k, *self.filters(x))
        return correlation.causal_softmax_attend(scores, None)

    def generated_lag_weights(self, x: Tensor) -> Tensor:
        """(B, T, H, Wq, Wk): the kernel sum_r f_{t,r} g_{t,r}^T of each token's own query and
        key filters (what S_tt weighs; S_ij pairs i's query filter with j's key filter)."""
        f, g = self.filters(x)
        return torch.einsum("bhtra,bhtrc->bthac", f, g)

    def flops_per_token(self, seq_len: int) -> int:
        return super().flops_per_token(seq_len) + self.generator.flops_per_token()

    @classmethod
    def check(cls, options: Any, d_model: int, n_head: int) -> None:
        super().check(options, d_model, n_head)
        _check_divides("reduction", options.reduction, d_model)

    @classmethod
    def check_model(cls, options: InvXcorrOptions, n_layer: int, block_size: int) -> None:
        for name in ("window_q", "window_k"):
            _check_int(
                name, getattr(options, name), 1, block_size, f"model.block_size={block_size}"
            )

    @classmethod
    def describe(cls, options: InvXcorrOptions) -> str:
        return f"inv_xcorr W={options.window_q}x{options.window_k} r={options.rank}"


MIXERS: dict[str, type[Mixer]] = {
    "dot": DotMixer,
    "token_xcorr": TokenXcorrMixer,
    "channel_xcorr": ChannelXcorrMixer,
    "dconv": DconvMixer,
    "involution": InvolutionMixer,
    "inv_xcorr": InvXcorrMixer,
}
