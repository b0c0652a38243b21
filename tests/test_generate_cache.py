"""Cached generation equals the uncached loop (the oracle) for every mixer and FFN kind:
greedy tokens identical, the logits of every step close; past block_size too."""

import pytest
import torch

from leviathan.config import config_from_dict
from leviathan.model import Leviathan
from leviathan.model.cache import LayerCache
from leviathan.model.correlation import causal_lag_stack

VOCAB, BLOCK = 61, 24

MIXERS = {
    "dot": {"kind": "dot"},
    "token_xcorr-4x4-r1": {"kind": "token_xcorr", "window_q": 4, "window_k": 4, "rank": 1},
    "token_xcorr-3x2-r2": {"kind": "token_xcorr", "window_q": 3, "window_k": 2, "rank": 2},
    "token_xcorr-2x5-r2": {"kind": "token_xcorr", "window_q": 2, "window_k": 5, "rank": 2},
    "token_xcorr-1x3-r1": {"kind": "token_xcorr", "window_q": 1, "window_k": 3, "rank": 1},
    "channel_xcorr-2": {"kind": "channel_xcorr", "lags": 2},
    "channel_xcorr-0": {"kind": "channel_xcorr", "lags": 0},
    "dconv-3": {"kind": "dconv", "kernel": 3},
    "dconv-1": {"kind": "dconv", "kernel": 1},
    "involution-3,5": {"kind": "involution", "kernel": [3, 5], "groups": 4},
    "involution-1": {"kind": "involution", "kernel": 1, "softmax": False},
    "inv_xcorr-3x2-r2": {"kind": "inv_xcorr", "window_q": 3, "window_k": 2, "rank": 2},
}
FFNS = {
    "dense": {"kind": "dense", "activation": "gelu"},
    "swiglu": {"kind": "dense", "activation": "swiglu"},
    "moe-dropless": {"kind": "moe", "n_experts": 4, "top_k": 2, "expert_hidden_mult": 1.0},
    "moe-capacity": {
        "kind": "moe",
        "n_experts": 4,
        "top_k": 2,
        "expert_hidden_mult": 1.0,
        "capacity_factor": 0.5,
    },
}


def model_of(mixer: str, ffn: str = "dense", dtype=torch.float64, **shape) -> Leviathan:
    """A small model with random weights large enough that greedy tokens vary."""
    raw = {
        "model": {
            "vocab_size": VOCAB,
            "block_size": BLOCK,
            "n_layer": 2,
            "n_head": 2,
            "d_model": 16,
            "mixer": MIXERS[mixer],
            "ffn": FFNS[ffn],
        }
        | shape,
        "train": {"seq_len": shape.get("block_size", BLOCK)},
    }
    torch.manual_seed(0)
    model = Leviathan(config_from_dict(raw).model).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".f", ".g", ".alpha")):  # off the delta, so the lags matter
                p.add_(0.3 * torch.randn_like(p))
            elif p.dim() > 1:
                p.normal_(0.0, 0.3)
    return model.eval()


def generate_with_logits(model: Leviathan, prompt: torch.Tensor, n: int, **kwargs):
    """generate()'s tokens and the last-position logits of each of its forwards."""
    steps = []
    hook = model.head.register_forward_hook(lambda m, i, out: steps.append(out[:, -1]))
    try:
        out = model.generate(prompt, n, **kwargs)
    finally:
        hook.remove()
    return out, torch.stack(steps)


def assert_cached_equals_uncached(model, prompt, n, atol=1e-10, **kwargs):
    cached, cached_logits = generate_with_logits(model, prompt, n, **kwargs)
    plain, plain_logits = generate_with_logits(model, prompt, n, use_cache=False, **kwargs)
    assert cached.shape == (prompt.shape[0], prompt.shape[1] + n)
    assert torch.equal(cached, plain)
    torch.testing.assert_close(cached_logits, plain_logits, rtol=0, atol=atol)
    return cached


@pytest.mark.parametrize("ffn", ["dense", "swiglu", "moe-dropless"])
@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_greedy_cached_equals_uncached_past_block_size(mixer, ffn):
    model = model_of(mixer, ffn)
    assert model.can_cache()
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    out = assert_cached_equals_uncached(model, prompt, 2 * BLOCK, temperature=0)
    assert len(out[:, 5:].unique()) > 5  # the tokens vary: the comparison means something


@pytest.mark.parametrize("mixer", ["dot", "token_xcorr-3x2-r2", "dconv-3", "inv_xcorr-3x2-r2"])
def test_rope_rmsnorm_cached_equals_uncached(mixer):
    """Rotary positions (a cached step rotates by its absolute position) and RMSNorm."""
    model = model_of(mixer, "swiglu", positions="rope", norm="rmsnorm")
    assert model.pos_emb is None and isinstance(model.norm, torch.nn.RMSNorm)
    prompt = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(5))
    assert_cached_equals_uncached(model, prompt, 2 * BLOCK, temperature=0, context_keep=9)


@pytest.mark.parametrize("mixer", ["dot", "involution-3,5"])
def test_no_positions_cached_equals_uncached(mixer):
    model = model_of(mixer, positions="none")
    assert model.pos_emb is None
    prompt = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(6))
    assert_cached_equals_uncached(model, prompt, 2 * BLOCK, temperature=0, context_keep=9)


@pytest.mark.parametrize("keep", [1, 9, BLOCK // 2, BLOCK - 1])
@pytest.mark.parametrize("mixer", ["dot", "token_xcorr-3x2-r2", "channel_xcorr-2"])
def test_cut_context_cached_equals_uncached(mixer, keep):
    model = model_of(mixer)
    prompt = torch.randint(0, VOCAB, (2, 3), generator=torch.Generator().manual_seed(2))
    assert_cached_equals_uncached(model, prompt, 2 * BLOCK + 3, temperature=0, context_keep=keep)


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_prompt_of_one_token(mixer):
    model = model_of(mixer)
    assert_cached_equals_uncached(model, torch.tensor([[7]]), BLOCK + 4, temperature=0)


@pytest.mark.parametrize("mixer", ["token_xcorr-2x5-r2", "channel_xcorr-2", "involution-3,5"])
def test_prompt_longer_than_block_size(mixer):
    model = model_of(mixer)
    prompt = torch.randint(0, VOCAB, (2, BLOCK + 7), generator=torch.Generator().manual_seed(3))
    assert_cached_equals_uncached(model, prompt, 10, temperature=0)


@pytest.mark.parametrize("mixer", ["dot", "token_xcorr-4x4-r1", "channel_xcorr-2"])
def test_sampled_tokens_are_the_same_draws(mixer):
    model = model_of(mixer, "moe-dropless")
    prompt = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(4))
    runs = [
        model.generate(
            prompt,
            BLOCK + 10,
            temperature=0.9,
            top_k=20,
            generator=torch.Generator().manual_seed(5),
            use_cache=use_cache,
        )
        for use_cache in (True, False)
    ]
    assert torch.equal(*runs)


def test_each_row_of_a_batch_is_generated_as_alone():
    model = model_of("token_xcorr-3x2-r2")
    prompts = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(6))
    batch = model.generate(prompts, 30, temperature=0)
    for row in range(2):
        alone = model.generate(prompts[row : row + 1], 30, temperature=0, use_cache=False)
        assert torch.equal(batch[row : row + 1], alone)


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_forward_in_chunks_with_a_cache_equals_one_forward(mixer):
    """Blocks of several new positions after a filled cache: the offset causal mask."""
    model = model_of(mixer)
    idx = torch.randint(0, VOCAB, (2, BLOCK), generator=torch.Generator().manual_seed(7))
    whole, _ = model(idx)
    cache, pieces, at = model.new_cache(), [], 0
    for size in (5, 1, 3, 1, 1, 6, BLOCK - 17):
        logits, _ = model(idx[:, at : at + size], cache=cache)
        pieces.append(logits)
        at += size
    assert cache.length == BLOCK
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="longer than the model's positions"):
        model(idx[:, :1], cache=cache)


def test_capacity_mode_moe_falls_back_to_the_uncached_loop(monkeypatch):
    model = model_of("token_xcorr-3x2-r2", "moe-capacity")
    assert not model.can_cache()

    def refused():
        raise AssertionError("a capacity-mode MoE must not use the cache")

    monkeypatch.setattr(model, "new_cache", refused)
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(8))
    assert_cached_equals_uncached(model, prompt, BLOCK, temperature=0, atol=0)


def test_tiny_shape_in_float32_within_1e_5():
    """configs/tiny.yaml's shape (random weights), float32, across its block_size."""
    shape = dict(block_size=128, n_layer=4, n_head=4, d_model=192, vocab_size=2048)
    model = model_of("token_xcorr-4x4-r1", dtype=torch.float32, **shape)
    with torch.no_grad():  # the tiny init's scale: near-ties would make argmax arbitrary
        for name, p in model.named_parameters():
            if p.dim() > 1 and not name.endswith((".f", ".g")):
                p.normal_(0.0, 0.05)
    prompt = torch.randint(0, 2048, (2, 3), generator=torch.Generator().manual_seed(9))
    assert_cached_equals_uncached(model, prompt, 140, atol=1e-5, temperature=0)


def test_lag_stack_with_history_is_the_tail_of_the_whole_filter():
    torch.manual_seed(10)
    x, weights = torch.randn(2, 3, 11, 4), torch.randn(3, 2, 4)
    whole = causal_lag_stack(x, weights)
    for at in range(1, 11):
        history = x[:, :, max(0, at - 3) : at]
        tail = causal_lag_stack(x[:, :, at:], weights, history)
        assert torch.equal(tail, whole[:, :, at:])  # same sums in the same order
    with pytest.raises(ValueError, match="reach back 3"):
        causal_lag_stack(x[:, :, 5:], weights, x[:, :, :5])


def test_layer_cache_keeps_history_and_refuses_overflow():
    cache = LayerCache(capacity=4)
    x = torch.arange(2 * 5, dtype=torch.float64).view(1, 1, 5, 2)
    assert cache.history("q", x[:, :, :1], keep=2) is None
    assert torch.equal(cache.history("q", x[:, :, 1:4], keep=2), x[:, :, :1])
    assert torch.equal(cache.history("q", x[:, :, 4:], keep=2), x[:, :, 2:4])
    assert cache.history("k", x, keep=0) is None and cache.history("k", x, keep=0) is None
    keys, values = cache.append(x[:, :, :3], x[:, :, :3, :1])
    assert keys.shape == (1, 1, 3, 2) and values.shape == (1, 1, 3, 1) and cache.length == 3
    with pytest.raises(ValueError, match="holds 4 positions"):
        cache.append(x[:, :, :2], x[:, :, :2])


def test_context_keep_is_checked():
    model = model_of("dot")
    for keep in (0, BLOCK + 1):
        with pytest.raises(ValueError, match="context_keep"):
            model.generate(torch.tensor([[1]]), 2, context_keep=keep)


@pytest.mark.slow
def test_compiled_generation_equals_eager_in_few_graphs():
    """generate(compiled=True): the eager tokens, a bounded number of graphs (a static one,
    then one with the length symbolic) over every length and refills, the eager logits."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = model_of("token_xcorr-3x2-r2", dtype=torch.float32)
    prompt = torch.randint(0, VOCAB, (1, 3), generator=torch.Generator().manual_seed(3))
    kwargs = {"temperature": 0, "context_keep": BLOCK // 2}
    eager = model.generate(prompt, 2 * BLOCK, **kwargs)
    try:
        out = model.generate(prompt, 2 * BLOCK, compiled=True, **kwargs)
        frames = counters["frames"]["ok"]
        again = model.generate(prompt, BLOCK, compiled=True, **kwargs)
        assert counters["frames"]["ok"] == frames  # a second call reuses the graphs
        assert not counters["graph_break"]
        # the logits of compiled steps against eager ones, on the same tokens
        step, caches = torch.compile(model), [model.new_cache(), model.new_cache()]
        with torch.no_grad():
            for cache in caches:
                model(out[:, :4], cache=cache)
            for t in range(4, BLOCK):
                token = out[:, t : t + 1].clone(memory_format=torch.contiguous_format)
                fast, _ = step(token, cache=caches[0])
                plain, _ = model(out[:, t : t + 1], cache=caches[1])
                torch.testing.assert_close(fast, plain, rtol=0, atol=1e-5)
        assert counters["frames"]["ok"] == frames
    finally:
        torch._dynamo.reset()
    assert len(out[:, 3:].unique()) > 5
    assert torch.equal(out, eager)
    assert torch.equal(again, eager[:, : 3 + BLOCK])
    assert 1 <= frames <= 3
