"""Generated lag filters: `involution` and `inv_xcorr` held to numpy loops in float64,
fast == reference, causality, batch independence, init, FLOPs, validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.special
import torch

from leviathan.config import config_from_dict
from leviathan.errors import ConfigError
from leviathan.inspection import generated_kernels, inspect_run
from leviathan.model import Leviathan
from leviathan.model.mixers import (
    DotMixer,
    DotOptions,
    InvolutionMixer,
    InvolutionOptions,
    InvXcorrMixer,
    InvXcorrOptions,
    TokenXcorrMixer,
    TokenXcorrOptions,
)
from leviathan.train.trainer import train
from leviathan.trained import load_run

F64 = torch.float64
C, H = 16, 2


def mixer_of(options, *, rope: bool = False, dropout: float = 0.0, seed: int = 0):
    """A float64 mixer with every generated and static lag weight moved off its init."""
    torch.manual_seed(seed)
    cls = InvolutionMixer if options.kind == "involution" else InvXcorrMixer
    mixer = cls(C, H, options, rope=rope, dropout=dropout).double()
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return mixer


def numpy_of(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def np_generator(mixer, x: np.ndarray) -> np.ndarray:
    """W1 gelu(W0 x) per token, gelu exact (erf)."""
    hidden = x @ numpy_of(mixer.generator.w0).T
    hidden = 0.5 * hidden * (1 + scipy.special.erf(hidden / np.sqrt(2)))
    return hidden @ numpy_of(mixer.generator.w1).T


def np_lag_filter(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """y[..., i, :] = sum_a w[..., i, a] x[..., i - a, :], a loop over positions and lags."""
    y = np.zeros_like(x)
    for i in range(x.shape[-2]):
        for a in range(min(w.shape[-1], i + 1)):
            y[..., i, :] += w[..., i, a, None] * x[..., i - a, :]
    return y


def np_involution(mixer: InvolutionMixer, x: torch.Tensor) -> torch.Tensor:
    B, T, _ = x.shape
    G, K = mixer.groups, mixer.kernel
    xn = numpy_of(x)
    h = np_generator(mixer, xn).reshape(B, T, G, K) + numpy_of(mixer.bias)
    if mixer.options.softmax:
        h = scipy.special.softmax(h, axis=-1)
    v = xn @ numpy_of(mixer.qkv.weight).T
    y = np.zeros_like(v)
    for t in range(T):
        for c in range(C):
            for lag in range(min(K, t + 1)):
                y[:, t, c] += h[:, t, c // (C // G), lag] * v[:, t - lag, c]
    return mixer.proj(torch.from_numpy(y))


def np_inv_xcorr(mixer: InvXcorrMixer, x: torch.Tensor) -> torch.Tensor:
    B, T, _ = x.shape
    o, d = mixer.options, C // H
    made = np_generator(mixer, numpy_of(x)).reshape(B, T, H, o.rank, o.window_q + o.window_k)
    made = made.transpose(0, 2, 1, 3, 4)  # (B, H, T, r, Wq + Wk)
    f = numpy_of(mixer.f)[None, :, None] + made[..., : o.window_q]
    g = numpy_of(mixer.g)[None, :, None] + made[..., o.window_q :]
    q, k, v = (numpy_of(t) for t in mixer.heads(x))  # rotated when rope
    scores = sum(
        np_lag_filter(q, f[..., r, :]) @ np_lag_filter(k, g[..., r, :]).swapaxes(-1, -2)
        for r in range(o.rank)
    ) / np.sqrt(d)
    scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
    y = scipy.special.softmax(scores, axis=-1) @ v
    return mixer.proj(torch.from_numpy(y).transpose(1, 2).reshape(B, T, C))


INVOLUTIONS = {
    "K3-G4": InvolutionOptions(kernel=3, groups=4, reduction=4),
    "K1": InvolutionOptions(kernel=1, groups=2, reduction=2),
    "K9>T-linear": InvolutionOptions(kernel=9, groups=8, reduction=8, softmax=False),
    "default-groups": InvolutionOptions(kernel=4),
}
INV_XCORRS = {
    "3x2-r1": InvXcorrOptions(window_q=3, window_k=2, rank=1),
    "2x4-r2": InvXcorrOptions(window_q=2, window_k=4, rank=2, reduction=2),
    "1x1": InvXcorrOptions(window_q=1, window_k=1, rank=1),
}
CASES = {**INVOLUTIONS, **INV_XCORRS}


@pytest.mark.parametrize("reference", [True, False], ids=["reference", "fast"])
@pytest.mark.parametrize("name", CASES)
def test_matches_numpy_loops(name: str, reference: bool) -> None:
    mixer = mixer_of(CASES[name])
    mixer.reference = reference
    x = torch.randn(2, 7, C, dtype=F64)
    oracle = np_involution if name in INVOLUTIONS else np_inv_xcorr
    torch.testing.assert_close(mixer(x), oracle(mixer, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("reference", [True, False], ids=["reference", "fast"])
def test_inv_xcorr_with_rope_matches_numpy(reference: bool) -> None:
    mixer = mixer_of(INV_XCORRS["2x4-r2"], rope=True)
    mixer.reference = reference
    x = torch.randn(2, 7, C, dtype=F64)
    torch.testing.assert_close(mixer(x), np_inv_xcorr(mixer, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", CASES)
def test_fast_equals_reference_with_gradients(name: str) -> None:
    mixer = mixer_of(CASES[name])
    x = torch.randn(2, 9, C, dtype=F64, requires_grad=True)
    inputs = [x, *mixer.parameters()]
    results = []
    for reference in (True, False):
        mixer.reference = reference
        out = mixer(x)
        results.append((out, torch.autograd.grad(out, inputs, torch.ones_like(out) + out)))
    (out_ref, grads_ref), (out_fast, grads_fast) = results
    torch.testing.assert_close(out_fast, out_ref, rtol=1e-10, atol=1e-10)
    for fast, ref in zip(grads_fast, grads_ref, strict=True):
        torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("reference", [True, False], ids=["reference", "fast"])
@pytest.mark.parametrize("name", ["K3-G4", "2x4-r2"])
def test_causal_and_batch_independent(name: str, reference: bool, mode: str) -> None:
    """d y[b, t] / d x[b', s] is exactly zero for s > t or b' != b, in train (dropout on)
    and eval; earlier positions within reach do get a gradient."""
    mixer = mixer_of(CASES[name], dropout=0.2)
    mixer.train(mode == "train")
    mixer.reference = reference
    T, t = 10, 5
    x = torch.randn(3, T, C, dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(mixer(x)[1, t].sum(), x)
    assert torch.all(grad[:, t + 1 :] == 0)
    assert torch.all(grad[[0, 2]] == 0)
    assert torch.all(grad[1, t - 2 : t + 1].abs().sum(-1) > 0)


@pytest.mark.parametrize("reference", [True, False], ids=["reference", "fast"])
@pytest.mark.parametrize("rank", [1, 2])
def test_inv_xcorr_starts_as_dot(rank: int, reference: bool) -> None:
    torch.manual_seed(0)
    dot = DotMixer(64, 4, DotOptions())
    options = InvXcorrOptions(window_q=3, window_k=4, rank=rank)
    mixer = InvXcorrMixer(64, 4, options)
    mixer.load_state_dict(dot.state_dict(), strict=False)
    assert torch.all(mixer.generator.w1 == 0) and torch.all(mixer.generator.w0 != 0)
    dot.reference = mixer.reference = reference
    x = torch.randn(2, 37, 64)
    if reference or rank == 1:
        assert torch.equal(mixer(x), dot(x))
    else:  # as token_xcorr: V narrower than q, another kernel than dot's
        torch.testing.assert_close(mixer(x), dot(x), rtol=1e-6, atol=1e-6)


def test_inv_xcorr_at_a_static_filter_is_token_xcorr() -> None:
    """With the generator at zero, inv_xcorr is token_xcorr with the same f and g."""
    options = InvXcorrOptions(window_q=3, window_k=2, rank=2)
    mixer = mixer_of(options)
    torch.nn.init.zeros_(mixer.generator.w1)
    token = TokenXcorrMixer(C, H, TokenXcorrOptions(window_q=3, window_k=2, rank=2)).double()
    token.load_state_dict(mixer.state_dict(), strict=False)
    x = torch.randn(2, 9, C, dtype=F64)
    torch.testing.assert_close(mixer(x), token(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("K", [1, 4])
def test_involution_init_is_near_a_per_token_projection(K: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 9, C)
    soft = InvolutionMixer(C, H, InvolutionOptions(kernel=K))
    assert torch.all(soft.generator.w1 == 0)
    weights = soft.lag_weights()
    assert weights.shape == (1, K)  # G = C/16 = 1
    torch.testing.assert_close(weights[:, 0], torch.full((1,), 0.9 if K > 1 else 1.0))
    linear = InvolutionMixer(C, H, InvolutionOptions(kernel=K, softmax=False))
    linear.load_state_dict(soft.state_dict() | {"bias": linear.bias})
    assert torch.equal(linear(x), linear.proj(linear.qkv(x)))  # the delta: proj(v) exactly


def test_model_with_a_kernel_per_layer() -> None:
    raw = {
        "model": {"vocab_size": 32, "block_size": 16, "n_layer": 3, "n_head": 2, "d_model": 16}
        | {"mixer": {"kind": "involution", "kernel": [2, 3, 5]}},
        "train": {"seq_len": 16},
    }
    model = Leviathan(config_from_dict(raw).model)
    assert [b.mixer.kernel for b in model.blocks] == [2, 3, 5]
    assert [b.mixer.lag_weights().shape for b in model.blocks] == [(1, 2), (1, 3), (1, 5)]
    assert model(torch.randint(0, 32, (2, 16)))[0].shape == (2, 16, 32)
    assert InvolutionMixer.describe(model.cfg.mixer) == "involution K=2,3,5 G=C/16 r=4"


def test_flops_per_token() -> None:
    d_model, n_head, T = 64, 4, 128
    involution = InvolutionMixer(d_model, n_head, InvolutionOptions(kernel=5, groups=8))
    projections = 2 * 2 * d_model * d_model  # v and the output
    generator = 2 * d_model * 16 + 2 * 16 * 8 * 5  # C -> C/4 -> G K
    assert involution.flops_per_token(T) == projections + generator + 2 * 5 * d_model
    options = InvXcorrOptions(window_q=4, window_k=2, rank=2)
    inv = InvXcorrMixer(d_model, n_head, options)
    token = TokenXcorrMixer(d_model, n_head, TokenXcorrOptions(window_q=4, window_k=2, rank=2))
    generator = 2 * d_model * 16 + 2 * 16 * n_head * 2 * (4 + 2)  # C -> C/4 -> H r (Wq+Wk)
    assert inv.flops_per_token(T) == token.flops_per_token(T) + generator


def test_describe_and_lag_weights() -> None:
    assert InvolutionMixer.describe(InvolutionOptions(kernel=3, groups=4, softmax=False)) == (
        "involution K=3 G=4 r=4 linear"
    )
    assert InvXcorrMixer.describe(InvXcorrOptions(rank=2)) == "inv_xcorr W=4x4 r=2"
    mixer = InvXcorrMixer(C, H, InvXcorrOptions(window_q=3, window_k=2))
    assert mixer.lag_weights().shape == (H, 3, 2)
    assert mixer.lag_parameters() == [mixer.f, mixer.g]


@pytest.mark.parametrize(
    "options,key",
    [
        (InvolutionOptions(kernel=0), "model.mixer.kernel"),
        (InvolutionOptions(kernel=[3, 0]), "model.mixer.kernel"),
        (InvolutionOptions(groups=3), "model.mixer.groups"),
        (InvolutionOptions(reduction=5), "model.mixer.reduction"),
        (InvolutionOptions(reduction=0), "model.mixer.reduction"),
        (InvolutionOptions(softmax="yes"), "model.mixer.softmax"),
        (InvXcorrOptions(reduction=3), "model.mixer.reduction"),
        (InvXcorrOptions(window_q=0), "model.mixer.window_q"),
        (InvXcorrOptions(rank=5), "model.mixer.rank"),
        (DotOptions(), "model.mixer.kind"),
    ],
)
def test_check_names_the_key(options, key: str) -> None:
    cls = InvXcorrMixer if isinstance(options, InvXcorrOptions) else InvolutionMixer
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        cls.check(options, C, H)


@pytest.mark.parametrize(
    "mixer,key,d_model",
    [
        ({"kind": "involution", "kernel": [3, 5]}, "model.mixer.kernel", 16),  # n_layer = 3
        ({"kind": "involution", "kernel": 17}, "model.mixer.kernel", 16),  # block_size = 16
        ({"kind": "inv_xcorr", "window_k": 17}, "model.mixer.window_k", 16),
        ({"kind": "involution", "groups": 5}, "model.mixer.groups", 16),
        ({"kind": "involution"}, "model.mixer.groups", 56),  # the default C//16 = 3
    ],
)
def test_config_refuses_bad_options(mixer: dict, key: str, d_model: int) -> None:
    raw = {
        "model": {"block_size": 16, "n_layer": 3, "n_head": 2, "d_model": d_model}
        | {"mixer": mixer},
        "train": {"seq_len": 16},
    }
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_dict(raw)


def test_involution_refuses_rope() -> None:
    raw = {
        "model": {"block_size": 16, "n_head": 2, "d_model": 16, "positions": "rope"}
        | {"mixer": {"kind": "involution"}},
        "train": {"seq_len": 16},
    }
    with pytest.raises(ConfigError, match=r"model\.positions"):
        config_from_dict(raw)


# --- inspect ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory) -> dict[str, Path]:
    """Two-step runs of the generated kinds and of static token_xcorr on the same data."""
    root = tmp_path_factory.mktemp("runs")
    mixers = {
        "involution": {"kind": "involution", "kernel": [2, 4], "groups": 2},
        "inv_xcorr": {"kind": "inv_xcorr", "window_q": 3, "window_k": 2, "rank": 2},
        "token": {"kind": "token_xcorr", "window_q": 3, "window_k": 2, "rank": 2},
    }
    for name, mixer in mixers.items():
        raw = {
            "model": {"block_size": 16, "n_layer": 2, "n_head": 2, "d_model": 16, "mixer": mixer},
            "data": {"inputs": [str(corpus)], "dir": str(root / "data")}
            | {"tokenizer": {"vocab_size": 384}},
            "train": {"seq_len": 16, "micro_batch_size": 4, "max_steps": 2, "lr": 1e-2}
            | {"warmup_steps": 1, "eval_tokens": 64, "threads": 1},
            "run": {"dir": str(root / name), "wandb": "disabled", "sample_tokens": 4},
        }
        train(config_from_dict(raw), log=lambda *_: None)
    return {name: root / name for name in mixers}


def test_inspect_draws_generated_kernels_beside_a_static_run(runs, tmp_path) -> None:
    found = inspect_run(runs["inv_xcorr"], against=runs["token"], out=tmp_path, windows=2)
    for name in ("generated_lag_kernels", "generated_spread_lag_kernels", "against_lag_kernels"):
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert found.generated == tmp_path / "generated_lag_kernels.png"
    mean, spread = generated_kernels(load_run(runs["inv_xcorr"]), windows=2)
    assert mean.shape == spread.shape == (2, 2, 3, 2)  # layers, heads, Wq, Wk
    assert np.all(spread > 0)  # the generators moved off zero: filters differ per token


def test_inspect_involution_with_a_kernel_per_layer(runs, tmp_path) -> None:
    found = inspect_run(runs["involution"], out=tmp_path, windows=2)
    assert found.kernels == tmp_path / "token_lags.png"
    assert found.generated == tmp_path / "generated_token_lags.png"
    assert found.generated.read_bytes()[:4] == b"\x89PNG"
    mean, _ = generated_kernels(load_run(runs["involution"]), windows=2)
    assert mean.shape == (2, 2, 4) and np.all(np.isnan(mean[0, :, 2:]))  # K = 2, then 4
    np.testing.assert_allclose(mean[1].sum(-1), 1.0)  # softmax filters, mean of them
    saved = json.loads((tmp_path / "generated_lags.json").read_text())
    np.testing.assert_allclose(np.array(saved["mean"][1]), mean[1])
    assert saved["mean"][0][0][2:] == [None, None] and len(saved["static"][1][0]) == 4
    profile = np.array(json.loads(found.profiles.read_text())["involution (involution)"])
    assert profile.shape == (2, 16)  # the band of the filters: distances 0..K-1 only
    assert np.all(profile[0, :2] > 0) and np.all(profile[0, 2:] == 0)
    assert np.all(profile[1, :4] > 0) and np.all(profile[1, 4:] == 0)


def test_study_v3_configs_are_study2_but_the_mixer_and_match_in_size() -> None:
    from leviathan.config import load_config
    from leviathan.sizing import model_size

    names = ["study2-xcorr", "study3-involution", "study3-inv-xcorr"]
    cfgs = {name: load_config(f"configs/{name}.yaml") for name in names}
    sizes = [model_size(cfg).total for cfg in cfgs.values()]
    assert max(sizes) / min(sizes) - 1 < 0.012, sizes
    involution, inv = cfgs["study3-involution"].model, cfgs["study3-inv-xcorr"].model
    assert involution.mixer.kernel == [3, 7, 15, 31] and involution.positions == "none"
    assert inv.mixer.kind == "inv_xcorr" and inv.positions == "rope"
    rest = []
    for cfg in cfgs.values():
        d = cfg.to_dict()
        for section, key in [("model", "mixer"), ("model", "positions"), ("run", "dir")]:
            d[section].pop(key)
        d["model"]["ffn"].pop("hidden_mult")  # involution's 4.8 makes up for q and k
        rest.append(d)
    assert all(d == rest[0] for d in rest)


@pytest.mark.parametrize("kind", ["involution", "inv_xcorr"])
def test_weight_decay_takes_the_generators_and_spares_the_static_filters(kind) -> None:
    from leviathan.parallel.optim import param_groups

    raw = {"model": {"vocab_size": 40, "block_size": 16, "n_head": 2, "d_model": 16}}
    raw["model"]["mixer"], raw["train"] = {"kind": kind}, {"seq_len": 16}
    model = Leviathan(config_from_dict(raw).model)
    decay, spare = param_groups(model, 0.1)
    names = {id(p): name for name, p in model.named_parameters()}
    decayed = {names[id(p)].split(".", 2)[-1] for p in decay["params"]}
    spared = {names[id(p)].split(".", 2)[-1] for p in spare["params"]}
    assert {"mixer.generator.w0", "mixer.generator.w1", "mixer.qkv.weight"} <= decayed
    static = {"mixer.bias"} if kind == "involution" else {"mixer.f", "mixer.g"}
    assert static | {"norm1.weight", "tok_emb.weight"} <= spared | {"tok_emb.weight"}
    assert not static & decayed
    assert decay["weight_decay"] == 0.1 and spare["weight_decay"] == 0.0


@pytest.mark.parametrize("rank, width, T", [(1, 1, 7), (1, 5, 7), (2, 3, 7), (1, 9, 4)])
def test_the_lag_sum_backward_is_its_forwards_gradient(rank, width, T) -> None:
    """The hand-written backward of the generated lag sum (one buffer, not one per lag)
    against finite differences, with every length of history the cache can hand it."""
    from leviathan.model.involution import generated_lag_stack

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, T, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(2, 3, T, rank, width, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(generated_lag_stack, (x, w))
    for past in range(1, width):
        h = torch.randn(2, 3, past, 4, dtype=torch.float64, generator=gen, requires_grad=True)
        assert torch.autograd.gradcheck(generated_lag_stack, (x, w, h))
