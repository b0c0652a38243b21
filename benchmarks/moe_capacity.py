"""What capacity mode drops, and whether it is causal, under both capacity policies.

    leviathan train --config configs/tiny-moe.yaml model.ffn.capacity_factor=1.0 \
        train.max_steps=200 run.dir=runs/tiny-moe-cap --wandb disabled
    python -m benchmarks.moe_capacity --run runs/tiny-moe-cap

Loads a trained MoE run and, on the same weights and the same validation windows (batch
of `--batch` rows of the run's train.seq_len tokens), scores them with each
`capacity_policy` (sequence: slots per sequence, the default; batch: one pool for the
whole batch, the older rule) at each `--factors` capacity factor. For each it reports:

- the dropped fraction of the routed assignments per eighth of the sequence (positions)
  and per row of the batch, over every MoE layer (training-mode forwards, dropout 0, so
  the layers count; the function is the evaluation one);
- causality: the largest change of any logit at positions <= T/2 - 1 when every token
  after them is replaced (all rows), and the share of those positions that moved;
- a row scored alone against the same row in the batch (largest logit difference).
"""

from __future__ import annotations

import argparse
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import moe
from benchmarks.harness import RESULTS, Col, Table, write_json
from leviathan.data import load_index, load_tokens
from leviathan.data.sampler import eval_windows
from leviathan.model import Leviathan
from leviathan.trained import load_run


def with_capacity(run, factor: float, policy: str) -> Leviathan:
    """The run's weights in a model whose MoE layers use this factor and policy."""
    cfg = run.config.model
    ffn = replace(
        cfg.ffn,
        capacity_factor=factor,
        capacity_policy=policy,
        capacity_seq_len=run.config.train.seq_len,
    )
    model = Leviathan(replace(cfg, ffn=ffn))
    model.load_state_dict(run.model.state_dict())
    return model.eval()


def drop_profile(model: Leviathan, idx: torch.Tensor, bins: int = 8) -> dict:
    """Dropped share of the assignments per span of positions and per row, all layers."""
    T = idx.shape[1]
    by_pos, by_row, total = np.zeros(bins), np.zeros(idx.shape[0]), 0
    captured = []

    def hook(layer, inputs, _output):
        x = inputs[0]
        r = layer.router(x.reshape(-1, layer.d_model))
        cap, group = layer._capacity(x.shape[0] * x.shape[1], x.shape[1])
        p = moe.plan(r.indices, layer.options.n_experts, cap, group)
        captured.append((p, layer.options.top_k))

    handles = [layer.register_forward_hook(hook) for layer in model.sparse_layers()]
    with torch.no_grad():
        model(idx)
    for h in handles:
        h.remove()
    for p, k in captured:
        if p.dropped_idx is None:
            continue
        token = (p.dropped_idx // k).numpy()
        np.add.at(by_pos, (token % T) * bins // T, 1)
        np.add.at(by_row, token // T, 1)
        total += idx.numel() * k
    per_pos_assignments = total / bins
    per_row_assignments = total / idx.shape[0]
    return {
        "dropped_frac": float(by_pos.sum() / total),
        "by_position_eighth": [round(float(v / per_pos_assignments), 4) for v in by_pos],
        "by_row": [round(float(v / per_row_assignments), 4) for v in by_row],
    }


def causality(model: Leviathan, idx: torch.Tensor, seed: int) -> dict:
    T, vocab = idx.shape[1], model.cfg.vocab_size
    half = T // 2
    changed = idx.clone()
    gen = torch.Generator().manual_seed(seed)
    changed[:, half:] = torch.randint(0, vocab, (idx.shape[0], T - half), generator=gen)
    with torch.no_grad():
        before = model(idx)[0][:, :half]
        after = model(changed)[0][:, :half]
        alone = model(idx[-1:])[0][0]
        in_batch = model(idx)[0][-1]
    moved = (before - after).abs().amax(-1)
    return {
        "max_logit_change_before_half": float(moved.max()),
        "positions_changed_frac": float((moved > 0).double().mean()),
        "row_alone_vs_batch_max_diff": float((alone - in_batch).abs().max()),
    }


TABLE = Table(
    Col("factor", ">6"),
    Col("policy", "<9"),
    Col("dropped", ">8.3f"),
    Col("max dlogit<T/2", ">15.4f"),
    Col("pos moved", ">9.3f"),
    Col("alone-batch", ">11.2e"),
)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a trained MoE run folder")
    ap.add_argument("--factors", type=float, nargs="+", default=[1.0, 1.25])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--windows", type=int, default=4, help="batches of val windows averaged")
    ap.add_argument("--out", type=Path, default=RESULTS / "moe_capacity.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    run = load_run(args.run)
    T = run.config.train.seq_len
    index = load_index(run.config.data.dir)
    needed = args.batch * args.windows
    val = next(eval_windows(load_tokens(index.dir, "val"), T, needed))[0]
    results = []
    warnings.filterwarnings("ignore", message="MoE capacity_policy 'batch'")  # measured here
    for factor in args.factors:
        for policy in ("batch", "sequence"):
            model = with_capacity(run, factor, policy)
            rows = []
            for w in range(args.windows):
                idx = val[w * args.batch : (w + 1) * args.batch]
                rows.append(drop_profile(model, idx) | causality(model, idx, seed=w))
            mean = {
                key: np.mean([r[key] for r in rows], axis=0).round(4).tolist() for key in rows[0]
            }
            mean["max_logit_change_before_half"] = max(
                r["max_logit_change_before_half"] for r in rows
            )
            results.append({"capacity_factor": factor, "policy": policy} | mean)
    print(f"run {args.run}, step {run.step}, batch {args.batch} x T={T}, {args.windows} batches")
    print(TABLE.header("  dropped per eighth of the sequence | per row"))
    for r in results:
        eighths = " ".join(f"{v:.2f}" for v in r["by_position_eighth"])
        rows = " ".join(f"{v:.2f}" for v in r["by_row"])
        print(
            TABLE.row(
                r["capacity_factor"],
                r["policy"],
                r["dropped_frac"],
                r["max_logit_change_before_half"],
                r["positions_changed_frac"],
                r["row_alone_vs_batch_max_diff"],
                extra=f"  {eighths} | {rows}",
            )
        )
    ffn = run.config.model.ffn
    report = {"run": str(args.run), "step": run.step, "batch": args.batch, "seq_len": T}
    report["trained_with"] = {
        "capacity_factor": ffn.capacity_factor,
        "capacity_policy": ffn.capacity_policy,
        "max_steps": run.config.train.max_steps,
    }
    report["results"] = results
    write_json(args.out, report, indent=1)
    return report


if __name__ == "__main__":
    main()
