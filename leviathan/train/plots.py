"""PNG figures of a run, drawn from its metrics records: the loss curves, and for an MoE
run the expert load and the balance statistics. Each figure is built by one function and
written by `save`, so what a figure holds can be checked without reading a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def save(fig: Figure, path: Path) -> None:
    """Write `fig` as a PNG and free it."""
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curves_figure(records: list[dict[str, Any]]) -> Figure:
    """Train/val loss against step, and val BPC against step."""
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"], r["val_bpc"]) for r in records if "val_loss" in r]
    fig, (ax_loss, ax_bpc) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    if train:
        ax_loss.plot([s for s, _ in train], [v for _, v in train], lw=0.8, alpha=0.7, label="train")
    if val:
        steps = [s for s, _, _ in val]
        ax_loss.plot(steps, [v for _, v, _ in val], "o-", label="val")
        ax_bpc.plot(steps, [b for _, _, b in val], "o-", color="C1")
    ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    ax_loss.legend()
    ax_bpc.set(xlabel="step", ylabel="bits per character", title="val BPC")
    for ax in (ax_loss, ax_bpc):
        ax.grid(alpha=0.3)
    return fig


def moe_layers(records: list[dict[str, Any]]) -> list[str]:
    """The MoE layers of the records (`layer0`, `layer2`, ...), in depth order."""
    return sorted(records[0]["moe"], key=lambda name: int(name.removeprefix("layer")))


def expert_load_figure(records: list[dict[str, Any]]) -> Figure:
    """Each expert's share of the routed tokens over steps, a heatmap per MoE layer, every
    layer on one colour scale centred on the uniform share 1/E (white): red experts take
    more than their share, blue ones less. Axes: one per layer, then the colour bar."""
    layers, steps = moe_layers(records), [r["step"] for r in records]
    shares = {}
    for layer in layers:
        load = np.array([r["moe"][layer]["load"] for r in records], dtype=float)
        shares[layer] = load / np.maximum(load.sum(axis=1, keepdims=True), 1)
    n_experts = shares[layers[0]].shape[1]
    uniform = 1 / n_experts
    top = max(2 * uniform, *(share.max() for share in shares.values()))
    norm = TwoSlopeNorm(vmin=0, vcenter=uniform, vmax=top)
    extent = (steps[0] - 0.5, steps[-1] + 0.5, n_experts - 0.5, -0.5)
    fig, axes = plt.subplots(
        len(layers), 1, figsize=(10, 1.4 + 1.6 * len(layers)), squeeze=False, layout="constrained"
    )
    for ax, layer in zip(axes[:, 0], layers, strict=True):
        image = ax.imshow(
            shares[layer].T,
            aspect="auto",
            interpolation="nearest",
            extent=extent,
            cmap="RdBu_r",
            norm=norm,
        )
        ax.set(ylabel=f"{layer}\nexpert")
    axes[-1, 0].set_xlabel("step")
    bar = fig.colorbar(image, ax=axes[:, 0].tolist(), label="share of the routed tokens")
    bar.ax.axhline(uniform, color="black", lw=1.5)
    bar.set_ticks([0, uniform, top], labels=["0", f"1/E = {uniform:.3g}", f"{top:.3g}"])
    fig.suptitle(f"expert load per MoE layer ({n_experts} experts; white: the uniform share)")
    return fig


BALANCE_PANELS = (  # (key in a layer's routing statistics, title, scale to the axis)
    ("imbalance", "imbalance (max / mean expert load)", 1.0),
    ("dropped_frac", "dropped assignments (%)", 100.0),
    ("aux_loss", "load-balancing (aux) loss, raw", 1.0),
    ("z_loss", "router z-loss, raw", 1.0),
)


def balance_figure(records: list[dict[str, Any]]) -> Figure:
    """The routing health of an MoE run over steps, one line per layer: imbalance (1 is
    perfect balance, marked), the dropped percentage (capacity mode; 0 when dropless),
    and the raw aux and z losses. Four axes."""
    layers, steps = moe_layers(records), [r["step"] for r in records]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True, layout="constrained")
    for ax, (key, title, scale) in zip(axes.flat, BALANCE_PANELS, strict=True):
        for layer in layers:
            values = [scale * r["moe"][layer].get(key, float("nan")) for r in records]
            ax.plot(steps, values, lw=1, label=layer)
        ax.set(title=title)
        ax.grid(alpha=0.3)
    axes[0, 0].axhline(1.0, color="black", ls="--", lw=1, label="balanced")
    axes[0, 0].legend(fontsize="small", ncol=max(1, len(layers) // 8))
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.suptitle("MoE routing over steps, per layer")
    return fig
