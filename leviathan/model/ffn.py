"""Position-wise feed-forward layers, chosen by name from `FFNS`: `FFN` is the contract.

Adding a kind is one `FFN` subclass (with its `Options` dataclass) and one registry entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

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


class FFN(nn.Module):
    """What a block asks of its FFN, (..., d) -> (..., d), and what the model asks of it.

    A `sparse` FFN routes tokens, and then also provides: `aux_loss`, the last forward's
    balance loss, which the training loss adds; `pop_metrics()`, its routing statistics
    since the last call; `active_params()`, the parameters one token passes through; and
    `after_optimizer_step()`, for state that moves outside the gradient.
    """

    Options: ClassVar[type]
    sparse: ClassVar[bool] = False

    def residual_projections(self) -> list[nn.Parameter]:
        """The weights that write into the residual stream (GPT-2 starts them smaller)."""
        raise NotImplementedError

    def flops_per_token(self) -> int:
        """Active forward FLOPs per token (2 per multiply-add)."""
        raise NotImplementedError

    @classmethod
    def describe(cls, options: Any) -> str:
        """The options in a few words, for tables (`leviathan compare`)."""
        return options.kind

    @classmethod
    def check(cls, options: Any, d_model: int) -> None:
        """Validate options against the model width; raise ConfigError naming the key."""


class DenseFFN(FFN):
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

    def residual_projections(self) -> list[nn.Parameter]:
        return [self.proj.weight]

    def flops_per_token(self) -> int:
        """Forward FLOPs per token (2 per multiply-add) of the two matmuls."""
        return 2 * (
            self.fc.in_features * self.fc.out_features
            + self.proj.in_features * self.proj.out_features
        )

    @classmethod
    def describe(cls, options: DenseOptions) -> str:
        return f"dense {options.activation} {options.hidden_mult:g}x"

    @classmethod
    def check(cls, options: DenseOptions, d_model: int) -> None:
        if options.hidden_mult <= 0:
            raise ConfigError(f"model.ffn.hidden_mult: must be positive, got {options.hidden_mult}")


class MoEFFN(MoE, FFN):
    """The `moe` package's sparse Mixture-of-Experts layer as a Leviathan FFN kind."""

    Options: ClassVar[type] = MoEOptions
    sparse = True

    def residual_projections(self) -> list[nn.Parameter]:
        shared = [] if self.shared is None else [self.shared.w_out]
        return [self.experts.w_out, *shared]

    def after_optimizer_step(self) -> None:
        self.update_bias()

    @classmethod
    def describe(cls, options: MoEOptions) -> str:
        text = f"moe {options.n_experts}e top-{options.top_k} {options.expert_hidden_mult:g}x"
        if options.n_shared:
            text += f" +{options.n_shared} shared"
        if options.moe_every > 1:
            text += f" every {options.moe_every}"
        return text

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


FFNS: dict[str, type[FFN]] = {"dense": DenseFFN, "moe": MoEFFN}
