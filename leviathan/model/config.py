"""The model's own config: what `Leviathan` is built from. It lives with the model (the
model imports nothing above it); `leviathan.config` reads it from YAML as `model:`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from leviathan.model.ffn import DenseOptions
from leviathan.model.mixers import DotOptions


@dataclass
class ModelConfig:
    vocab_size: int | None = None  # None: taken from the tokenizer; set: must match it
    block_size: int = 256  # the longest sequence the learned positions cover
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    dropout: float = 0.0
    bias: bool = False
    # rope: rotary, applied in the mixers; none: no position source but the mixer's own lags
    positions: Literal["learned", "rope", "none"] = "learned"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    mixer: Any = field(default_factory=DotOptions)  # the options dataclass of MIXERS[kind]
    ffn: Any = field(default_factory=DenseOptions)  # the options dataclass of FFNS[kind]
