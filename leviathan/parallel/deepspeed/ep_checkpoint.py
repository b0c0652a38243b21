"""Expert-parallel checkpoints that resume on another world size or ep_size.

DeepSpeed reshards a checkpoint through its universal format, which knows only its own
MoE class: our experts, split over expert-parallel ranks, live in each rank's optimizer
shard where it cannot find them. So an expert-parallel checkpoint also carries every
parameter whole, every expert of every rank included: the fp32 weights (CONSOLIDATED,
which `export` reads too) and the Adam moments (MOMENTS), read with DeepSpeed's
`safe_get_full_fp32_param` / `safe_get_full_optimizer_state`. A resume on another layout
builds its engine fresh and sets each parameter's weight and moments from them, each
rank taking the slice of experts it now owns, with `safe_set_full_fp32_param` /
`safe_set_full_optimizer_state`. An ep_size 1 checkpoint resumes with experts split the
same way, from DeepSpeed's universal copy of it, which holds every parameter whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from leviathan.errors import CheckpointError

CONSOLIDATED = "consolidated.pt"  # the full fp32 weights, all experts, and buffers
MOMENTS = "consolidated_moments.pt"  # Adam's moments of every parameter, whole; its step
ADAM_KEYS = ("exp_avg", "exp_avg_sq")
MODEL_STATES = "mp_rank_00_model_states.pt"  # in a DeepSpeed checkpoint: the module's states


def all_experts(param: nn.Parameter, value: torch.Tensor, ep_group: Any) -> torch.Tensor:
    """`value` of the whole parameter: an expert-parallel rank's slice joined with the
    other ranks' (rank r holds experts r*E_local ..); other parameters as they are.
    Collective over `ep_group` for expert parameters."""
    if not getattr(param, "group_name", None):
        return value
    parts = [torch.empty_like(value) for _ in range(dist.get_world_size(ep_group))]
    dist.all_gather(parts, value.contiguous(), group=ep_group)
    return torch.cat(parts)


def own_experts(param: nn.Parameter, value: torch.Tensor, ep_group: Any) -> torch.Tensor:
    """This rank's slice of a whole (all experts) `value`; other parameters as they are."""
    if not getattr(param, "group_name", None):
        return value
    n, rank = param.shape[0], dist.get_rank(ep_group)
    return value[rank * n : (rank + 1) * n]


def save_moments(ds: Any, model: nn.Module, ep_group: Any, path: Path) -> None:
    """Write every parameter's Adam moments, whole, and the optimizer's step to `path`
    (rank 0 writes; every rank calls it: the gathers are collective). Nothing under
    ZeRO-0, whose optimizer DeepSpeed does not partition and cannot read this way."""
    from deepspeed.utils import safe_get_full_optimizer_state

    if ds.zero_optimization_stage() == 0:
        return
    link_fragments(ds.optimizer)
    keep = dist.get_rank() == 0
    moments: dict[str, dict[str, torch.Tensor]] = {key: {} for key in ADAM_KEYS}
    for name, param in model.named_parameters():
        for key in ADAM_KEYS:
            value = all_experts(param, safe_get_full_optimizer_state(param, key), ep_group)
            if keep:
                moments[key][name] = value.float().cpu()
    if keep:
        steps = [state["step"] for state in ds.optimizer.optimizer.state.values()]
        torch.save({"step": float(max(steps)), **moments}, path)


def load_consolidated(ds: Any, model: nn.Module, directory: Path, ep_group: Any) -> None:
    """Weights, buffers and Adam state of the expert-parallel checkpoint in `directory`
    into this engine, whatever its world size, ep_size or ZeRO stage (1-3)."""
    if not (directory / MOMENTS).is_file():
        raise CheckpointError(
            f"checkpoint {directory} was written at ZeRO-0, which keeps no partitioned "
            "optimizer state to consolidate: resume it on the layout it was written with"
        )
    load = {"map_location": "cpu", "weights_only": True, "mmap": True}
    weights = torch.load(directory / CONSOLIDATED, **load)
    set_states(ds, model, weights, torch.load(directory / MOMENTS, **load), ep_group)


def load_universal(ds: Any, model: nn.Module, universal: Path, native: Path, ep_group: Any):
    """An ep_size 1 checkpoint into expert-parallel ranks: DeepSpeed's universal copy of
    it (`universal`) holds every parameter whole, Adam moments too, the native one
    (`native`) the buffers; each rank takes its experts' slice."""

    def read(name: str, state: str) -> Any:
        path = universal / "zero" / name / f"{state}.pt"
        return torch.load(path, map_location="cpu", weights_only=False)

    names = [name for name, _ in model.named_parameters()]
    module = torch.load(native / MODEL_STATES, map_location="cpu", weights_only=False)["module"]
    weights = {name: read(name, "fp32")["param"] for name in names}
    weights |= {name: module[name] for name, _ in model.named_buffers() if name in module}
    moments = {key: {name: read(name, key)["param"] for name in names} for key in ADAM_KEYS}
    set_states(ds, model, weights, {"step": float(read(names[0], "step")), **moments}, ep_group)


def set_states(
    ds: Any, model: nn.Module, weights: dict, moments: dict, ep_group: Any | None
) -> None:
    """Every parameter's weight and Adam moments (whole: all experts) and the buffers,
    into this engine, each rank taking the experts it owns."""
    from deepspeed.utils import safe_set_full_optimizer_state

    if ds.zero_optimization_stage() == 0:
        raise CheckpointError(
            "a checkpoint resumes on another expert layout only at ZeRO stages 1-3 "
            "(DeepSpeed sets no optimizer state of ZeRO-0 by parameter): set "
            "parallel.zero_stage"
        )
    adam_state(ds.optimizer, moments["step"])
    for name, param in model.named_parameters():
        set_weight(param, own_experts(param, weights[name], ep_group))
        for key in ADAM_KEYS:
            value = own_experts(param, moments[key][name], ep_group)
            safe_set_full_optimizer_state(param, value.to(param.device), key)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name in weights:
                buffer.copy_(weights[name])


def set_weight(param: nn.Parameter, value: torch.Tensor) -> None:
    """The module's weight and the optimizer's fp32 master of it, both from `value`."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param

    with deepspeed.zero.GatheredParameters([param], modifier_rank=0), torch.no_grad():
        param.copy_(value)  # ZeRO-3: whole while inside, partitioned again on leaving
    safe_set_full_fp32_param(param, value.to(param.device))


def adam_state(zero_optimizer: Any, step: float) -> None:
    """Adam state at `step` for every fp32 partition, so the moments have a place to go.

    A fresh ZeRO-1/2 engine creates it only at its first step; here instead. Every
    partition gets its own step tensor (torch's AdamW increments it in place).
    """
    inner = zero_optimizer.optimizer
    for group in inner.param_groups:
        for flat in group["params"]:
            state = inner.state[flat]
            for key in ADAM_KEYS:
                state.setdefault(key, torch.zeros_like(flat))
            state["step"] = torch.tensor(step, dtype=torch.float32)
    link_fragments(zero_optimizer)


def link_fragments(zero_optimizer: Any) -> None:
    """Point every parameter's view of the Adam state at that state (ZeRO-1/2).

    DeepSpeed 0.19.8 links them once, after the optimizer's first step on its first
    parameter group, when the other groups (ours: decay, no decay, experts) have no
    state yet: their moments stay unreachable to `safe_get/set_full_optimizer_state`.
    ZeRO-3 reads the state directly and has nothing to link.
    """
    if hasattr(zero_optimizer, "_hp_optimizer_states_linked"):
        zero_optimizer._hp_optimizer_states_linked = False
        zero_optimizer._lazy_init_hp_params_optimizer_state()
