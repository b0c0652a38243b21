"""Model size from a config, without data or weights: parameters, active parameters,
forward FLOPs per token; and the sizing helper that matches one config to another.

The model is built on PyTorch's `meta` device (shapes only, no memory, no init cost), so
counting a 10B-parameter config takes milliseconds and the counts are exactly what
`Leviathan.num_params()` / `active_params()` / `flops_per_token()` report for the real model.

The vocabulary, which the tokenizer normally supplies at train time, is `model.vocab_size`
when the config sets it, else the vocabulary of `data.tokenizer.model` when the config
reuses a SentencePiece model, else `data.tokenizer.vocab_size` (SentencePiece trains
exactly that many pieces or fails).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from leviathan.config import Config, apply_override, config_from_dict
from leviathan.errors import ConfigError, LeviathanError
from leviathan.model import Leviathan

DEFAULT_TOLERANCE = 0.02  # the sizing helper's acceptance: within 2% of the target


class SizingError(LeviathanError):
    """No value of the varied key brings the config within tolerance of the target."""


@dataclass(frozen=True)
class ModelSize:
    total: int  # parameters (tied embeddings counted once)
    active: int  # parameters one token passes through (MoE: top-k experts)
    flops_per_token: int  # active forward FLOPs per token at `seq_len`
    seq_len: int
    vocab_size: int

    def count(self, active: bool) -> int:
        return self.active if active else self.total


@dataclass(frozen=True)
class SizeMatch:
    key: str  # the dotted config key varied, e.g. model.d_model
    value: int | float  # its value in the matched config
    size: ModelSize  # the matched config's size
    target: ModelSize  # the size of the config matched against
    active: bool  # whether active (rather than total) parameters were matched

    @property
    def relative_error(self) -> float:
        """(matched - target) / target, in the parameters that were matched."""
        want = self.target.count(self.active)
        return (self.size.count(self.active) - want) / want

    @property
    def override(self) -> str:
        """The command-line override that produces the matched config."""
        return f"{self.key}={self.value}"


def vocab_size_of(cfg: Config) -> int:
    """The vocabulary the model will have (see the module docstring)."""
    if cfg.model.vocab_size is not None:
        return cfg.model.vocab_size
    if cfg.data.tokenizer.model:
        from leviathan.data import Tokenizer

        return Tokenizer.load(cfg.data.tokenizer.model).vocab_size
    return cfg.data.tokenizer.vocab_size


def model_size(cfg: Config) -> ModelSize:
    """Total and active parameters and forward FLOPs/token (at `train.seq_len`) of `cfg`."""
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.vocab_size = vocab_size_of(cfg)
    with torch.device("meta"):
        model = Leviathan(model_cfg)
    seq_len = cfg.train.seq_len
    return ModelSize(
        total=model.num_params(),
        active=model.active_params(),
        flops_per_token=model.flops_per_token(seq_len),
        seq_len=seq_len,
        vocab_size=model_cfg.vocab_size,
    )


def with_value(cfg: Config, key: str, value: int | float) -> Config:
    """A copy of `cfg` with dotted `key` set to `value`, parsed and validated again."""
    raw = cfg.to_dict()
    apply_override(raw, f"{key}={value!r}")
    return config_from_dict(raw)


def current_value(cfg: Config, key: str) -> int | float:
    """The value of dotted `key` in `cfg`; ConfigError unless it is a number."""
    node = cfg.to_dict()
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"--vary {key}: no such config key")
        node = node[part]
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        raise ConfigError(f"--vary {key}: expected a numeric key, it holds {node!r}")
    return node


def match_size(
    cfg: Config,
    target: Config | ModelSize,
    key: str = "model.d_model",
    *,
    active: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
) -> SizeMatch:
    """The value of `key` that brings `cfg`'s parameters (or active parameters) closest to
    `target`'s, within `tolerance` (relative), as a `SizeMatch` holding the override.

    Parameters grow monotonically with the sizing keys (model.d_model, model.n_layer,
    model.ffn.hidden_mult, model.ffn.expert_hidden_mult, model.ffn.n_experts, ...), so
    the search is a bisection. An integer key takes the valid integer (one the config accepts:
    model.d_model must stay divisible by model.n_head, say) on either side of the
    crossing that is closer. A float key is solved to high precision, then written with
    the fewest decimals (up to 6) that stay within 0.5% (or the tolerance, if tighter).
    Raises SizingError when the closest value is still outside the tolerance (the key
    cannot move the size enough, e.g. `--vary model.n_layer` of a model dominated by its
    embeddings) and ConfigError for a key that is not numeric.
    """
    want_size = target if isinstance(target, ModelSize) else model_size(target)
    want = want_size.count(active)
    start = current_value(cfg, key)
    sizes: dict[int | float, ModelSize | None] = {}

    def size_at(value: int | float) -> ModelSize | None:
        if value not in sizes:
            try:
                sizes[value] = model_size(with_value(cfg, key, value))
            except (ConfigError, ValueError, RuntimeError):
                sizes[value] = None  # not a valid config (shape constraint)
        return sizes[value]

    def params(value: int | float) -> int | None:
        size = size_at(value)
        return None if size is None else size.count(active)

    if isinstance(start, int):
        value = _solve_int(params, start, want)
    else:
        value = _solve_float(params, float(start), want, min(tolerance, 0.005))
    if value is None or size_at(value) is None:
        raise SizingError(f"no valid value of {key} gives {want:,} parameters")
    found = SizeMatch(key, value, size_at(value), want_size, active)
    if abs(found.relative_error) > tolerance:
        kind = "active parameters" if active else "parameters"
        raise SizingError(
            f"{key} cannot bring {kind} within {tolerance:.1%} of {want:,}: the closest, "
            f"{found.override}, gives {found.size.count(active):,} "
            f"({found.relative_error:+.2%}); vary another key"
        )
    return found


PROBE = 256  # how far to look for the next valid integer (e.g. the next multiple of n_head)


def _next_valid(params: Callable, value: int, step: int) -> int | None:
    """The first value from `value` in direction `step` (+1/-1) that builds, or None."""
    for candidate in range(value, value + step * PROBE, step):
        if candidate < 1:
            return None
        if params(candidate) is not None:
            return candidate
    return None


def _solve_int(params: Callable, start: int, want: int) -> int | None:
    """The valid integer whose parameter count is closest to `want` (ties: the smaller)."""
    above = lambda v: params(v) >= want  # noqa: E731 (only called on valid values)
    first = _next_valid(params, max(start, 1), 1) or _next_valid(params, max(start, 1), -1)
    if first is None:
        return None
    if above(first):  # shrink: find the largest valid value below the crossing
        lo, hi = 1, first
    else:  # grow until above, doubling
        lo, hi = first, first
        while True:
            nxt = _next_valid(params, hi * 2, 1)
            if nxt is None or hi > 1 << 24:
                return hi
            lo, hi = hi, nxt
            if above(hi):
                break
    # invariant: hi is valid and above; every valid value below lo is below the crossing
    while hi - lo > 1:
        mid = (lo + hi) // 2
        candidate = _next_valid(params, mid, 1)
        if candidate is None or candidate >= hi:
            lo = mid  # no valid value in [mid, hi)
        elif above(candidate):
            hi = candidate
        else:
            lo = candidate
    below = _next_valid(params, hi - 1, -1)
    if below is None:
        return hi
    return below if abs(params(below) - want) <= abs(params(hi) - want) else hi


def _solve_float(params: Callable, start: float, want: int, precision: float) -> float | None:
    """A float whose parameter count is closest to `want`, with the fewest decimals that
    stay within `precision` (relative) of it, or the closest found."""
    if params(start) is None:
        return None
    lo = hi = start
    while params(hi) is not None and params(hi) < want and hi < 1e6:
        lo, hi = hi, hi * 2
    while params(lo) is not None and params(lo) > want and lo > 1e-6:
        hi, lo = lo, lo / 2
    if params(lo) is None or params(hi) is None:
        return None
    for _ in range(40):
        mid = (lo + hi) / 2
        value = params(mid)
        if value is None:
            break
        lo, hi = (mid, hi) if value < want else (lo, mid)
    best = min((lo, hi), key=lambda v: abs(params(v) - want))
    error = lambda v: abs(params(v) - want) / want  # noqa: E731
    enough = max(precision, error(best))  # the width is an integer: best may be off too
    for decimals in range(1, 7):
        rounded = round(best, decimals)
        if rounded > 0 and params(rounded) is not None and error(rounded) <= enough:
            return rounded
    return best if math.isfinite(best) else None
