"""Config: typed parsing, dotted overrides, and errors that name the key."""

import pytest

from leviathan.config import apply_override, config_from_dict, load_config
from leviathan.data.scan import fallback_start
from leviathan.errors import ConfigError, DataError
from leviathan.model.mixers import TokenXcorrOptions


def test_default_config_loads_and_is_token_xcorr():
    cfg = load_config()
    assert cfg.model.mixer.kind == "token_xcorr"
    assert isinstance(cfg.model.mixer, TokenXcorrOptions)


def without(path: str, *keys: str) -> dict:
    """The config at `path` as a dict, without the dotted `keys`."""
    d = load_config(path).to_dict()
    for key in keys:
        section, name = key.split(".")
        d[section].pop(name)
    return d


def test_tiny_dot_differs_from_tiny_only_in_mixer_and_run_dir():
    assert load_config("configs/tiny-dot.yaml").to_dict()["model"]["mixer"] == {"kind": "dot"}
    keys = ("model.mixer", "run.dir")
    assert without("configs/tiny.yaml", *keys) == without("configs/tiny-dot.yaml", *keys)


def test_small_config_is_about_125m_parameters():
    from leviathan.model import Leviathan

    cfg = load_config("configs/small.yaml")
    cfg.model.vocab_size = cfg.data.tokenizer.vocab_size
    n = Leviathan(cfg.model).num_params()
    assert 115e6 < n < 135e6, n


STUDY2 = ["dot", "dconv", "xcorr", "dot-learned", "xcorr-learned"]


def test_study_v2_configs_differ_only_in_mixer_and_positions_and_match_in_size():
    from leviathan.sizing import model_size

    cfgs = {name: load_config(f"configs/study2-{name}.yaml") for name in STUDY2}
    sizes = {name: model_size(cfg).total for name, cfg in cfgs.items()}
    assert max(sizes.values()) / min(sizes.values()) - 1 < 0.012, sizes
    assert {n: c.model.positions for n, c in cfgs.items()} == {
        "dot": "rope", "dconv": "rope", "xcorr": "rope",
        "dot-learned": "learned", "xcorr-learned": "learned",
    }  # fmt: skip
    keys = ("model.mixer", "model.positions", "run.dir")
    rest = [without(f"configs/study2-{name}.yaml", *keys) for name in STUDY2]
    assert all(d == rest[0] for d in rest)
    assert cfgs["dot-learned"].model.mixer.kind == "dot"
    assert cfgs["xcorr"].model.mixer == cfgs["xcorr-learned"].model.mixer


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        "configs/tiny.yaml",
        ["model.n_layer=2", "train.lr=3e-4", "model.mixer.rank=2", "data.inputs=[a.txt, b]"],
    )
    assert cfg.model.n_layer == 2
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.model.mixer.rank == 2
    assert cfg.data.inputs == ["a.txt", "b"]


def test_kind_shorthand_and_switching_kind_by_override():
    cfg = load_config("configs/tiny.yaml", ["model.mixer=channel_xcorr"])
    assert cfg.model.mixer.kind == "channel_xcorr"
    raw = {"model": {"mixer": "token_xcorr"}}
    apply_override(raw, "model.mixer.window_q=2")
    assert config_from_dict(raw).model.mixer.window_q == 2


def test_int_accepted_for_float_but_not_bool_for_int():
    assert config_from_dict({"train": {"lr": 1}}).train.lr == 1.0
    with pytest.raises(ConfigError, match=r"model\.n_layer: expected int, got bool"):
        config_from_dict({"model": {"n_layer": True}})


BAD = [
    ({"model": {"n_layers": 4}}, r"model\.n_layers: unknown key; expected one of .*n_layer"),
    ({"modle": {}}, r"modle: unknown key"),
    ({"model": {"n_layer": "four"}}, r"model\.n_layer: expected int, got str 'four'"),
    (
        {"model": {"d_model": 100, "n_head": 3}},
        r"model\.d_model: 100 is not divisible by model\.n_head=3",
    ),
    (
        {"train": {"seq_len": 512}, "model": {"block_size": 256}},
        r"train\.seq_len: 512 is longer .*block_size=256",
    ),
    ({"train": {"lr": -1e-3}}, r"train\.lr: must be >= 0, got -0\.001"),
    ({"train": {"lr": 0}}, r"train\.lr: must be positive"),
    (
        {"model": {"mixer": {"kind": "flash"}}},
        r"model\.mixer\.kind: unknown 'flash'; expected one of dot",
    ),
    ({"model": {"mixer": {"kind": "token_xcorr", "rank": 9}}}, r"model\.mixer\.rank"),
    (
        {"model": {"mixer": {"kind": "token_xcorr", "widow_q": 2}}},
        r"model\.mixer\.widow_q: unknown key",
    ),
    (
        {"model": {"ffn": {"kind": "dense", "activation": "relu"}}},
        r"model\.ffn\.activation: expected one of 'gelu', 'swiglu'",
    ),
    ({"data": {"tokenizer": {"kind": "wordpiece"}}}, r"data\.tokenizer\.kind"),
    ({"data": {"val_fraction": 1.5}}, r"data\.val_fraction: must be in \[0, 1\)"),
    ({"data": {"inputs": "corpus.txt"}}, r"data\.inputs: expected list"),
    ({"train": {"min_lr": 1.0, "lr": 0.1}}, r"train\.min_lr: must be <= train\.lr"),
    ({"model": {"dropout": 1.0}}, r"model\.dropout"),
]


@pytest.mark.parametrize("raw,message", BAD)
def test_bad_config_names_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config("configs/tiny.yaml", ["model.n_layer"])
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(bad)


def test_the_val_fraction_prepare_advises_is_accepted():
    """`prepare` tells a user with one unsplittable document to set data.val_fraction=0:
    the config must take that advice (issue 11; the check once refused 0)."""
    with pytest.raises(DataError, match=r"set (data\.val_fraction=0)$") as err:
        fallback_start([1000], 0.05, "one.txt")
    advice = err.value.args[0].rsplit(" ", 1)[1]
    assert load_config("configs/tiny.yaml", [advice]).data.val_fraction == 0


def test_positions_and_norm_options():
    cfg = load_config(None, ["model.positions=rope", "model.norm=rmsnorm", "model.mixer=dconv"])
    assert (cfg.model.positions, cfg.model.norm, cfg.model.mixer.kind) == (
        "rope",
        "rmsnorm",
        "dconv",
    )
    assert cfg.model.mixer.kernel == 3
    with pytest.raises(
        ConfigError, match="model.positions: rope does not fit ChannelXcorrMixer: its circulant"
    ):
        load_config(None, ["model.positions=rope", "model.mixer=channel_xcorr"])
    with pytest.raises(ConfigError, match="head_dim=9 is odd"):
        load_config(None, ["model.positions=rope", "model.d_model=36", "model.n_head=4"])
    with pytest.raises(ConfigError, match="model.norm: expected one of"):
        load_config(None, ["model.norm=batchnorm"])
    with pytest.raises(ConfigError, match="model.positions: expected one of"):
        load_config(None, ["model.positions=alibi"])
