"""Lay a model over the ranks: the one place that turns a model config into the model a
rank trains. The model itself knows nothing of ranks, DeepSpeed or compilers.

The order, and why:
1. build: whole (every rank the same, from the same seed), or under ZeRO-3 partitioned
   as it is built (`deepspeed.zero3`), so no rank ever holds the whole model;
2. expert sharding: each rank keeps its slice of every MoE layer's experts
   (`parallel.ep_size` > 1; ZeRO-3 refuses it), and every MoE layer learns the group its
   loss-free bias is balanced over;
3. compile: each block's forward at `train.seq_len` (`torch_compile`);
4. activation checkpointing: wraps the block's forward as it now is, so a checkpointed
   block recomputes its compiled forward in backward (`activation_checkpointing`).
Steps 3 and 4 patch `block.forward` and leave the module tree and state_dict keys as they
are: checkpoints of every layout are interchangeable.
"""

from __future__ import annotations

from dataclasses import dataclass

from leviathan.config import Config, ModelConfig
from leviathan.model import Leviathan
from leviathan.parallel.activation_checkpointing import apply_activation_checkpointing
from leviathan.parallel.deepspeed.zero3 import build_partitioned, full_size
from leviathan.parallel.expert_sharding import shard_experts
from leviathan.parallel.torch_compile import apply_compile, resolve_compile
from leviathan.parallel.world import World


@dataclass
class LaidOut:
    model: Leviathan  # this rank's model, ready for its engine
    whole: Leviathan  # the model whole (a meta twin under ZeRO-3): what counts and FLOPs see
    compiled: bool


def lay_out(cfg: Config, model_cfg: ModelConfig, world: World) -> LaidOut:
    """Build the model of `model_cfg` for this rank of `world`, in the order above."""
    t = cfg.train
    if world.engine == "deepspeed" and cfg.parallel.zero_stage == 3:
        model = build_partitioned(cfg, model_cfg, world.device)
    else:
        model = Leviathan(model_cfg)
    shard_experts(model, world, cfg.parallel.ep_size)
    whole = full_size(model)
    run_tokens = t.max_steps * t.grad_accum * t.micro_batch_size * t.seq_len
    run_flops = 3 * whole.flops_per_token(t.seq_len) * run_tokens
    compiled = resolve_compile(t.compile, world.device, model_cfg.mixer.kind, run_flops)
    if compiled:
        apply_compile(model, t.seq_len)
    if t.activation_checkpointing:
        apply_activation_checkpointing(model)
    return LaidOut(model, whole, compiled)
