"""`leviathan params`: parameter and FLOP counts from a config, and the sizing helper."""

import pytest

from leviathan.cli import main
from leviathan.config import config_from_dict, load_config
from leviathan.errors import ConfigError
from leviathan.model import Leviathan
from leviathan.sizing import SizingError, match_size, model_size, with_value


def small(**model) -> dict:
    return {
        "model": {"block_size": 8, "n_layer": 2, "n_head": 2, "d_model": 16, **model},
        "data": {"tokenizer": {"vocab_size": 64}},
        "train": {"seq_len": 8},
    }


MOE = {"kind": "moe", "n_experts": 4, "top_k": 2, "expert_hidden_mult": 2.0}


@pytest.mark.parametrize(
    "model",
    [
        {"mixer": "dot"},
        {"mixer": {"kind": "token_xcorr", "window_q": 3, "window_k": 2, "rank": 2}, "bias": True},
        {"mixer": {"kind": "channel_xcorr", "lags": 2}, "ffn": {"kind": "dense", "hidden_mult": 3}},
        {"ffn": MOE},
        {"ffn": {**MOE, "n_shared": 1, "activation": "swiglu", "moe_every": 2}},
    ],
)
def test_counts_match_the_built_model(model):
    cfg = config_from_dict(small(**model))
    size = model_size(cfg)
    cfg.model.vocab_size = 64
    built = Leviathan(cfg.model)
    assert size.total == sum(p.numel() for p in built.parameters())  # tied head counted once
    assert size.active == built.active_params()
    assert size.flops_per_token == built.flops_per_token(8)
    assert size.vocab_size == 64


def test_active_parameters_of_moe_by_hand():
    size = model_size(config_from_dict(small(ffn=MOE)))
    d, vocab, block, experts, hidden = 16, 64, 8, 4, 32
    embeddings = vocab * d + block * d  # the head is tied to the token embedding
    attention = d * 3 * d + d * d
    norms = 2 * d
    router = experts * d
    expert = d * hidden + hidden * d
    per_block = norms + attention + router
    assert size.total == embeddings + 2 * (per_block + experts * expert) + d
    assert size.active == embeddings + 2 * (per_block + 2 * expert) + d


def test_vocab_comes_from_the_model_when_set():
    assert model_size(config_from_dict(small(vocab_size=100))).vocab_size == 100


def test_moe_matches_dense_active_parameters_within_two_percent():
    dense = load_config("configs/tiny.yaml")
    moe = load_config("configs/tiny-moe.yaml", ["model.ffn.expert_hidden_mult=1.0"])
    found = match_size(moe, dense, "model.ffn.expert_hidden_mult", active=True)
    assert found.value == pytest.approx(2.0, abs=0.05)
    assert abs(found.relative_error) <= 0.02
    again = model_size(with_value(moe, found.key, found.value))
    assert again.active == found.size.active
    assert abs(again.active / model_size(dense).active - 1) <= 0.02
    assert again.total > 2 * again.active  # 8 experts held, 2 used


def test_integer_key_stays_valid_and_within_two_percent():
    target = load_config("configs/tiny.yaml")
    half = load_config("configs/tiny.yaml", ["model.d_model=64", "model.mixer=dot"])
    found = match_size(half, target, "model.d_model")
    assert found.value % 4 == 0  # d_model divisible by n_head
    assert abs(found.relative_error) <= 0.02
    wider = match_size(half, model_size(target), "model.n_layer")  # a ModelSize target too
    assert isinstance(wider.value, int) and abs(wider.relative_error) <= 0.02


def test_sizing_that_cannot_reach_the_target_is_refused():
    tiny = load_config("configs/tiny.yaml", ["model.d_model=16", "model.n_layer=1"])
    # tiny.yaml's embeddings alone outweigh a 16-wide model: no FFN width gets that small
    with pytest.raises(SizingError, match=r"model\.ffn\.hidden_mult cannot bring parameters"):
        match_size(load_config("configs/tiny.yaml"), model_size(tiny), "model.ffn.hidden_mult")
    with pytest.raises(ConfigError, match="expected a numeric key"):
        match_size(tiny, tiny, "model.mixer.kind")
    with pytest.raises(ConfigError, match="no such config key"):
        match_size(tiny, tiny, "model.width")


def test_cli_params_prints_counts_and_the_override(capsys):
    assert main(["params", "configs/tiny.yaml", "model.n_layer=2"]) == 0
    out = capsys.readouterr().out
    size = model_size(load_config("configs/tiny.yaml", ["model.n_layer=2"]))
    assert f"{size.total:,} parameters ({size.active:,} active)" in out
    assert f"{size.flops_per_token / 1e6:.2f} MFLOPs/token" in out

    argv = ["params", "configs/tiny-moe.yaml", "model.ffn.expert_hidden_mult=1"]
    argv += ["--match", "configs/tiny.yaml", "--active", "--vary", "model.ffn.expert_hidden_mult"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("override: model.ffn.expert_hidden_mult=")
    assert "match active parameters" in lines[-2]

    # small.yaml's 32k x 768 embeddings alone outweigh tiny.yaml: no FFN width matches
    argv = ["params", "configs/small.yaml", "--match", "configs/tiny.yaml"]
    assert main([*argv, "--vary", "model.ffn.hidden_mult"]) == 2
    assert "error: model.ffn.hidden_mult cannot bring" in capsys.readouterr().err


def test_study_configs_are_matched_in_size_and_share_their_data():
    names = ["dot", "xcorr-w2", "xcorr-w4", "channel", "moe"]
    cfgs = {n: load_config(f"configs/study-{n}.yaml") for n in names}
    reference = model_size(cfgs["xcorr-w4"])
    for name in ["dot", "xcorr-w2", "channel"]:
        assert abs(model_size(cfgs[name]).total / reference.total - 1) <= 0.02, name
    moe = model_size(cfgs["moe"])
    assert abs(moe.active / reference.active - 1) <= 0.02
    assert cfgs["moe"].model.ffn.n_experts == 8 and cfgs["moe"].model.ffn.top_k == 2
    for cfg in cfgs.values():  # what `leviathan compare` requires
        assert cfg.to_dict()["data"] == cfgs["dot"].to_dict()["data"]
        assert cfg.to_dict()["train"] == cfgs["dot"].to_dict()["train"]
