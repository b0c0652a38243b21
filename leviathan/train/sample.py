"""Text sampled from a model: the loop's end-of-run sample, `leviathan sample`."""

from __future__ import annotations

from typing import Any

import torch

from leviathan.data import Tokenizer
from leviathan.model import Leviathan


def sample_text(
    model: Leviathan,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int | None = 200,
    seed: int = 0,
    **generate: Any,
) -> str:
    """Decode a seeded continuation of `prompt`, the prompt included. Generation is cached
    (`Leviathan.generate`: one position per token; capacity-mode MoE runs uncached);
    `generate` passes its other options (context_keep, compiled)."""
    device = next(model.parameters()).device
    ids = [tokenizer.encode(prompt) or [tokenizer.eos_id]]
    ids = torch.tensor(ids, dtype=torch.long, device=device)
    model.eval()
    generator = torch.Generator(device).manual_seed(seed)
    out = model.generate(ids, max_new_tokens, temperature, top_k, generator=generator, **generate)
    return tokenizer.decode(out[0].tolist())
