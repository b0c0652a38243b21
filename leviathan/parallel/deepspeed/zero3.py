"""Build the model sharded from its first parameter: ZeRO-3 models larger than one rank.

Under ZeRO-3 the model is constructed inside `deepspeed.zero.Init`, which partitions
each module's parameters over the ranks as soon as that module's constructor returns,
so no rank ever holds the whole model. The constructors draw from the CPU's torch RNG as
an eager build does: zero.Init overrides the dtype of the tensors they make but not the
device (its default, the rank's GPU, would draw from the CUDA generator), and moves each
module's parameters to the rank's device when the module is built; the buffers follow
after. The GPT-2 init that runs after them (which would otherwise touch only empty,
partitioned tensors) is replayed module by module with that module's parameters gathered
and drawn into fp32 CPU copies, so the sharded model starts from the eager model's values
on any device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from leviathan.config import Config, ModelConfig
from leviathan.model import Leviathan
from leviathan.model.gpt import init_parameters
from leviathan.parallel.deepspeed.config import deepspeed_config


def build_partitioned(cfg: Config, model_cfg: ModelConfig, device: torch.device) -> Leviathan:
    """The model under ZeRO-3, partitioned over the ranks as it is built, on `device`."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import DeepSpeedTensorOverride

    config = deepspeed_config(cfg, on_gpu=device.type == "cuda")
    dtype_only = [DeepSpeedTensorOverride.dtype]  # no device override: draws stay on the CPU
    with deepspeed.zero.Init(config_dict_or_path=config, tensor_overrides=dtype_only):
        model = Leviathan(model_cfg)
    buffers_to(model, device)
    init_parameters(model, gathered)
    return model


def buffers_to(model: nn.Module, device: torch.device) -> None:
    """Move every buffer to `device` (zero.Init moves parameters only; `model.to` would
    touch the partitioned parameters), keeping each buffer's dtype."""
    for module in model.modules():
        for name, buf in module.named_buffers(recurse=False):
            module._buffers[name] = buf.to(device)


@contextlib.contextmanager
def gathered(params: list[nn.Parameter]) -> Iterator[None]:
    """The whole values of partitioned parameters while inside, as fp32 CPU tensors, so
    what is drawn into them comes from the CPU generator in fp32 like the eager build's;
    they are copied back on leaving. Rank 0's edits are kept (every rank makes the same
    ones: the RNG is seeded alike)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        homes = [p.data for p in params]
        try:
            for p in params:
                p.data = p.data.to("cpu", torch.float32)
            yield
        finally:
            for p, home in zip(params, homes, strict=True):
                home.copy_(p.data)
                p.data = home


def full_size(model: Leviathan) -> Leviathan:
    """`model`, or where ZeRO-3 holds only shards of it, its twin on the meta device (no
    memory): what counts parameters and FLOPs must see every parameter whole."""
    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        return model
    with torch.device("meta"):
        return Leviathan(model.cfg)
