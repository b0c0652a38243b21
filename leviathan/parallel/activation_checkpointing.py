"""Activation checkpointing (`train.activation_checkpointing`): memory for compute.

Each block's forward runs under `torch.utils.checkpoint` (non-reentrant): only the
block's input is kept for backward, and its activations are recomputed from it when the
backward reaches the block, about one more forward per step for activations of one
block at a time instead of all of them. Applied to a built model from the training side,
so the model stays unaware of it and both engines (plain torch, DeepSpeed) run it alike.

Recomputation runs the block's forward a second time, in training mode. Whatever that
forward writes into its modules' plain attributes is put back afterwards: an MoE layer
accumulates its routing metrics and its loss-free load count and sets `aux_loss` in
forward, and the recomputation must neither count a step twice nor replace the loss
the step added. Dropout and router jitter draw the same numbers again (checkpoint
restores the RNG state), so the recomputed activations, and the gradients, are those of
the plain run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

MODULE_INTERNALS = frozenset(vars(nn.Module()))  # parameters, buffers, submodules, hooks


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Checkpoint each of `model.blocks` (a Leviathan) in training; returns how many.

    Only a forward that builds a graph in training mode is checkpointed: evaluation,
    generation (and its cache) run the block as before. Applying it twice is a no-op.
    """
    wrapped = 0
    for block in model.blocks:
        if getattr(block, "activation_checkpointing", False):
            continue
        block.forward = checkpointed_forward(block)
        block.activation_checkpointing = True
        wrapped += 1
    return wrapped


def checkpointed_forward(block: nn.Module):
    plain = block.forward

    def forward(x: torch.Tensor, cache: Any = None) -> torch.Tensor:
        if cache is not None or not (block.training and torch.is_grad_enabled()):
            return plain(x, cache)
        return checkpoint(
            plain,
            x,
            use_reentrant=False,
            context_fn=lambda: (contextlib.nullcontext(), forward_effects_undone(block)),
        )

    return forward


@contextlib.contextmanager
def forward_effects_undone(block: nn.Module) -> Iterator[None]:
    """Around a recomputation: the plain attributes of every module in `block` (not its
    parameters, buffers or submodules) are as they were before it when it ends, however
    it ends (non-reentrant checkpoint stops a recomputation early, by an exception, once
    it has the tensors it needs)."""
    saved = [
        (module, {k: snapshot(v) for k, v in vars(module).items() if k not in MODULE_INTERNALS})
        for module in block.modules()
    ]
    try:
        yield
    finally:
        for module, state in saved:
            module.__dict__.update(state)


def snapshot(value: Any) -> Any:
    """A copy that forward's in-place updates cannot reach: tensors outside autograd are
    cloned, dicts and lists copied; anything else (numbers, options, graph tensors such
    as an aux loss, which forward rebinds but never changes) is kept as it is."""
    if isinstance(value, torch.Tensor):
        return value if value.requires_grad else value.clone()
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.items()}
    if isinstance(value, list):
        return [snapshot(v) for v in value]
    return value
