"""PNG curves of a run, drawn from its metrics.jsonl."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from leviathan.storage import read_records
from leviathan.train.checkpoint import quiet

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(metrics_path: Path, out_path: Path) -> None:
    """Train/val loss against step, and val BPC against step."""
    records = read_records(metrics_path, log=quiet)
    train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"], r["val_bpc"]) for r in records if "val_loss" in r]
    fig, (ax_loss, ax_bpc) = plt.subplots(1, 2, figsize=(11, 4))
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
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def plot_expert_load(records: list[dict[str, Any]], out_path: Path) -> None:
    """Heatmap per MoE layer: each expert's share of the routed tokens (rows) over steps,
    from the run's records that hold routing metrics (`moe`)."""
    layers = sorted(records[0]["moe"], key=lambda name: int(name.removeprefix("layer")))
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(len(layers), 1, figsize=(10, 1.2 + 1.6 * len(layers)), squeeze=False)
    for ax, layer in zip(axes[:, 0], layers, strict=True):
        load = np.array([r["moe"][layer]["load"] for r in records], dtype=float)
        share = load / np.maximum(load.sum(axis=1, keepdims=True), 1)
        extent = (steps[0], steps[-1], share.shape[1] - 0.5, -0.5)
        image = ax.imshow(
            share.T, aspect="auto", interpolation="nearest", extent=extent, cmap="viridis"
        )
        ax.set(ylabel=f"{layer}\nexpert")
        fig.colorbar(image, ax=ax, label="share of tokens")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle("expert load per MoE layer")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
