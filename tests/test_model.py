"""The whole decoder: causality on both paths, tied head, counts, generation."""

import pytest
import torch

from leviathan.config import config_from_dict
from leviathan.model import MIXERS, Leviathan

MIXER_OPTIONS = {
    "dot": {"kind": "dot"},
    "token_xcorr": {"kind": "token_xcorr", "window_q": 3, "window_k": 2, "rank": 2},
    "channel_xcorr": {"kind": "channel_xcorr", "lags": 2},
    "dconv": {"kind": "dconv", "kernel": 3},
    "involution": {"kind": "involution", "kernel": [3, 5], "groups": 4},
    "inv_xcorr": {"kind": "inv_xcorr", "window_q": 3, "window_k": 2, "rank": 2},
}


def tiny_model(mixer: str, ffn: str = "gelu", **model) -> Leviathan:
    raw = {
        "model": {
            "vocab_size": 61,
            "block_size": 24,
            "n_layer": 2,
            "n_head": 2,
            "d_model": 16,
            "mixer": MIXER_OPTIONS[mixer],
            "ffn": {"kind": "dense", "activation": ffn},
            **model,
        },
        "train": {"seq_len": 24},
    }
    torch.manual_seed(0)
    model = Leviathan(config_from_dict(raw).model).double()
    with torch.no_grad():  # move the lag kernels off their delta so they matter
        for name, p in model.named_parameters():
            if name.endswith((".f", ".g", ".alpha", ".conv", ".w1")):
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def test_every_registered_mixer_is_covered():
    assert set(MIXER_OPTIONS) == set(MIXERS)


@pytest.mark.parametrize("reference", [False, True])
@pytest.mark.parametrize("ffn", ["gelu", "swiglu"])
@pytest.mark.parametrize("mixer", sorted(MIXER_OPTIONS))
def test_future_tokens_do_not_change_past_logits(mixer, ffn, reference):
    model = tiny_model(mixer, ffn)
    assert_causal(model, reference)


@pytest.mark.parametrize("reference", [False, True])
@pytest.mark.parametrize("mixer", ["dot", "token_xcorr", "dconv"])
def test_rope_rmsnorm_models_are_causal_and_paths_agree(mixer, reference):
    model = tiny_model(mixer, "swiglu", positions="rope", norm="rmsnorm")
    assert_causal(model, reference)
    idx = torch.randint(0, 61, (2, 20))
    fast, _ = model(idx)
    model.set_reference(not reference)
    other, _ = model(idx)
    torch.testing.assert_close(fast, other, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mixer", sorted(MIXER_OPTIONS))
def test_positions_none_adds_no_parameter_and_stays_causal(mixer):
    learned, none = tiny_model(mixer), tiny_model(mixer, positions="none")
    assert none.pos_emb is None
    assert learned.num_params() - none.num_params() == 24 * 16  # the block_size x C table
    assert_causal(none, reference=False)


def test_involution_without_positions_sees_offsets_only():
    """Kernels 3 and 5 reach 2 + 4 tokens back: with no position table, a token's logits
    depend on its last 7 tokens wherever they stand in the sequence."""
    model = tiny_model("involution", positions="none")
    x = torch.randint(0, 61, (2, 12))
    shifted = torch.cat([torch.randint(0, 61, (2, 5)), x], dim=1)
    alone, _ = model(x)
    later, _ = model(shifted)
    torch.testing.assert_close(later[:, 5 + 6 :], alone[:, 6:], rtol=1e-5, atol=1e-5)
    learned = tiny_model("involution")
    alone, _ = learned(x)
    later, _ = learned(shifted)
    assert not torch.allclose(later[:, 5 + 6 :], alone[:, 6:], atol=1e-3)


def assert_causal(model: Leviathan, reference: bool) -> None:
    model.set_reference(reference)
    idx = torch.randint(0, 61, (2, 20))
    t = 11
    changed = idx.clone()
    changed[:, t + 1 :] = torch.randint(0, 61, (2, 20 - t - 1))
    before, _ = model(idx)
    after, _ = model(changed)
    assert torch.equal(before[:, : t + 1], after[:, : t + 1])
    assert not torch.allclose(before[:, t + 1 :], after[:, t + 1 :])


@pytest.mark.parametrize("reference", [False, True])
@pytest.mark.parametrize("mixer", sorted(MIXER_OPTIONS))
def test_gradient_from_output_t_to_input_after_t_is_exactly_zero(mixer, reference):
    model = tiny_model(mixer)
    model.set_reference(reference)
    x = torch.randn(1, 16, 16, dtype=torch.float64, requires_grad=True)
    h = x + model.pos_emb.weight[:16]
    for block in model.blocks:
        h = block(h)
    t = 7
    (grad,) = torch.autograd.grad(h[0, t].sum(), x)
    assert torch.count_nonzero(grad[0, t + 1 :]) == 0
    assert torch.count_nonzero(grad[0, : t + 1]) > 0


@pytest.mark.parametrize("mixer", sorted(MIXER_OPTIONS))
def test_fast_and_reference_paths_agree_for_the_whole_model(mixer):
    model = tiny_model(mixer)
    idx = torch.randint(0, 61, (2, 24))
    fast, _ = model(idx)
    model.set_reference(True)
    ref, _ = model(idx)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)


def test_head_is_tied_and_parameters_are_counted_once():
    model = tiny_model("dot")
    assert model.head.weight is model.tok_emb.weight
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    expected_embeddings = 61 * 16 + 24 * 16
    assert model.num_params() - model.num_params(non_embedding=True) == expected_embeddings


def test_flops_per_token_counts_matmuls():
    model = tiny_model("dot", bias=False)
    d, T, V, L, ffn_hidden = 16, 24, 61, 2, 64
    attention = 2 * (T + 1) // 2 * 2 * d  # scores and P.V over the causal average (T+1)/2
    per_layer = 2 * (3 * d * d + d * d) + attention + 2 * (2 * d * ffn_hidden)
    assert model.flops_per_token(T) == L * per_layer + 2 * d * V


def test_sequence_longer_than_positions_is_refused():
    model = tiny_model("dot")
    with pytest.raises(ValueError, match="longer than the model's positions"):
        model(torch.zeros(1, 25, dtype=torch.long))


def test_generate_extends_and_is_seeded():
    model = tiny_model("token_xcorr")
    prompt = torch.randint(0, 61, (1, 5))
    a = model.generate(
        prompt, 30, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(3)
    )
    b = model.generate(
        prompt, 30, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(3)
    )
    greedy = model.generate(prompt, 30, temperature=0)
    assert a.shape == (1, 35) and torch.equal(a, b) and torch.equal(a[:, :5], prompt)
    assert torch.equal(greedy, model.generate(prompt, 30, temperature=0))


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    cfg = config_from_dict({"model": {"vocab_size": 50, "n_layer": 8, "d_model": 128}}).model
    model = Leviathan(cfg)
    proj = model.blocks[0].mixer.proj.weight.std().item()
    qkv = model.blocks[0].mixer.qkv.weight.std().item()
    assert qkv == pytest.approx(0.02, rel=0.05)
    assert proj == pytest.approx(0.02 / 4, rel=0.1)


@pytest.mark.parametrize("mixer", sorted(MIXER_OPTIONS))
def test_residual_projections_are_the_output_weights(mixer):
    """The contract (Mixer / FFN.residual_projections) names what GPT-2's init shrinks:
    exactly the output weights the name rule `proj.weight` / `w_out` once picked, so a
    seeded model starts where it always did."""
    moe = {"kind": "moe", "n_experts": 4, "n_shared": 1, "moe_every": 2}
    for ffn in ({"kind": "dense", "activation": "swiglu"}, moe):
        raw = {"model": {"vocab_size": 61, "n_layer": 2, "n_head": 2, "d_model": 16}}
        raw["model"] |= {"mixer": MIXER_OPTIONS[mixer], "ffn": ffn}
        model = Leviathan(config_from_dict(raw).model)
        named = {id(p): n for n, p in model.named_parameters()}
        chosen = {
            named[id(p)]
            for b in model.blocks
            for p in b.mixer.residual_projections() + b.ffn.residual_projections()
        }
        assert chosen == {n for n in named.values() if n.endswith(("proj.weight", "w_out"))}
        assert any("experts.w_out" in n for n in chosen) == (ffn is moe)
