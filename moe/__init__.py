"""Sparse Mixture-of-Experts FFN library (self-contained: imports nothing from leviathan)."""

from moe.balance import switch_aux_loss, update_bias, z_loss
from moe.dispatch import (
    Dispatcher,
    LocalDispatch,
    Plan,
    capacity,
    combine,
    drops_per_position,
    gather,
    plan,
)
from moe.experts import MLP, Experts
from moe.layer import MoE
from moe.options import MoEOptions, check_options
from moe.parallel import AllToAllDispatch, exchange_and_run
from moe.router import Router, Routing
from moe.stats import RoutingStats

__all__ = [
    "MLP",
    "AllToAllDispatch",
    "Dispatcher",
    "Experts",
    "LocalDispatch",
    "MoE",
    "MoEOptions",
    "Plan",
    "Router",
    "Routing",
    "RoutingStats",
    "capacity",
    "check_options",
    "combine",
    "drops_per_position",
    "exchange_and_run",
    "gather",
    "plan",
    "switch_aux_loss",
    "update_bias",
    "z_loss",
]
