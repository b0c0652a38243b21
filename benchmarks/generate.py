"""Cached against uncached generation, side by side, for the tiny model shape.

    python benchmarks/generate.py --threads 1 --new-tokens 256 --repeats 3 --batch 1 4 \
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
The cached and uncached tokens are compared (they must be identical).

Time: median wall time of one whole `generate` call over `--repeats` rounds after one
warm-up round; each round runs cached and uncached back to back, in alternating order,
so background load on a shared machine falls on both alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

# benchmarks/moe.py sits beside this file: keep this folder off the path for `import moe`
sys.path.remove(str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from leviathan.config import load_config  # noqa: E402
from leviathan.model import MIXERS, Leviathan  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
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
    cfg = load_config(ROOT / "configs" / config).model
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


def time_pair(
    model: Leviathan, batch: int, new_tokens: int, keep: int | None, repeats: int
) -> dict:
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.cfg.vocab_size, (batch, PROMPT), generator=gen)

    def run(use_cache: bool) -> tuple[float, torch.Tensor]:
        t0 = time.perf_counter()
        out = model.generate(
            prompt, new_tokens, temperature=0, context_keep=keep, use_cache=use_cache
        )
        return time.perf_counter() - t0, out

    times: dict[bool, list[float]] = {True: [], False: []}
    outs = {}
    for r in range(repeats + 1):
        for use_cache in (True, False) if r % 2 else (False, True):
            seconds, outs[use_cache] = run(use_cache)
            if r:  # round 0 warms up
                times[use_cache].append(seconds)
    cached, uncached = statistics.median(times[True]), statistics.median(times[False])
    return {
        "cached_ms": round(1e3 * cached, 1),
        "uncached_ms": round(1e3 * uncached, 1),
        "speedup": round(uncached / cached, 2),
        "tokens_equal": bool(torch.equal(outs[True], outs[False])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="prompts per call")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch default)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/generate.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    runs = [(name, config, mixer, None, None, "slide") for name, config, mixer in CASES]
    runs += [(name, config, mixer, None, 64, "keep 64") for name, config, mixer in CASES]
    runs.append(("token_xcorr W=4 r=1", "tiny.yaml", None, 512, None, "no cut (block 512)"))
    rows = []
    header = f"{'case':34} {'context':20} {'B':>2} {'uncached ms':>12} {'cached ms':>10}"
    print(f"{header} {'x':>6}  same", flush=True)
    for batch in args.batch:
        for name, config, mixer, block_size, keep, policy in runs:
            model = build(config, mixer, block_size)
            row = {"case": name, "context": policy, "batch": batch}
            row |= {"block_size": model.cfg.block_size, "context_keep": keep}
            row |= {"can_cache": model.can_cache()}
            row |= time_pair(model, batch, args.new_tokens, keep, args.repeats)
            rows.append(row)
            print(
                f"{name:34} {policy:20} {batch:2} {row['uncached_ms']:12.1f} "
                f"{row['cached_ms']:10.1f} {row['speedup']:6.2f}  {row['tokens_equal']}",
                flush=True,
            )
    settings = {
        "new_tokens": args.new_tokens,
        "prompt_tokens": PROMPT,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": settings, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
