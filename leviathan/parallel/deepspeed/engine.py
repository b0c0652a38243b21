"""DeepSpeed under the one training loop: the loop's Engine protocol over a DeepSpeed engine.

ZeRO stages 0-3, fp32 / bf16 / fp16, gradient accumulation and clipping are DeepSpeed's;
the learning rate comes from the loop every step. A checkpoint is DeepSpeed's own sharded
one (`deepspeed/`, every rank writes its shard) plus `engine.json` with the layout it was
written with, so a checkpoint from N ranks can be resumed on M: it is first converted to
DeepSpeed's universal (layout-free) format, then loaded into the new layout; one whose
experts were split over ranks carries its own layout-free states (`ep_checkpoint`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from leviathan.config import Config
from leviathan.errors import CheckpointError
from leviathan.parallel.deepspeed.config import deepspeed_config
from leviathan.parallel.deepspeed.ep_checkpoint import (
    CONSOLIDATED,
    MOMENTS,
    all_experts,
    load_consolidated,
    load_universal,
    own_experts,
    save_moments,
)
from leviathan.parallel.optim import param_groups
from leviathan.parallel.step import Batch, StepResult, TrainableModel
from leviathan.parallel.world import World

TAG = "deepspeed"  # the DeepSpeed checkpoint's sub-folder inside a step folder
LAYOUT = "engine.json"


class DeepSpeedEngine:
    """One rank of a DeepSpeed run; all ranks call every method together."""

    def __init__(self, model: TrainableModel, cfg: Config, world: World):
        self.model = model
        self.rank, self.world_size, self.device = world.rank, world.world_size, world.device
        self.layout = {
            "engine": "deepspeed",
            "world_size": world.world_size,
            "zero_stage": cfg.parallel.zero_stage,
            "ep_size": cfg.parallel.ep_size,
            "precision": cfg.train.precision,
        }
        self.zero_stage = cfg.parallel.zero_stage
        self.grad_accum = cfg.train.grad_accum
        self.ep_group = world.ep_group
        self.config = deepspeed_config(cfg, on_gpu=world.device.type == "cuda")
        self.ds = build_deepspeed(model, cfg.train.weight_decay, self.config, self.layout)

    def train_step(self, micro_batches: list[Batch], lr: float) -> StepResult:
        if len(micro_batches) != self.grad_accum:
            raise ValueError(
                f"{len(micro_batches)} micro-batches, DeepSpeed expects "
                f"{self.grad_accum} (train.grad_accum)"
            )
        self.ds.train()
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss, aux
        for x, y in micro_batches:
            _, loss = self.ds(x.to(self.device), y.to(self.device))
            aux = self.model.aux_loss()
            self.ds.backward(loss + aux)
            self.ds.step()  # steps the optimizer only at the accumulation boundary
            sums[0] += loss.detach()  # summed on the device: no sync per micro-batch
            sums[1] += aux.detach()
        if self.ds.was_step_applied():  # fp16 overflow: the step was skipped, so is the bias
            self.model.after_optimizer_step()
        dist.all_reduce(sums)  # report the whole world's mean, as one rank would see it
        mean = sums / (len(micro_batches) * self.world_size)
        norm = self.ds.get_global_grad_norm()
        return StepResult(
            loss=float(mean[0]),
            aux_loss=float(mean[1]),
            grad_norm=float("nan") if norm is None else float(norm),
        )

    def barrier(self) -> None:
        dist.barrier()

    def local_param_numel(self) -> int:
        """Parameter elements this rank holds: under ZeRO-3 about 1/world of the model."""
        return sum(
            p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
            for p in self.model.parameters()
        )

    def save(self, directory: Path) -> None:
        self.ds.save_checkpoint(str(directory), tag=TAG, save_latest=False)
        consolidated = full_state(self.model, self.ep_group) if self.ep_group else None
        if self.ep_group:  # what a resume on another world size or ep_size needs
            save_moments(self.ds, self.model, self.ep_group, directory / MOMENTS)
        if self.rank == 0:
            (directory / LAYOUT).write_text(json.dumps(self.layout, indent=1), encoding="utf-8")
            if consolidated is not None:
                torch.save(consolidated, directory / CONSOLIDATED)

    def load(self, directory: Path) -> None:
        saved = read_layout(directory)
        if saved.get("engine") != "deepspeed":
            raise CheckpointError(
                f"checkpoint {directory} was written by the {saved.get('engine')} engine; "
                "resume it with parallel.engine=torch (a plain process)"
            )
        same_ep = saved["ep_size"] == self.layout["ep_size"]
        same = same_ep and all(saved[k] == self.layout[k] for k in ("world_size", "zero_stage"))
        if same or (same_ep and saved["zero_stage"] == 0 == self.layout["zero_stage"]):
            load_native(self.ds, directory)
            if self.ep_group:
                restore_experts(self.model, directory / CONSOLIDATED, self.ep_group)
        elif saved["ep_size"] > 1:  # experts split over ranks: from their consolidated states
            load_consolidated(self.ds, self.model, directory, self.ep_group)
        elif self.layout["ep_size"] > 1:  # every expert on every rank, now split over them
            with self.universal(directory) as universal:
                load_universal(self.ds, self.model, universal / TAG, directory / TAG, self.ep_group)
        else:
            self.load_resharded(directory)

    def load_resharded(self, directory: Path) -> None:
        """Another world size or ZeRO stage: via DeepSpeed's universal checkpoint."""
        hyper = [
            {k: v for k, v in g.items() if k != "params"} for g in self.ds.optimizer.param_groups
        ]
        with self.universal(directory) as universal:
            self.ds._config.load_universal_checkpoint = True
            try:
                load_native(self.ds, universal)
                repair_zero3_universal_load(self.ds.optimizer, hyper)
            finally:
                self.ds._config.load_universal_checkpoint = False

    @contextlib.contextmanager
    def universal(self, directory: Path) -> Iterator[Path]:
        """The checkpoint in `directory` converted to DeepSpeed's universal (layout-free)
        format, by rank 0, for every rank while inside; removed on leaving."""
        universal = directory.parent / f".universal-{directory.name}"
        if self.rank == 0:
            shutil.rmtree(universal, ignore_errors=True)
            to_universal(directory / TAG, universal / TAG)
        dist.barrier()
        try:
            yield universal
        finally:
            dist.barrier()
            if self.rank == 0:
                shutil.rmtree(universal, ignore_errors=True)

    @staticmethod
    def read_state(directory: Path) -> dict[str, torch.Tensor]:
        """The full fp32 weights (tied head included) of a checkpoint written at any layout."""
        state = deepspeed_state(directory)
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        state.setdefault("head.weight", state["tok_emb.weight"])
        return state


def deepspeed_state(directory: Path) -> dict[str, torch.Tensor]:
    """The weights of a DeepSpeed checkpoint as its layout stored them."""
    layout = read_layout(directory)
    if layout["ep_size"] > 1:  # the engine wrote it whole: DeepSpeed's tools cannot
        return torch.load(directory / CONSOLIDATED, map_location="cpu", weights_only=True)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    if layout["zero_stage"] == 0:
        states = directory / TAG / "mp_rank_00_model_states.pt"
        return torch.load(states, map_location="cpu", weights_only=False)["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=TAG)


def full_state(model: nn.Module, ep_group: Any) -> dict[str, torch.Tensor] | None:
    """The whole model's fp32 weights, every expert included, for rank 0 (every rank
    calls it: the gathers are collective; the others get None).

    DeepSpeed writes only its own MoE class's experts to expert files: for ours, rank 0's
    model states hold rank 0's experts and the others' live only in their optimizer
    shards, which its consolidation tools cannot read. So an expert-parallel checkpoint
    also carries this file, from which `leviathan export` / `eval` / `sample` load. Values
    are the optimizer's fp32 masters where DeepSpeed keeps them (ZeRO-1/2, bf16), else
    the weights themselves.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    keep = dist.get_rank() == 0
    state = {}
    for name, param in model.named_parameters():
        value = safe_get_full_fp32_param(param)
        value = (param.detach() if value is None else value).float()
        value = all_experts(param, value, ep_group)
        if keep:
            state[name] = value.cpu()
    if not keep:
        return None
    saved = model.state_dict().keys()  # persistent buffers only
    state |= {k: b.detach().cpu() for k, b in model.named_buffers() if k in saved}
    return state


def restore_experts(model: nn.Module, consolidated: Path, ep_group: Any) -> None:
    """Give each expert-parallel rank back its own experts' weights.

    DeepSpeed reloads every rank's module from rank 0's model states, so the other ranks
    come back holding rank 0's experts (seen under ZeRO-2: its fp32 masters were right,
    the module's experts were rank 0's, and the first step after a resume was off by
    7.5e-4). Each rank takes its slice of the consolidated file instead; memory-mapped,
    so a rank reads its own experts, not the whole model.
    """
    state = torch.load(consolidated, map_location="cpu", weights_only=True, mmap=True)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if getattr(param, "group_name", None):
                param.copy_(own_experts(param, state[name], ep_group))


def repair_zero3_universal_load(optimizer: Any, hyper: list[dict]) -> None:
    """Undo two slips of DeepSpeed's ZeRO-3 universal loader (0.19.8).

    It gives every parameter group the first group's hyperparameters (weight decay on
    norms and embeddings): ours come back from before the load. And it hands one `step`
    tensor to every partition's state, which torch's AdamW then increments in place once
    per partition per step, skewing the bias correction: each gets its own copy.
    """
    for group, values in zip(optimizer.param_groups, hyper, strict=True):
        group.update(values)
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def build_deepspeed(model: nn.Module, weight_decay: float, config: dict, layout: dict):
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
    from deepspeed.runtime.config import DeepSpeedConfig

    groups = param_groups(model, weight_decay)
    if layout["ep_size"] > 1:  # experts in their own groups, reduced over expert-data ranks
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    engine_class = expert_parallel_engine() if layout["ep_size"] > 1 else plain_engine()
    return engine_class(
        args=None,
        model=model,
        model_parameters=groups,
        config=config,
        config_class=DeepSpeedConfig(config),
    )


def plain_engine() -> type:
    from deepspeed.runtime.engine import DeepSpeedEngine as Base

    return Base


def expert_parallel_engine() -> type:
    """DeepSpeed's engine, told that the model has expert-parallel layers.

    DeepSpeed recognises only its own MoE class; `leviathan.parallel.expert_sharding` tags
    our split expert parameters the DeepSpeed way (`allreduce=False`, `group_name`), and
    this flag makes the engine and ZeRO-1/2 reduce and partition them within their
    expert-data-parallel groups.
    """
    from deepspeed.runtime.engine import DeepSpeedEngine as Base

    class ExpertParallelEngine(Base):
        def _configure_distributed_model(self, model: nn.Module) -> None:
            super()._configure_distributed_model(model)
            self.has_moe_layers = True
            self.num_experts = [ffn.options.n_experts for ffn in model.sparse_layers()]

    return ExpertParallelEngine


def load_native(ds: Any, directory: Path) -> None:
    path, _ = ds.load_checkpoint(
        str(directory), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load the checkpoint in {directory / TAG}")


def read_layout(directory: Path) -> dict:
    try:
        return json.loads((directory / LAYOUT).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"engine": "torch"}


def to_universal(source: Path, target: Path) -> None:
    """Convert one DeepSpeed checkpoint folder into the universal format."""
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main

    target.parent.mkdir(parents=True, exist_ok=True)
    main(
        Namespace(
            input_folder=str(source),
            output_folder=str(target),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,
        )
    )
