"""Expert parallelism, applied to a model built whole: the model itself knows no ranks.

Every rank builds the same full model from the same seed; `shard_experts` then keeps, in
each MoE layer, this rank's slice of the experts when `parallel.ep_size` > 1 (their values
as the full initialisation drew them, so a run starts identical at every ep_size), gives
the layer its expert-parallel group, and tags the sharded parameters the way DeepSpeed
recognises expert parameters: `allreduce=False` and `group_name="ep_size_<n>"` make its
engine and ZeRO-1/2 reduce and partition them within the expert-data-parallel group
instead of the whole world. Replicated experts (ep_size 1) are reduced like the rest.
Every MoE layer of a run on several ranks also gets the world as its balance group: its
router is replicated on every rank, so the loss-free bias moves by the global batch's load.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from leviathan.parallel.world import World
from moe import MoE


def shard_experts(model: nn.Module, world: World, ep_size: int) -> nn.Module:
    """Split the experts of every MoE layer of `model` over `world.ep_group` (`ep_size` > 1)
    and give each layer the world as the group its loss-free bias is balanced over."""
    for layer in model.modules():
        if not isinstance(layer, MoE):
            continue
        if world.world_size > 1:
            layer.balance_group = dist.group.WORLD
        if ep_size > 1:
            layer.shard_experts(world.ep_group)
            for p in layer.experts.parameters():
                p.allreduce = False  # type: ignore[attr-defined]
                p.group_name = f"ep_size_{ep_size}"  # type: ignore[attr-defined]
    return model
