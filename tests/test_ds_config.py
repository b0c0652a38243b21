"""The DeepSpeed JSON is derived from the Leviathan config, never kept by hand."""

import json

from leviathan.cli import main
from leviathan.config import load_config
from leviathan.parallel.deepspeed.config import deepspeed_config, merge


def test_derived_from_train_and_parallel():
    cfg = load_config(
        "configs/tiny.yaml",
        [
            "train.grad_accum=4",
            "train.grad_clip=0.5",
            "train.precision=bf16",
            "parallel.zero_stage=3",
            "train.weight_decay=0.05",
        ],
    )
    ds = deepspeed_config(cfg)
    assert ds["train_micro_batch_size_per_gpu"] == cfg.train.micro_batch_size
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 3}
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["optimizer"]["params"]["weight_decay"] == 0.05
    assert ds["optimizer"]["params"]["torch_adam"] is True  # CPU: torch's AdamW
    assert deepspeed_config(cfg, on_gpu=True)["optimizer"]["params"]["torch_adam"] is False
    assert "train_batch_size" not in ds  # DeepSpeed derives it from the number of ranks


def test_user_keys_are_layered_over_key_by_key(capsys):
    extra = "parallel.deepspeed={zero_optimization: {overlap_comm: true}, gradient_clipping: 2.0}"
    assert main(["ds-config", "configs/tiny.yaml", "parallel.zero_stage=2", extra]) == 0
    ds = json.loads(capsys.readouterr().out)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert ds["gradient_clipping"] == 2.0


def test_merge_does_not_touch_its_inputs():
    base = {"a": {"b": 1, "c": 2}, "d": [1]}
    extra = {"a": {"c": 3}, "d": [2]}
    assert merge(base, extra) == {"a": {"b": 1, "c": 3}, "d": [2]}
    assert base == {"a": {"b": 1, "c": 2}, "d": [1]} and extra == {"a": {"c": 3}, "d": [2]}


def test_bad_parallel_keys_are_named(capsys):
    assert main(["ds-config", "configs/tiny.yaml", "parallel.zero_stage=5"]) == 2
    assert "parallel.zero_stage: must be 0, 1, 2 or 3, got 5" in capsys.readouterr().err
    assert main(["ds-config", "configs/tiny.yaml", "parallel.deepspeed=[1]"]) == 2
    assert "parallel.deepspeed: expected a mapping" in capsys.readouterr().err
    assert (
        main(["ds-config", "configs/tiny.yaml", "train.precision=fp16", "parallel.engine=torch"])
        == 2
    )
    assert "train.precision: fp16 needs DeepSpeed" in capsys.readouterr().err
