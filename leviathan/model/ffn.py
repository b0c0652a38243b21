"""Position-wise feed-forward layers, chosen by name from `FFNS`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from leviathan.errors import ConfigError
from moe import MoE, MoEOptions, check_options


@dataclass
class DenseOptions:
    kind: str = "dense"
    activation: Literal["gelu", "swiglu"] = "gelu"
    hidden_mult: float = 4.0  # hidden width = hidden_mult * d_model (SwiGLU: 2/3 of it, GLU-fair)


class DenseFFN(nn.Module):
    """GELU MLP, or SwiGLU with two thirds of the width so both cost the same FLOPs."""

    Options: ClassVar[type] = DenseOptions

    def __init__(
        self, d_model: int, options: DenseOptions, dropout: float = 0.0, bias: bool = False
    ):
        super().__init__()
        self.options = options
        self.hidden = self.hidden_width(d_model, options)
        n_in = 2 if options.activation == "swiglu" else 1
        self.fc = nn.Linear(d_model, n_in * self.hidden, bias=bias)
        self.proj = nn.Linear(self.hidden, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)

    @staticmethod
    def hidden_width(d_model: int, options: DenseOptions) -> int:
        width = options.hidden_mult * d_model
        if options.activation == "swiglu":
            width = 2 * width / 3
        return max(1, int(round(width)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.options.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return self.dropout(self.proj(h))

    def flops_per_token(self) -> int:
        """Forward FLOPs per token (2 per multiply-add) of the two matmuls."""
        return 2 * (
            self.fc.in_features * self.fc.out_features
            + self.proj.in_features * self.proj.out_features
        )

    @classmethod
    def check(cls, options: DenseOptions, d_model: int) -> None:
        if options.hidden_mult <= 0:
            raise ConfigError(f"model.ffn.hidden_mult: must be positive, got {options.hidden_mult}")


class MoEFFN(MoE):
    """The `moe` package's sparse Mixture-of-Experts layer as a Leviathan FFN kind."""

    Options: ClassVar[type] = MoEOptions

    @classmethod
    def check(cls, options: MoEOptions, d_model: int) -> None:
        try:
            check_options(options)
        except ValueError as err:
            raise ConfigError(f"model.ffn.{err}") from None


def layer_ffn_options(options, layer: int):
    """`moe_every: n` puts the MoE in every n-th block (the last of each n) and, elsewhere,
    a dense FFN as wide as one expert, as Switch and GShard interleave them."""
    if not isinstance(options, MoEOptions) or (layer + 1) % options.moe_every == 0:
        return options
    return DenseOptions(activation=options.activation, hidden_mult=options.expert_hidden_mult)


FFNS: dict[str, type[nn.Module]] = {"dense": DenseFFN, "moe": MoEFFN}
