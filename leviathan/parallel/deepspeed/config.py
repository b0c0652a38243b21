"""The DeepSpeed JSON, derived from the Leviathan config: never kept by hand."""

from __future__ import annotations

import copy
from typing import Any

from leviathan.config import Config

NEVER = 2**31 - 1  # DeepSpeed's own step printing: the loop logs instead


def deepspeed_config(cfg: Config, on_gpu: bool = False) -> dict[str, Any]:
    """Batch, accumulation, clipping, ZeRO stage, precision and AdamW from `cfg`, with the
    user's `parallel.deepspeed` mapping merged over them (theirs wins, key by key).

    The global batch is left for DeepSpeed to derive (micro x accumulation x ranks). The
    learning rate here is only the initial value: the loop sets it every step from its
    own schedule. On CPU the optimizer is torch's AdamW; on GPU DeepSpeed's fused Adam.
    """
    t, p = cfg.train, cfg.parallel
    derived = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": p.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "initial_scale_power": 16},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": t.lr,
                "betas": [t.beta1, t.beta2],
                "eps": 1e-8,
                "weight_decay": t.weight_decay,
                "torch_adam": not on_gpu,
            },
        },
        "steps_per_print": NEVER,
        "wall_clock_breakdown": False,
    }
    return merge(derived, p.deepspeed)


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with `extra` laid over it; nested mappings merge, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
