"""MoE inside Leviathan: config keys, parameter counts, and a short tiny-moe training run."""

import json

import pytest
import torch

from leviathan.config import config_from_dict, load_config
from leviathan.errors import ConfigError
from leviathan.model import Leviathan
from leviathan.model.ffn import DenseFFN, MoEFFN
from leviathan.train.plots import balance_figure, expert_load_figure, save
from leviathan.train.trainer import train


def moe_model(**ffn) -> Leviathan:
    raw = {
        "model": {
            "vocab_size": 50,
            "block_size": 16,
            "n_layer": 4,
            "n_head": 2,
            "d_model": 16,
            "ffn": {"kind": "moe", "n_experts": 4, "top_k": 2, "expert_hidden_mult": 2.0, **ffn},
        },
        "train": {"seq_len": 16},
    }
    torch.manual_seed(0)
    return Leviathan(config_from_dict(raw).model)


def test_moe_every_interleaves_dense_blocks():
    model = moe_model(moe_every=2)
    kinds = [type(b.ffn) for b in model.blocks]
    assert kinds == [DenseFFN, MoEFFN, DenseFFN, MoEFFN]
    assert model.blocks[0].ffn.hidden == 32  # as wide as one expert


def test_active_parameters_by_hand():
    model = moe_model(n_shared=1)
    d, E, k, h, L = 16, 4, 2, 32, 4
    expert = d * h + h * d  # no biases
    router = d * E
    total_ffn = router + (E + 1) * expert
    active_ffn = router + (k + 1) * expert
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    assert model.num_params() - model.active_params() == L * (total_ffn - active_ffn)


def test_aux_loss_reaches_the_objective_and_is_zero_without_balance():
    model = moe_model()
    idx = torch.randint(0, 50, (2, 16))
    model(idx, idx)
    assert model.aux_loss().item() > 0 and model.aux_loss().requires_grad
    quiet = moe_model(balance="none", z_coef=0.0)
    quiet(idx, idx)
    assert quiet.aux_loss().item() == 0


@pytest.mark.parametrize(
    "ffn,message",
    [
        ({"top_k": 5}, r"model\.ffn\.top_k: must be <= n_experts \(4\), got 5"),
        ({"ep_size": 3}, r"parallel\.ep_size: 3 does not divide model\.ffn\.n_experts=4"),
        ({"aux_coef": -0.1}, r"model\.ffn\.aux_coef: must be >= 0"),
        ({"capacity_factor": 0}, r"model\.ffn\.capacity_factor: must be positive"),
        ({"balance": "magic"}, r"model\.ffn\.balance: expected one of 'aux', 'loss_free', 'none'"),
        ({"n_expert": 4}, r"model\.ffn\.n_expert: unknown key"),
    ],
)
def test_bad_moe_config_names_the_key(ffn, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"model": {"ffn": {"kind": "moe", "n_experts": 4, **ffn}}})


def test_tiny_moe_matches_tiny_active_parameters():
    dense, sparse = (load_config(f"configs/{n}.yaml").model for n in ("tiny", "tiny-moe"))
    dense.vocab_size = sparse.vocab_size = 2048
    dense_model, moe_model_ = Leviathan(dense), Leviathan(sparse)
    router_params = 4 * 192 * 8
    assert moe_model_.active_params() == dense_model.num_params() + router_params
    assert moe_model_.num_params() > 3 * dense_model.num_params() // 2


@pytest.mark.slow
def test_tiny_moe_trains_and_writes_routing_metrics(tmp_path):
    cfg = load_config(
        "configs/tiny-moe.yaml",
        [
            f"run.dir={tmp_path / 'run'}",
            "run.wandb=offline",
            f"data.dir={tmp_path / 'data'}",
            "model.ffn.capacity_factor=1.25",
            "data.tokenizer.vocab_size=512",
            "model.n_layer=2",
            "model.d_model=64",
            "train.max_steps=60",
            "train.micro_batch_size=8",
            "train.eval_interval=30",
            "train.eval_tokens=4096",
            "train.ckpt_interval=60",
            "train.warmup_steps=10",
            "run.sample_tokens=8",
        ],
    )
    train(cfg, log=lambda *_: None)
    records = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    losses = [r["train_loss"] for r in records]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.5  # loss falls
    for r in records:
        for layer in ("layer0", "layer1"):
            stats = r["moe"][layer]
            assert len(stats["load"]) == 8
            assert sum(stats["load"]) == 8 * 128 * 2  # every token routed to top-2
    final = records[-1]["moe"]
    assert all(final[layer]["imbalance"] < 2.5 for layer in final)  # bounded, 8 experts
    assert (tmp_path / "run" / "expert_load.png").is_file()
    for layer in final:  # capacity mode: drops per sixteenth of the sequence
        by_position = final[layer]["dropped_frac_by_position"]
        assert len(by_position) == 16 and all(0 <= f <= 1 for f in by_position)
    # the load heatmap reached W&B as an image at each evaluation (steps 30 and 60)
    media = tmp_path / "run" / "wandb"
    images = sorted(media.glob("offline-run-*/files/media/images/moe/expert_load_*.png"))
    assert len(images) == 2, sorted(str(p) for p in media.rglob("*.png"))


def test_expert_load_and_balance_figures(tmp_path):
    records = [
        {
            "step": step,
            "moe": {
                layer: {
                    "load": [4 * step, 10, 10, 20],
                    "imbalance": 1.0 + step / 10,
                    "dropped_frac": 0.01,
                    "aux_loss": 1.1,
                    "z_loss": 2.0,
                }
                for layer in ("layer1", "layer3")
            },
        }
        for step in range(1, 6)
    ]
    load = expert_load_figure(records)
    assert len(load.axes) == 3  # a heatmap per MoE layer, then one colour bar for all
    norms = {id(ax.images[0].norm) for ax in load.axes[:2]}
    assert len(norms) == 1 and load.axes[0].images[0].norm.vcenter == 0.25  # one scale, 1/E
    assert "1/E = 0.25" in [t.get_text() for t in load.axes[2].get_yticklabels()]
    balance = balance_figure(records)
    titles = [ax.get_title() for ax in balance.axes]
    assert len(titles) == 4 and titles[0].startswith("imbalance") and "z-loss" in titles[3]
    for name, fig in (("load.png", load), ("balance.png", balance)):
        save(fig, tmp_path / name)
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
