"""`train.compile`: the blocks under `torch.compile`, applied from the training side.

What is compiled: each block's forward at the training shape. A block with a dense FFN
is compiled whole (norms, mixer, FFN, residuals: one graph); a block with a routed (MoE)
FFN has only its mixer half (x + mixer(norm1(x))) compiled and its FFN left eager, since
the MoE layer has data-dependent shapes (tokens per expert), a per-expert Python loop,
`.tolist()` syncs and Python-side metrics, which would graph-break or recompile every step.
The embeddings, the head and the loss stay eager: the model's own forward, with its
cache argument, is not touched.

Shapes: graphs are specialised (`dynamic=False`) to sequences of `train.seq_len`
positions. Any other call runs the eager block: a KV-cached call (generation), a shorter
window (eval's final partial window, uncached generation). A new batch size at
`train.seq_len` (or no-grad eval mode) compiles once more: training compiles once (both
blocks share one frame) and eval once per batch shape it uses (the periodic eval's, the
final eval's full batches and their last, shorter one), a constant, never one per step
(tests/test_compile.py counts dynamo's frames: 4 for a whole `train()`).

Like activation checkpointing, this patches `block.forward` on the built model: the
module tree and its state_dict keys are unchanged (checkpoints of compiled and eager
runs are interchangeable) and both engines run it alike. The two combine: the
checkpointed block recomputes its compiled forward in backward.
"""

from __future__ import annotations

import shutil
from typing import Any

import torch
from torch import nn

# graphs specialised to one shape: a recompile is a new shape, never a new step
COMPILE_OPTIONS: dict[str, Any] = {"dynamic": False}


# measured (benchmarks/train_step.py, docs/benchmarks.md): on CPU compiling pays for the
# correlation mixers and involution (a study-v3 step at one thread, compiled / eager:
# involution 0.72, token_xcorr 0.96); dot's (1.09) and inv_xcorr's (1.06) eager steps
# are already as fast
CPU_GAINS = frozenset({"token_xcorr", "channel_xcorr", "involution"})
# a cold compile takes ~30 s on CPU and saves ~1/4 of a tiny step: below about 200 tiny
# steps of training FLOPs (~2.5 min eager on one core) it does not pay back
CPU_MIN_RUN_FLOPS = 1e13


def resolve_compile(
    setting: bool | str, device: torch.device, mixer: str, run_flops: float
) -> bool:
    """Whether to compile: `true`/`false` as given; `auto` by the measured rule: on CUDA
    always; on CPU when a C++ compiler exists (inductor needs one), the mixer is one
    compiling speeds up (CPU_GAINS) and the run is long enough (`run_flops`, the
    training FLOPs of every step of this rank) for the compilation to pay back."""
    if setting is True or setting is False:
        return setting
    if device.type == "cuda":
        return True
    if device.type != "cpu" or not has_cxx_compiler():
        return False
    return mixer in CPU_GAINS and run_flops >= CPU_MIN_RUN_FLOPS


def has_cxx_compiler() -> bool:
    return any(shutil.which(name) for name in ("g++", "c++", "clang++"))


def apply_compile(model: nn.Module, seq_len: int) -> int:
    """Compile each of `model.blocks` (a Leviathan) for sequences of `seq_len`; returns
    how many. Applying it twice is a no-op. Apply before activation checkpointing."""
    compiled = 0
    for block in model.blocks:
        if getattr(block, "compiled", False):
            continue
        block.forward = compiled_forward(block, seq_len)
        block.compiled = True
        compiled += 1
    return compiled


def compiled_forward(block: nn.Module, seq_len: int):
    plain = block.forward
    routed = hasattr(block.ffn, "pop_metrics")  # an MoE FFN: left eager

    def mixer_half(x: torch.Tensor) -> torch.Tensor:
        return x + block.mixer(block.norm1(x), None)

    fast = torch.compile(mixer_half if routed else plain, **COMPILE_OPTIONS)

    def forward(x: torch.Tensor, cache: Any = None) -> torch.Tensor:
        if cache is not None or x.shape[1] != seq_len:
            return plain(x, cache)
        if not routed:
            return fast(x)
        x = fast(x)
        return x + block.ffn(block.norm2(x))

    return forward
