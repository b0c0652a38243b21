"""Correlation attention: scipy oracles, fast == reference, gradients, causality, init."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.signal
import torch

from leviathan.errors import ConfigError
from leviathan.model import correlation as xc
from leviathan.model.mixers import (
    MIXERS,
    ChannelXcorrMixer,
    ChannelXcorrOptions,
    DconvMixer,
    DconvOptions,
    DotMixer,
    DotOptions,
    InvolutionOptions,
    InvXcorrOptions,
    Mixer,
    TokenXcorrMixer,
    TokenXcorrOptions,
)

F64 = torch.float64


def randn(*shape: int, seed: int | None = None, requires_grad: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randn(*shape, dtype=F64, generator=gen).requires_grad_(requires_grad)


def qkv(B: int, H: int, T: int, d: int, seed: int = 0) -> list[torch.Tensor]:
    return [randn(B, H, T, d, seed=seed + i, requires_grad=True) for i in range(3)]


# (B, H, T, d, Wq, Wk, rank): Wq != Wk, ranks 1..full, windows longer than T
TOKEN_SHAPES = [
    (1, 1, 5, 3, 1, 1, 1),
    (2, 3, 9, 4, 3, 2, 1),
    (2, 3, 9, 4, 3, 2, 2),
    (2, 2, 12, 8, 4, 4, 4),
    (1, 2, 16, 5, 2, 5, 2),
    (1, 2, 3, 4, 5, 4, 3),
]
# (B, H, T, d, L): L = 0, and 2L+1 == d (every lag used once around the ring)
CHANNEL_SHAPES = [(2, 2, 6, 5, 2), (1, 3, 5, 8, 3), (1, 1, 4, 3, 1), (2, 1, 5, 4, 0)]


def token_lags(H: int, r: int, Wq: int, Wk: int, seed: int = 10) -> list[torch.Tensor]:
    return [
        randn(H, r, Wq, seed=seed, requires_grad=True),
        randn(H, r, Wk, seed=seed + 1, requires_grad=True),
    ]


def channel_lags(H: int, L: int, seed: int = 20) -> torch.Tensor:
    return randn(H, 2 * L + 1, seed=seed, requires_grad=True)


# --- oracles ------------------------------------------------------------------------


def test_causal_lag_stack_is_lfilter() -> None:
    x = randn(2, 3, 7, 4, seed=1)
    weights = randn(3, 2, 3, seed=2)
    y = xc.causal_lag_stack(x, weights).numpy().reshape(2, 3, 7, 2, 4)
    for h in range(3):
        for r in range(2):
            expected = scipy.signal.lfilter(weights[h, r].numpy(), [1.0], x[:, h].numpy(), axis=1)
            np.testing.assert_allclose(y[:, h, :, r], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("K", [1, 3, 9])  # 9 > T: the filter reaches before the start
def test_causal_depthwise_conv_is_lfilter(K: int) -> None:
    x = randn(2, 3, 7, 4, seed=1)
    weights = randn(3, 4, K, seed=2)
    y = xc.causal_depthwise_conv(x, weights).numpy()
    for h in range(3):
        for c in range(4):
            expected = scipy.signal.lfilter(weights[h, c].numpy(), [1.0], x[:, h, :, c], axis=1)
            np.testing.assert_allclose(y[:, h, :, c], expected, rtol=1e-12, atol=1e-12)
    # in two pieces, the first one's last K-1 positions as history: the same rows exactly
    split = 4
    head = xc.causal_depthwise_conv(x[:, :, :split], weights)
    tail = xc.causal_depthwise_conv(
        x[:, :, split:], weights, x[:, :, max(0, split - K + 1) : split] if K > 1 else None
    )
    assert torch.equal(torch.cat([head, tail], dim=2), torch.from_numpy(y))
    delta = torch.zeros(3, 4, K, dtype=x.dtype)
    delta[..., 0] = 1.0
    assert torch.equal(xc.causal_depthwise_conv(x, delta), x)


@pytest.mark.parametrize("B,H,T,d,Wq,Wk,r", TOKEN_SHAPES)
def test_token_xcorr_scores_match_convolve2d(B, H, T, d, Wq, Wk, r) -> None:
    q, k, _ = qkv(B, H, T, d)
    f, g = token_lags(H, r, Wq, Wk)
    scores = xc.token_xcorr_scores(q, k, f, g).detach().numpy()
    for b in range(B):
        for h in range(H):
            s0 = q[b, h].detach().numpy() @ k[b, h].detach().numpy().T
            w = f[h].detach().numpy().T @ g[h].detach().numpy()  # sum_r f_r g_r^T
            expected = scipy.signal.convolve2d(s0, w)[:T, :T] / np.sqrt(d)
            np.testing.assert_allclose(scores[b, h], expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("B,H,T,d,L", CHANNEL_SHAPES)
def test_channel_xcorr_scores_match_correlate(B, H, T, d, L) -> None:
    q, k, _ = qkv(B, H, T, d)
    alpha = channel_lags(H, L).detach().numpy()
    scores = xc.channel_xcorr_scores(q, k, torch.from_numpy(alpha)).detach().numpy()
    qn, kn = q.detach().numpy(), k.detach().numpy()
    for b in range(B):
        for h in range(H):
            for i in range(T):
                for j in range(T):
                    # lag m of the ring: sum_c q_i[c] k_j[(c + m) mod d]
                    ring = scipy.signal.correlate(
                        np.concatenate([kn[b, h, j]] * 2), qn[b, h, i], "valid"
                    )
                    expected = sum(alpha[h, t + L] * ring[t % d] for t in range(-L, L + 1))
                    assert scores[b, h, i, j] == pytest.approx(expected / np.sqrt(d), abs=1e-10)


def test_dot_scores_and_attention_match_numpy() -> None:
    q, k, v = (t.detach().numpy() for t in qkv(1, 1, 6, 4))
    s = q[0, 0] @ k[0, 0].T / 2.0
    s[np.triu_indices(6, 1)] = -np.inf
    p = np.exp(s - s.max(1, keepdims=True))
    expected = (p / p.sum(1, keepdims=True)) @ v[0, 0]
    for reference in (True, False):
        out = xc.dot_attention(*(torch.from_numpy(t) for t in (q, k, v)), reference=reference)
        np.testing.assert_allclose(out[0, 0].numpy(), expected, rtol=1e-10, atol=1e-12)


# --- fast path == reference path, values and gradients -------------------------------


def assert_paths_agree(run, inputs: list[torch.Tensor]) -> None:
    results = []
    for reference in (True, False):
        out = run(reference)
        grads = torch.autograd.grad(out, inputs, grad_outputs=torch.ones_like(out) + out.detach())
        results.append((out, grads))
    (out_ref, grads_ref), (out_fast, grads_fast) = results
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-10, atol=1e-10)
    for g_fast, g_ref in zip(grads_fast, grads_ref, strict=True):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("B,H,T,d,Wq,Wk,r", TOKEN_SHAPES)
def test_token_xcorr_fast_equals_reference(B, H, T, d, Wq, Wk, r) -> None:
    q, k, v = qkv(B, H, T, d)
    f, g = token_lags(H, r, Wq, Wk)
    run = lambda ref: xc.token_xcorr_attention(q, k, v, f, g, reference=ref)  # noqa: E731
    assert_paths_agree(run, [q, k, v, f, g])


@pytest.mark.parametrize("B,H,T,d,L", CHANNEL_SHAPES)
def test_channel_xcorr_fast_equals_reference(B, H, T, d, L) -> None:
    q, k, v = qkv(B, H, T, d)
    alpha = channel_lags(H, L)
    run = lambda ref: xc.channel_xcorr_attention(q, k, v, alpha, reference=ref)  # noqa: E731
    assert_paths_agree(run, [q, k, v, alpha])


@pytest.mark.parametrize("T", [1, 7, 33])
def test_dot_fast_equals_reference(T: int) -> None:
    q, k, v = qkv(2, 2, T, 8)
    assert_paths_agree(lambda ref: xc.dot_attention(q, k, v, reference=ref), [q, k, v])


@pytest.mark.parametrize("reference", [True, False], ids=["reference", "fast"])
def test_gradcheck(reference: bool) -> None:
    q, k, v = qkv(1, 2, 5, 3)
    f, g = token_lags(2, 2, 3, 2)
    alpha = channel_lags(2, 1)
    kw = {"reference": reference}
    assert torch.autograd.gradcheck(lambda *a: xc.dot_attention(*a, **kw), (q, k, v))
    assert torch.autograd.gradcheck(lambda *a: xc.token_xcorr_attention(*a, **kw), (q, k, v, f, g))
    assert torch.autograd.gradcheck(
        lambda *a: xc.channel_xcorr_attention(*a, **kw), (q, k, v, alpha)
    )


# --- modules ------------------------------------------------------------------------

D_MODEL, N_HEAD = 16, 2
MIXER_CASES = {
    "dot": DotOptions(),
    "token_r1": TokenXcorrOptions(window_q=3, window_k=2, rank=1),
    "token_full": TokenXcorrOptions(window_q=4, window_k=3, rank=3),
    "channel": ChannelXcorrOptions(lags=2),
    "dconv": DconvOptions(kernel=3),
    "dconv_long": DconvOptions(kernel=5),
    "involution": InvolutionOptions(kernel=5, groups=4),  # K > t: every earlier step reached
    "inv_xcorr": InvXcorrOptions(window_q=3, window_k=2, rank=2),
}


def make_mixer(options, *, perturb: bool = True, seed: int = 0, dtype=F64) -> Mixer:
    """A mixer with random lag weights (perturb) so that it is not secretly ``dot``."""
    torch.manual_seed(seed)
    mixer = MIXERS[options.kind](D_MODEL, N_HEAD, options).to(dtype)
    if perturb:
        with torch.no_grad():
            for p in mixer.lag_parameters():
                p.add_(0.3 * torch.randn_like(p))
    return mixer


@pytest.mark.parametrize("name", MIXER_CASES)
def test_module_fast_equals_reference(name: str) -> None:
    mixer = make_mixer(MIXER_CASES[name])
    x = randn(2, 11, D_MODEL, seed=3, requires_grad=True)
    inputs = [x, *mixer.parameters()]

    def run(reference: bool) -> torch.Tensor:
        mixer.reference = reference
        return mixer(x)

    assert_paths_agree(run, inputs)


@pytest.mark.parametrize("reference", [True, False], ids=["reference", "fast"])
@pytest.mark.parametrize("name", MIXER_CASES)
def test_causality(name: str, reference: bool) -> None:
    mixer = make_mixer(MIXER_CASES[name])
    mixer.reference = reference
    T, t = 10, 4
    x = randn(2, T, D_MODEL, seed=4, requires_grad=True)
    changed = x.detach().clone()
    changed[:, t + 1 :] = randn(2, T - t - 1, D_MODEL, seed=5)
    y, y_changed = mixer(x), mixer(changed)
    assert (y[:, : t + 1] - y_changed[:, : t + 1]).abs().max() <= 1e-6
    assert (y[:, t + 1 :] - y_changed[:, t + 1 :]).abs().max() > 1e-3  # the future did change

    (grad,) = torch.autograd.grad(y[:, t].sum(), x)
    assert torch.all(grad[:, t + 1 :] == 0)
    assert torch.all(grad[:, : t + 1].abs().sum(-1) > 0)


@pytest.mark.parametrize("reference", [True, False], ids=["reference", "fast"])
@pytest.mark.parametrize(
    "options",
    [
        TokenXcorrOptions(window_q=4, window_k=4, rank=1),
        TokenXcorrOptions(window_q=4, window_k=4, rank=4),
        TokenXcorrOptions(window_q=2, window_k=5, rank=2),
        ChannelXcorrOptions(lags=2),
        DconvOptions(kernel=4),
    ],
    ids=["token_r1", "token_full", "token_2x5", "channel", "dconv"],
)
def test_delta_init_is_exactly_dot(options, reference: bool) -> None:
    torch.manual_seed(0)
    dot = DotMixer(64, 4, DotOptions())
    mixer = MIXERS[options.kind](64, 4, options)
    missing, unexpected = mixer.load_state_dict(dot.state_dict(), strict=False)
    assert sorted(missing) == sorted(n for n, _ in mixer.named_parameters() if "." not in n)
    assert not unexpected
    dot.reference = mixer.reference = reference
    x = torch.randn(2, 37, 64)
    if reference or getattr(options, "rank", 1) == 1:
        assert torch.equal(mixer(x), dot(x))
    else:  # rank > 1: V is narrower than q, the blocked kernel runs, not dot's fused one
        torch.testing.assert_close(mixer(x), dot(x), rtol=1e-6, atol=1e-6)


def test_token_init_is_lora_style() -> None:
    mixer = TokenXcorrMixer(D_MODEL, N_HEAD, TokenXcorrOptions(window_q=3, window_k=4, rank=3))
    expected = torch.zeros(N_HEAD, 3, 4)
    expected[:, 0, 0] = 1.0
    torch.testing.assert_close(xc.lag_kernel(mixer.f, mixer.g), expected, rtol=0, atol=0)
    assert torch.all(mixer.f[:, 1:] != 0)  # random, so g_r gets a gradient
    assert torch.all(mixer.g[:, 1:] == 0)


@pytest.mark.parametrize("reference", [True, False], ids=["reference", "fast"])
def test_lag_weights_get_gradient_at_init(reference: bool) -> None:
    x = randn(2, 9, D_MODEL, seed=6)
    token = make_mixer(MIXER_CASES["token_full"], perturb=False)
    channel = make_mixer(MIXER_CASES["channel"], perturb=False)
    for mixer in (token, channel):
        mixer.reference = reference
        mixer(x).pow(2).sum().backward()
    assert token.f.grad[:, 0].abs().sum() > 0
    assert token.g.grad[:, 0].abs().sum() > 0
    assert torch.all(token.g.grad[:, 1:].abs().sum(-1) > 0)  # every extra factor
    assert torch.all(token.f.grad[:, 1:] == 0)  # g_r = 0: f_r learns from the next step on
    assert torch.all(channel.alpha.grad != 0)  # every lag, not just tau = 0


@pytest.mark.parametrize("name", ["token_full", "channel"])
def test_a_few_adam_steps_move_every_lag_weight(name: str) -> None:
    """A delta-initialised student fits a teacher with random lags; all lag weights move."""
    torch.manual_seed(0)
    teacher = make_mixer(MIXER_CASES[name], perturb=True, seed=1, dtype=torch.float32)
    student = copy.deepcopy(teacher)
    if isinstance(student, TokenXcorrMixer | ChannelXcorrMixer):
        student.init_lags()
    start = [p.detach().clone() for p in student.lag_parameters()]
    optimizer = torch.optim.Adam(student.lag_parameters(), lr=1e-2)
    x = torch.randn(8, 12, D_MODEL)
    target = teacher(x).detach()
    losses = []
    for _ in range(15):
        loss = (student(x) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    for p, p0 in zip(student.lag_parameters(), start, strict=True):
        assert torch.all((p - p0).abs().flatten(1).sum(-1) > 0)


def test_attention_dropout_only_while_training() -> None:
    for options in MIXER_CASES.values():
        mixer = MIXERS[options.kind](D_MODEL, N_HEAD, options, dropout=0.5)
        x = torch.randn(2, 8, D_MODEL)
        for reference in (True, False):
            mixer.reference = reference
            mixer.train()
            assert not torch.equal(mixer(x), mixer(x))
            mixer.eval()
            assert torch.equal(mixer(x), mixer(x))


def test_flops_per_token() -> None:
    C, H, T = 64, 4, 128
    d = C // H
    projections = 8 * C * C
    causal = H * (T + 1)  # 2 FLOPs * H heads * (T+1)/2 keys on average
    dot = DotMixer(C, H, DotOptions())
    assert dot.flops_per_token(T) == projections + causal * 2 * d
    token = TokenXcorrMixer(C, H, TokenXcorrOptions(window_q=4, window_k=2, rank=2))
    assert token.flops_per_token(T) == projections + causal * 3 * d + 2 * 2 * (4 + 2) * C
    channel = ChannelXcorrMixer(C, H, ChannelXcorrOptions(lags=2))
    assert channel.flops_per_token(T) == dot.flops_per_token(T) + 2 * 5 * C


# --- validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls,options,key",
    [
        (TokenXcorrMixer, TokenXcorrOptions(rank=7), "model.mixer.rank"),
        (TokenXcorrMixer, TokenXcorrOptions(window_q=2, window_k=5, rank=3), "model.mixer.rank"),
        (TokenXcorrMixer, TokenXcorrOptions(rank=0), "model.mixer.rank"),
        (TokenXcorrMixer, TokenXcorrOptions(window_q=0), "model.mixer.window_q"),
        (TokenXcorrMixer, TokenXcorrOptions(window_k=-1), "model.mixer.window_k"),
        (TokenXcorrMixer, TokenXcorrOptions(window_q=2.5), "model.mixer.window_q"),
        (ChannelXcorrMixer, ChannelXcorrOptions(lags=4), "model.mixer.lags"),  # 9 > head_dim 8
        (ChannelXcorrMixer, ChannelXcorrOptions(lags=-1), "model.mixer.lags"),
        (TokenXcorrMixer, DotOptions(), "model.mixer.kind"),
        (DotMixer, ChannelXcorrOptions(), "model.mixer.kind"),
        (DconvMixer, DconvOptions(kernel=0), "model.mixer.kernel"),
    ],
)
def test_check_names_the_key(cls, options, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cls.check(options, D_MODEL, N_HEAD)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cls(D_MODEL, N_HEAD, options)


def test_check_messages() -> None:
    with pytest.raises(ConfigError) as err:
        TokenXcorrMixer.check(TokenXcorrOptions(rank=7), 64, 4)
    assert str(err.value) == (
        "model.mixer.rank: must be between 1 and min(window_q, window_k)=4, got 7"
    )
    with pytest.raises(ConfigError, match=r"model\.n_head"):
        DotMixer.check(DotOptions(), 64, 5)
    ChannelXcorrMixer.check(ChannelXcorrOptions(lags=3), 16, 2)  # 2*3+1 = 7 <= 8: fine
    TokenXcorrMixer.check(TokenXcorrOptions(window_q=1, window_k=1, rank=1), 16, 2)


def test_registry() -> None:
    assert set(MIXERS) == {"dot", "token_xcorr", "channel_xcorr", "dconv"} | {
        "involution",
        "inv_xcorr",
    }
    for kind, cls in MIXERS.items():
        assert cls.Options().kind == kind


def test_dconv_is_dot_on_filtered_q_k_v() -> None:
    """The oracle: each channel of q, k and v through its own lfilter (scipy), then the
    materialised causal softmax of <q~_i, k~_j>/sqrt(d), times v~."""
    mixer = make_mixer(DconvOptions(kernel=3))
    x = randn(2, 9, D_MODEL, seed=4)
    B, T, C, H = 2, 9, D_MODEL, N_HEAD
    q, k, v = (
        t.view(B, T, H, C // H).transpose(1, 2).detach().numpy()
        for t in mixer.qkv(x).split(C, dim=2)
    )
    conv = mixer.conv.detach().numpy()
    q, k, v = (
        np.stack(
            [
                np.stack(
                    [
                        scipy.signal.lfilter(conv[i, h, c], [1.0], t[:, h, :, c], axis=1)
                        for c in range(C // H)
                    ],
                    axis=-1,
                )
                for h in range(H)
            ],
            axis=1,
        )
        for i, t in enumerate((q, k, v))
    )
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(C // H)
    scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    y = (p / p.sum(-1, keepdims=True)) @ v
    expected = mixer.proj(torch.from_numpy(y).transpose(1, 2).reshape(B, T, C))
    torch.testing.assert_close(mixer(x), expected, rtol=1e-10, atol=1e-10)
