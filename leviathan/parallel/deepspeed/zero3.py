"""Build the model sharded from its first parameter: ZeRO-3 models larger than one rank.

Under ZeRO-3 the model is constructed inside `deepspeed.zero.Init`, which partitions
each module's parameters over the ranks as soon as that module's constructor returns,
so no rank ever holds the whole model. The constructors draw from the torch RNG as an
eager build does; the GPT-2 init that runs after them (which would otherwise touch only
empty, partitioned tensors) is replayed module by module with that module's parameters
gathered, so the sharded model starts from exactly the eager model's values.
"""

from __future__ import annotations

import torch
from torch import nn

from leviathan.config import Config, ModelConfig
from leviathan.model import Leviathan
from leviathan.model.gpt import init_parameters
from leviathan.parallel.deepspeed.config import deepspeed_config


def build_partitioned(cfg: Config, model_cfg: ModelConfig, on_gpu: bool) -> Leviathan:
    """The model under ZeRO-3, partitioned over the ranks as it is built."""
    import deepspeed

    config = deepspeed_config(cfg, on_gpu=on_gpu)
    with deepspeed.zero.Init(config_dict_or_path=config):
        model = Leviathan(model_cfg)
    init_parameters(model, gathered)
    return model


def gathered(params: list[nn.Parameter]):
    """The whole values of partitioned parameters while inside; rank 0's edits are kept
    (every rank makes the same ones: the RNG is seeded alike)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def full_size(model: Leviathan) -> Leviathan:
    """`model`, or where ZeRO-3 holds only shards of it, its twin on the meta device (no
    memory): what counts parameters and FLOPs must see every parameter whole."""
    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        return model
    with torch.device("meta"):
        return Leviathan(model.cfg)
