"""Learning-rate schedule: linear warmup, then cosine decay to min_lr."""

import math


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """LR for optimizer step `step` (0-based); a pure function, so resume needs no state."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if max_steps <= warmup_steps:
        return lr
    progress = min(1.0, (step - warmup_steps) / (max_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
