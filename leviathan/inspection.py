"""`leviathan inspect`: what a correlation-attention run learned.

* Lag weights (docs/design.md, Mixers), as each mixer gives them (`Mixer.lag_weights`): a
  kernel over query and key lags per head, or a weight per lag. `token_xcorr`: per layer
  and head, the Wq x Wk kernel
  w = sum_r f_r g_r^T, whose entry w_ab weighs <q_{i-a}, k_{j-b}> in the score S_ij: the
  delta at (0, 0) is `dot`, mass on the diagonal a = b is the sliding-window
  cross-correlation of the two signals, mass off it pairs a query lag with another key
  lag. `channel_xcorr`: per layer and head, the weight alpha_tau of channel lag tau = -L..L
  (the delta at tau = 0 is `dot`).
* Generated kernels (`involution`, `inv_xcorr`: filters made per token from its input,
  `Mixer.generated_lag_weights`): per layer and head (group), their mean over the tokens of
  the first validation windows and their spread (standard deviation), drawn beside the
  static lag weights (the run's own, or `against`'s when that run has lag weights).
* The attention-distance profile: per layer, the mean attention weight P_ij as a function
  of the distance i - j, over the queries that can reach that far (i >= distance) and the
  heads, on the first windows of the run's own validation split. The scores are
  materialised by the mixer (`Mixer.scores`) as its reference path does, then causally
  softmaxed. With
  `against`, another run's profile (a `dot` run, say; on its own validation split) is
  drawn beside it, layer by layer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
from torch import Tensor

from leviathan.data import eval_windows, load_tokens
from leviathan.errors import LeviathanError
from leviathan.model.mixers import Mixer
from leviathan.trained import Run, load_run

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

KERNELS_PNG = "lag_kernels.png"
CHANNEL_PNG = "channel_lags.png"
TOKEN_LAGS_PNG = "token_lags.png"  # a weight per token lag 0..K-1 (involution's filters)
DISTANCE_PNG = "attention_distance.png"
DISTANCE_JSON = "attention_distance.json"
GENERATED_JSON = "generated_lags.json"  # the generated filters' mean and spread, in numbers
WINDOWS = 8  # validation windows the attention profile averages over


class InspectError(LeviathanError):
    """The run cannot be inspected (a `dot` run has no lag weights)."""


@dataclass
class Inspection:
    kernels: Path  # the lag-weight plot
    distance: Path  # the attention-distance plot
    profiles: Path  # the profiles as JSON
    generated: Path | None = None  # generated kernels: mean, spread, static (None: none)


def lag_weights(run: Run) -> np.ndarray:
    """(layers, heads, ...): every block's `Mixer.lag_weights` (for token_xcorr the kernel
    w = sum_r f_r g_r^T, (Wq, Wk) per head; for channel_xcorr alpha_tau, 2L+1 per head),
    NaN-padded where layers differ in size (involution's kernel per layer)."""
    return stack_padded([b.mixer.lag_weights().detach().float().numpy() for b in run.model.blocks])


def stack_padded(arrays: list[np.ndarray]) -> np.ndarray:
    """Stack arrays of one rank, each padded at the end with NaN to the largest shape."""
    shape = np.max([a.shape for a in arrays], axis=0)
    out = np.full((len(arrays), *shape), np.nan)
    for i, a in enumerate(arrays):
        out[(i, *(slice(0, n) for n in a.shape))] = a
    return out


@torch.no_grad()
def attention_weights(mixer: Mixer, x: Tensor) -> Tensor:
    """The causal attention matrix P (B, H, T, T) that `mixer` applies to its input x."""
    return mixer.causal_weights(x)


@torch.no_grad()
def mixer_inputs(run: Run, windows: int) -> Iterator[list[Tensor]]:
    """Each block's mixer input, per window, for the first `windows` val windows (reference
    path, eval mode); InspectError when the val split holds no whole window."""
    model, seq_len = run.model, run.config.train.seq_len
    tokens = load_tokens(run.dataset().dir, "val")
    inputs: dict[int, Tensor] = {}
    hooks = [
        block.mixer.register_forward_pre_hook(
            lambda module, args, i=i: inputs.__setitem__(i, args[0])
        )
        for i, block in enumerate(model.blocks)
    ]
    seen = 0
    model.eval()
    model.set_reference(True)
    try:
        for x, _ in eval_windows(tokens, seq_len, 1):
            if x.shape[1] != seq_len or seen == windows:
                break
            model(x)
            yield [inputs[i] for i in range(len(model.blocks))]
            seen += 1
    finally:
        model.set_reference(False)
        for hook in hooks:
            hook.remove()
    if not seen:
        raise InspectError(
            f"the val split of {run.dataset().dir} holds no window of {seq_len} tokens"
        )


@torch.no_grad()
def distance_profile(run: Run, windows: int = WINDOWS) -> np.ndarray:
    """(layers, T): mean attention weight at distance 0..T-1 (see the module docstring),
    averaged over heads, over the first `windows` windows of the run's val split."""
    seq_len = run.config.train.seq_len
    sums, seen = np.zeros((len(run.model.blocks), seq_len)), 0
    for inputs in mixer_inputs(run, windows):
        for i, block in enumerate(run.model.blocks):
            p = attention_weights(block.mixer, inputs[i])[0]  # (H, T, T)
            for distance in range(seq_len):
                diagonal = torch.diagonal(p, offset=-distance, dim1=-2, dim2=-1)
                sums[i, distance] += diagonal.mean().item()
        seen += 1
    return sums / seen


@torch.no_grad()
def generated_kernels(run: Run, windows: int = WINDOWS) -> tuple[np.ndarray, np.ndarray]:
    """(mean, spread), each (layers, heads, ...): the generated lag weights of every token of
    the first `windows` val windows, their mean and standard deviation over the tokens."""
    per_layer: list[list[Tensor]] = [[] for _ in run.model.blocks]
    for inputs in mixer_inputs(run, windows):
        for i, block in enumerate(run.model.blocks):
            per_layer[i].append(block.mixer.generated_lag_weights(inputs[i]).flatten(0, 1))
    tokens = [torch.cat(made).double() for made in per_layer]
    mean = stack_padded([t.mean(0).numpy() for t in tokens])
    return mean, stack_padded([t.std(0, correction=0).numpy() for t in tokens])


def inspect_run(
    run_dir: str | Path,
    against: str | Path | None = None,
    out: str | Path | None = None,
    windows: int = WINDOWS,
) -> Inspection:
    """Write the lag-weight plot, the attention-distance plot and its JSON for `run_dir`
    (into `out`, default the run folder). InspectError for a run without lag weights."""
    run = load_run(run_dir)
    kind = run.config.model.mixer.kind
    if run.model.blocks[0].mixer.lag_weights() is None:
        raise InspectError(
            f"{run_dir} uses the {kind!r} mixer, which has no lag weights to inspect; "
            "inspect a token_xcorr or channel_xcorr run (and pass this one as --against)"
        )
    out = Path(out) if out is not None else Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{Path(run_dir).name} (step {run.step})"
    mixer = run.model.blocks[0].mixer
    kernels = plot_lag_weights(lag_weights(run), title, out, "", mixer.first_lag)
    other = load_run(against) if against is not None else None
    generated = None
    if mixer.generates:
        generated = plot_generated(run, other, title, out, windows)

    profiles = {f"{Path(run_dir).name} ({kind})": distance_profile(run, windows)}
    if other is not None:
        other_kind = other.config.model.mixer.kind
        profiles[f"{Path(against).name} ({other_kind})"] = distance_profile(other, windows)
    distance = plot_distance(profiles, out / DISTANCE_PNG)
    json_path = out / DISTANCE_JSON
    json_path.write_text(
        json.dumps({name: p.tolist() for name, p in profiles.items()}) + "\n", encoding="utf-8"
    )
    return Inspection(kernels, distance, json_path, generated)


def plot_lag_weights(
    weights: np.ndarray, title: str, out: Path, prefix: str, first_lag: int | None
) -> Path:
    """Draw (layers, heads, lags, lags) kernels or (layers, heads, lags) weights."""
    if weights.ndim == 4:  # a kernel over query and key lags per head
        return plot_token_kernels(weights, title, out / f"{prefix}{KERNELS_PNG}")
    if weights.ndim == 3:  # a weight per lag per head
        name = CHANNEL_PNG if first_lag is None else TOKEN_LAGS_PNG
        return plot_channel_weights(weights, title, out / f"{prefix}{name}", first_lag)
    raise InspectError(f"inspect draws (heads, lags) or (heads, lags, lags) weights, not {title}'s")


def plot_generated(run: Run, other: Run | None, title: str, out: Path, windows: int) -> Path:
    """Generated kernels: the mean over tokens (returned), the spread, and beside them the
    static lag weights of `other` (a static run) when it has some of the same form; the
    numbers (mean, spread, this run's static weights; padding as null) as JSON."""
    mean, spread = generated_kernels(run, windows)
    figures = {"mean": mean, "spread": spread, "static": lag_weights(run)}
    (out / GENERATED_JSON).write_text(
        json.dumps({k: np.where(np.isnan(v), None, v).tolist() for k, v in figures.items()}) + "\n",
        encoding="utf-8",
    )
    first_lag = run.model.blocks[0].mixer.first_lag
    path = plot_lag_weights(mean, f"{title}, generated, mean", out, "generated_", first_lag)
    plot_lag_weights(spread, f"{title}, generated, spread", out, "generated_spread_", first_lag)
    static = other.model.blocks[0].mixer if other is not None else None
    if static is not None and static.lag_weights() is not None:
        weights = lag_weights(other)
        if weights.ndim == mean.ndim:
            name = f"{other.dir.name} (step {other.step}), static"
            plot_lag_weights(weights, name, out, "against_", static.first_lag)
    return path


def text_style(value: float, limit: float) -> dict[str, str]:
    """Centred cell labels, white on the dark ends of the colour map."""
    color = "white" if abs(value) > 0.6 * limit else "black"
    return {"ha": "center", "va": "center", "color": color}


def plot_token_kernels(kernels: np.ndarray, title: str, path: Path) -> Path:
    layers, heads, window_q, window_k = kernels.shape
    limit = float(np.nanmax(np.abs(kernels))) or 1.0
    size = (1.5 + 0.5 * heads * max(window_k, 2), 0.8 + 0.5 * layers * max(window_q, 2))
    fig, axes = plt.subplots(layers, heads, figsize=size, squeeze=False, layout="constrained")
    for layer in range(layers):
        for head in range(heads):
            ax = axes[layer, head]
            w = kernels[layer, head]
            image = ax.imshow(w, cmap="RdBu_r", vmin=-limit, vmax=limit)
            if window_q * window_k <= 64:
                for (a, b), value in np.ndenumerate(w):
                    ax.text(b, a, f"{value:.2f}", fontsize=6, **text_style(value, limit))
            ax.set_xticks(range(window_k))
            ax.set_yticks(range(window_q))
            ax.tick_params(labelsize=6)
            if layer == 0:
                ax.set_title(f"head {head}", fontsize=8)
            if head == 0:
                ax.set_ylabel(f"layer {layer}\nquery lag a", fontsize=7)
            if layer == layers - 1:
                ax.set_xlabel("key lag b", fontsize=7)
    fig.colorbar(image, ax=axes, shrink=0.6, label="w_ab")
    fig.suptitle(f"token-lag kernels w = sum_r f_r g_r^T: {title}", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_channel_weights(
    alpha: np.ndarray, title: str, path: Path, first_lag: int | None = None
) -> Path:
    """Weights per lag, per layer and head; lags first_lag.. (None: centred, -L..L)."""
    layers, heads, width = alpha.shape
    lags = (width - 1) // 2 if first_lag is None else -first_lag  # column 0 is lag -lags
    limit = float(np.nanmax(np.abs(alpha))) or 1.0
    size = (3.0 + 0.7 * width, 1.0 + (0.6 + 0.35 * heads) * layers)
    fig, axes = plt.subplots(layers, 1, figsize=size, layout="constrained")
    axes = np.atleast_1d(axes)
    for layer, ax in enumerate(axes):
        image = ax.imshow(
            alpha[layer],
            cmap="RdBu_r",
            vmin=-limit,
            vmax=limit,
            aspect="auto",
            extent=(-lags - 0.5, width - lags - 0.5, heads - 0.5, -0.5),
        )
        for (head, i), value in np.ndenumerate(alpha[layer]):
            if not np.isnan(value):
                ax.text(i - lags, head, f"{value:.2f}", fontsize=6, **text_style(value, limit))
        ax.set_yticks(range(heads))
        ax.set_xticks(range(-lags, width - lags))
        ax.set_ylabel(f"layer {layer}\nhead", fontsize=7)
        ax.tick_params(labelsize=7)
    axes[-1].set_xlabel("lag (channel lag tau, or token lag)", fontsize=8)
    fig.colorbar(image, ax=list(axes), shrink=0.6, label="weight")
    fig.suptitle(f"lag weights: {title}", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_distance(profiles: dict[str, np.ndarray], path: Path) -> Path:
    layers = max(p.shape[0] for p in profiles.values())
    fig, axes = plt.subplots(1, layers, figsize=(3.2 * layers, 3.2), squeeze=False, sharey=True)
    for layer, ax in enumerate(axes[0]):
        for i, (name, profile) in enumerate(profiles.items()):
            if layer < profile.shape[0]:
                style = "-" if i == 0 else "--"
                ax.plot(np.arange(profile.shape[1]), profile[layer], style, lw=1, label=name)
        ax.set_yscale("log")
        ax.set(title=f"layer {layer}", xlabel="distance i - j (tokens)")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("mean attention weight")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("attention-distance profile (mean over heads and val windows)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
