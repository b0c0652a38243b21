"""Cached against uncached generation, side by side, for the tiny model shape.

    python -m benchmarks.generate --threads 1 --new-tokens 256 --repeats 3 --batch 1 4 \
        --out benchmarks/results/generate.json

Models: configs/tiny.yaml's shape (block_size 128, 4 layers, 4 heads, d_model 192,
vocab 2048) with random weights, one per mixer (`dot`, `token_xcorr` W=4 r=1 as in
tiny.yaml, `token_xcorr` W=4 r=2, `channel_xcorr` L=2), and configs/tiny-moe.yaml
(dropless MoE, 8 experts, top-2). Lag kernels are moved off their delta init so the
lags do work. float32, eval mode.

Each case generates `--new-tokens` greedy tokens for a batch of B 8-token prompts
(`--batch`; `leviathan sample` generates one), with `use_cache` True and False, under
two context policies (`Leviathan.generate`):

- `slide`  (context_keep = block_size, the default): past block_size every step shifts
  every position, so the cached path re-prefills the last block_size tokens per step;
- `keep 64` (context_keep = block_size // 2): when the context is full it is cut to its
  last 64 tokens and the cache refilled once, then 63 cached steps follow.

and one row with block_size 512 (`no cut`): all 264 positions fit, the cache alone.
With `--compiled`, tiny's own mixer (token_xcorr W=4 r=1) at batch 1 also runs cached
with `generate(compiled=True)` (its one-token steps under torch.compile).
The tokens of every variant are compared (they must be identical).

Time: median wall time of one whole `generate` call over `--repeats` rounds after one
warm-up round (which compiles); each round runs the variants back to back, in an order
rotated every round, so background load on a shared machine falls on all alike.
Speedups are against uncached (eager) generation of the same model and policy.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch._dynamo

from benchmarks.harness import CONFIGS, RESULTS, Col, Table, rotated, write_json
from leviathan.config import load_config
from leviathan.model import MIXERS, Leviathan

PROMPT = 8

# (name, config, mixer options replacing the config's, or None)
CASES: list[tuple[str, str, dict | None]] = [
    ("dot", "tiny.yaml", {"kind": "dot"}),
    ("token_xcorr W=4 r=1", "tiny.yaml", None),
    (
        "token_xcorr W=4 r=2",
        "tiny.yaml",
        {"kind": "token_xcorr", "window_q": 4, "window_k": 4, "rank": 2},
    ),
    ("channel_xcorr L=2", "tiny.yaml", {"kind": "channel_xcorr", "lags": 2}),
    ("tiny-moe (token_xcorr, dropless)", "tiny-moe.yaml", None),
]


def build(config: str, mixer: dict | None, block_size: int | None) -> Leviathan:
    cfg = load_config(CONFIGS / config).model
    cfg = replace(cfg, vocab_size=2048, block_size=block_size or cfg.block_size)
    if mixer is not None:
        cfg = replace(cfg, mixer=MIXERS[mixer["kind"]].Options(**mixer))
    torch.manual_seed(0)
    model = Leviathan(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".f", ".g", ".alpha")):
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


# (use_cache, compiled): uncached first, the baseline of every speedup (`compiled` applies
# to the cached one-token steps only)
VARIANTS = [(False, False), (True, False), (True, True)]


def label(use_cache: bool, compiled: bool) -> str:
    return ("cached" if use_cache else "uncached") + ("_compiled" if compiled else "")


def time_variants(
    model: Leviathan,
    batch: int,
    new_tokens: int,
    keep: int | None,
    repeats: int,
    variants: list[tuple[bool, bool]],
) -> dict:
    """Median ms of whole `generate` calls per variant, rounds in rotating order; round 0
    warms up (and compiles: its extra time over the median is reported)."""
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.cfg.vocab_size, (batch, PROMPT), generator=gen)

    def run(use_cache: bool, compiled: bool) -> tuple[float, torch.Tensor]:
        t0 = time.perf_counter()
        out = model.generate(
            prompt,
            new_tokens,
            temperature=0,
            context_keep=keep,
            use_cache=use_cache,
            compiled=compiled,
        )
        return time.perf_counter() - t0, out

    times: dict[tuple[bool, bool], list[float]] = {v: [] for v in variants}
    outs = {}
    for r in range(repeats + 1):
        for v in rotated(variants, r):
            seconds, outs[v] = run(*v)
            times[v].append(seconds)
    row: dict = {}
    base = statistics.median(times[variants[0]][1:])
    for v in variants:
        ms = statistics.median(times[v][1:])
        row[f"{label(*v)}_ms"] = round(1e3 * ms, 1)
        row[f"{label(*v)}_speedup"] = round(base / ms, 2)
        if v[1]:
            row[f"{label(*v)}_first_call_s"] = round(times[v][0], 1)
    row["tokens_equal"] = all(torch.equal(outs[v], outs[variants[0]]) for v in variants)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="prompts per call")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch default)")
    parser.add_argument("--out", type=Path, default=RESULTS / "generate.json")
    parser.add_argument(
        "--compiled",
        action="store_true",
        help="also with compiled=True (tiny's token_xcorr, batch 1; compiling takes minutes)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # every model here is a new Leviathan, and dynamo counts their graphs against one limit
    torch._dynamo.config.recompile_limit = 64

    runs = [(name, config, mixer, None, None, "slide") for name, config, mixer in CASES]
    runs += [(name, config, mixer, None, 64, "keep 64") for name, config, mixer in CASES]
    runs.append(("token_xcorr W=4 r=1", "tiny.yaml", None, 512, None, "no cut (block 512)"))
    rows = []
    names = [label(*v) for v in VARIANTS]
    table = Table(
        Col("case", "<34"), Col("context", "<20"), Col("B", ">2"), *(Col(n, ">17") for n in names)
    )
    print(table.header())
    for batch in args.batch:
        for name, config, mixer, block_size, keep, policy in runs:
            compiled = args.compiled and batch == 1 and name == "token_xcorr W=4 r=1"
            variants = VARIANTS if compiled else VARIANTS[:2]
            model = build(config, mixer, block_size)
            row = {"case": name, "context": policy, "batch": batch}
            row |= {"block_size": model.cfg.block_size, "context_keep": keep}
            row |= {"can_cache": model.can_cache()}
            row |= time_variants(model, batch, args.new_tokens, keep, args.repeats, variants)
            rows.append(row)
            cells = [
                f"{row[n + '_ms']:9.1f} {row[n + '_speedup']:5.2f}x" if n + "_ms" in row else None
                for n in names
            ]
            same = f"  same tokens: {row['tokens_equal']}"
            print(table.row(name, policy, batch, *cells, extra=same), flush=True)
    settings = {
        "new_tokens": args.new_tokens,
        "prompt_tokens": PROMPT,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "speedup": "uncached eager ms / this variant's ms, same model and policy",
        "first_call_s": "the warm-up call of a compiled variant, compilation included",
    }
    write_json(args.out, {"settings": settings, "results": rows})


if __name__ == "__main__":
    main()
