"""Expert parallelism, applied to a model built whole: the model itself knows no ranks.

Every rank builds the same full model from the same seed; `parallelize` then keeps, in
each MoE layer with ffn.ep_size > 1, this rank's slice of the experts (their values as
the full initialisation drew them, so a run starts identical at every ep_size), gives
the layer its expert-parallel group, and tags the sharded parameters the way DeepSpeed
recognises expert parameters: `allreduce=False` and `group_name="ep_size_<n>"` make its
engine and ZeRO-1/2 reduce and partition them within the expert-data-parallel group
instead of the whole world. Replicated experts (ep_size 1) are reduced like the rest.
"""

from __future__ import annotations

from torch import nn

from leviathan.parallel.world import World
from moe import MoE


def parallelize(model: nn.Module, world: World) -> nn.Module:
    """Shard the experts of every expert-parallel MoE layer of `model` over world.ep_group."""
    for layer in model.modules():
        if isinstance(layer, MoE) and layer.options.ep_size > 1:
            layer.shard_experts(world.ep_group)
            for p in layer.experts.parameters():
                p.allreduce = False  # type: ignore[attr-defined]
                p.group_name = f"ep_size_{layer.options.ep_size}"  # type: ignore[attr-defined]
    return model
