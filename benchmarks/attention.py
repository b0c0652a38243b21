"""Time and memory of each attention kind, fast (eager, compiled) and reference, against dot.

    python -m benchmarks.attention --seq-lens 128 512 2048 --repeats 5 \
        --out benchmarks/results/attention.json --batch 4 --heads 4 --head-dim 64

Each (case, T) runs in fresh subprocesses, after a warm-up at T=8 that loads the kernels.
Time: median wall time of forward + backward (loss = out.sum()) over ``--repeats`` runs
after two warm-ups. Memory, in a separate process: peak resident-set growth during one
forward + backward, inputs excluded (Linux: VmHWM reset through /proc/self/clear_refs,
minus VmRSS just before). That process runs with MALLOC_MMAP_THRESHOLD_=65536, so glibc
returns every block of 64 KiB or more to the OS when it is freed: the peak then follows
the bytes actually live (torch's and numpy's alike), not the allocator's caching, which
otherwise made the same computation read anywhere from 1x to 3x.

``scipy_detached`` re-creates the cost of the earlier experiment that DESIGN.md
describes, for the record: ``scipy.signal.correlate`` over all four axes (batch, head,
time, channel) of detached numpy copies of q and k, no causal mask, softmax, times v.
The old code is not in this repository, so this reproduces its kind of work, not its
exact output. Forward only: no gradient reaches q or k through it, which was the point.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from benchmarks.harness import (
    RESULTS,
    Col,
    Table,
    WorkerFailed,
    emit,
    in_fresh_process,
    proc_status_kib,
    reset_peak_rss,
    returning_frees,
    write_json,
)

# (name, kind, options); every kind but scipy_detached runs on every path
CASES: list[tuple[str, str, dict]] = [
    ("dot", "dot", {}),
    ("token W=2 r=1", "token_xcorr", {"window": 2, "rank": 1}),
    ("token W=2 r=2", "token_xcorr", {"window": 2, "rank": 2}),
    ("token W=4 r=1", "token_xcorr", {"window": 4, "rank": 1}),
    ("token W=4 r=4", "token_xcorr", {"window": 4, "rank": 4}),
    ("channel L=2", "channel_xcorr", {"lags": 2}),
    ("involution K=7", "involution", {"kernel": 7}),
    ("involution K=31", "involution", {"kernel": 31}),
    ("inv_xcorr W=4 r=1", "inv_xcorr", {"window": 4, "rank": 1}),
]
GROUP_WIDTH = 16  # involution's channels per group: G = C/16, the mixer's default
DTYPES = ("float32", "bfloat16", "float16")
SKIPPED_TT = "skipped (T x T too large)"
PATHS = ["fast", "compiled", "reference"]  # eager fast path, the same compiled, materialised
PlanRow = tuple[str, str, dict, str]  # (case name, kind, options, path): one row at each T


# --- worker: one case, one sequence length, in its own process -----------------------


def _case_forward(spec: dict, T: int, randn):
    """The case's forward at length T as a closure, and the leaves its backward reaches.
    Every kind starts from its mixing inputs (q, k, v, the lag filters): the per-token
    projections in front (dot's q and k, involution's generator) are not timed."""
    import numpy as np
    import scipy.signal
    import torch

    from leviathan.model import correlation as xc
    from leviathan.model import involution as inv

    B, H, d = spec["batch"], spec["heads"], spec["head_dim"]
    kind, opts, reference = spec["kind"], spec["options"], spec["path"] == "reference"
    if kind == "involution":  # v in C/16 groups of 16 channels, one filter per group
        G = H * d // GROUP_WIDTH
        v, h = randn(B, G, T, GROUP_WIDTH), randn(B, G, T, opts["kernel"], std=0.5)
        return (lambda: inv.involution(v, h, reference=reference)), [v, h]
    q, k, v = (randn(B, H, T, d) for _ in range(3))
    if kind == "dot":
        return (lambda: xc.dot_attention(q, k, v, reference=reference)), [q, k, v]
    if kind in ("token_xcorr", "inv_xcorr"):
        r, W = opts["rank"], opts["window"]
        shape = (H, r, W) if kind == "token_xcorr" else (B, H, T, r, W)
        f, g = randn(*shape, std=0.5), randn(*shape, std=0.5)
        attend = xc.token_xcorr_attention if kind == "token_xcorr" else inv.inv_xcorr_attention
        extra = {} if kind == "token_xcorr" else {"dropout_p": 0.0}
        return (lambda: attend(q, k, v, f, g, reference=reference, **extra)), [q, k, v, f, g]
    if kind == "channel_xcorr":
        alpha = randn(H, 2 * opts["lags"] + 1, std=0.5)
        forward = lambda: xc.channel_xcorr_attention(q, k, v, alpha, reference=reference)  # noqa: E731
        return forward, [q, k, v, alpha]
    if kind == "scipy_detached":

        def forward():
            qn, kn = q.detach().float().numpy(), k.detach().float().numpy()
            corr = scipy.signal.correlate(qn, kn, mode="same")  # all axes at once
            scores = torch.from_numpy(np.ascontiguousarray(corr)) * d**-0.5
            return torch.softmax(scores, dim=-1) * v.detach().float()  # no mask

        return forward, []
    raise ValueError(kind)


def _make_step(spec: dict, T: int):
    """A closure running one forward (+ backward) of the case at length T."""
    import torch

    gen = torch.Generator().manual_seed(0)
    dev, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])

    def randn(*shape: int, std: float = 1.0):
        return (std * torch.randn(*shape, generator=gen)).to(dev, dtype).requires_grad_()

    forward, leaves = _case_forward(spec, T, randn)
    if spec["path"] == "compiled":
        forward = torch.compile(forward, dynamic=False)

    def step() -> None:
        for t in leaves:
            t.grad = None
        if spec["kind"] == "scipy_detached":
            with torch.no_grad():
                forward()
        else:
            forward().sum().backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    return step


def worker(spec: dict) -> dict:
    """Peak memory (spec["measure"] == "memory") or median time of one case."""
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    warm = _make_step(spec, 8)  # load kernels and thread pools outside the measurement
    warm()
    warm()
    step = _make_step(spec, spec["seq_len"])
    if spec["measure"] == "memory":
        if spec["path"] == "compiled":
            step()  # compile outside the measurement
        if spec["device"] == "cuda":  # the allocator's peak, inputs excluded
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            return {"peak_mib": (torch.cuda.max_memory_allocated() - before) / 2**20}
        reset_peak_rss()
        before = proc_status_kib("VmRSS")
        step()
        return {"peak_mib": (proc_status_kib("VmHWM") - before) / 1024}
    step()
    step()
    ms = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        step()
        ms.append(1e3 * (time.perf_counter() - start))
    return {"ms": statistics.median(ms), "min_ms": min(ms)}


# --- driver -------------------------------------------------------------------------


def _subprocess(spec: dict, timeout: float, env: dict[str, str] | None = None) -> dict:
    try:
        result = in_fresh_process(
            __spec__.name, "--worker", json.dumps(spec), env=env, timeout=timeout
        )
    except WorkerFailed as failed:
        return {"status": f"failed ({failed.reason[:80]})"}
    return {"status": "ok", **result}


def run_case(spec: dict, timeout: float) -> dict:
    """Time in one fresh process, memory in another (with malloc caching off, see top)."""
    timed = _subprocess({**spec, "measure": "time"}, timeout)
    if timed["status"] != "ok":
        return timed
    memory = _subprocess({**spec, "measure": "memory"}, timeout, returning_frees(64 * 1024))
    return {**timed, "peak_mib": memory.get("peak_mib")}


def parse_args() -> argparse.Namespace:
    """The command line; ``--worker SPEC`` (hidden) is how a fresh process gets its case."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "attention.json")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument(
        "--max-reference-t",
        type=int,
        default=1024,
        help="skip the materialised paths above this T (they hold several B*H*T*T tensors)",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--cases", nargs="+", choices=[c[0] for c in CASES], default=None)
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=PATHS)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per case")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args()


def base_spec(args: argparse.Namespace) -> dict:
    """The worker settings every row shares (and the JSON's settings start with)."""
    base = {"batch": args.batch, "heads": args.heads, "head_dim": args.head_dim}
    run = {"threads": args.threads, "repeats": args.repeats, "device": args.device}
    return base | run | {"dtype": args.dtype}


def build_plan(args: argparse.Namespace) -> list[PlanRow]:
    """The rows measured at each T: the chosen cases (dot always, the ratios' baseline) on
    each path, then scipy_detached on CPU (numpy on detached copies: a CPU thing)."""
    cases = [c for c in CASES if args.cases is None or c[0] in args.cases or c[1] == "dot"]
    plan = [(name, kind, opts, path) for path in args.paths for name, kind, opts in cases]
    if args.device == "cpu":
        plan.append(("scipy_detached", "scipy_detached", {}, "fwd only"))
    return plan


def add_dot_ratios(row: dict, dots: dict[str, dict]) -> None:
    """Set the row's time and memory against dot at its T, in place: compiled rows against
    compiled dot, the others against eager dot (so the ratio compares like with like)."""
    dot = dots.get("compiled" if row["path"] == "compiled" else "fast")
    if row["status"] == "ok" and dot is not None:
        row["time_vs_dot"] = row["ms"] / dot["ms"]
        if row["peak_mib"] is not None and dot["peak_mib"]:
            row["mem_vs_dot"] = row["peak_mib"] / dot["peak_mib"]


def measure_row(args: argparse.Namespace, base: dict, entry: PlanRow, T: int) -> dict:
    """One row of the plan at length T: measured in fresh processes, or skipped where the
    materialised reference would hold T x T tensors too large for the machine."""
    name, kind, opts, path = entry
    row = {"case": name, "kind": kind, "options": opts, "path": path, "seq_len": T}
    if path == "reference" and T > args.max_reference_t:
        return row | {"status": SKIPPED_TT}
    spec = {**base, "kind": kind, "options": opts, "path": path}
    return row | run_case({**spec, "seq_len": T}, args.timeout)


def measure_all(args: argparse.Namespace, base: dict, plan: list[PlanRow]) -> list[dict]:
    """Every row of the plan at every T, each printed as soon as it is measured (a long
    run shows its progress)."""
    rows = []
    print(TABLE.header(), flush=True)
    for T in args.seq_lens:
        dots: dict[str, dict] = {}  # path -> the dot row it is compared with
        for entry in plan:
            row = measure_row(args, base, entry, T)
            if row["kind"] == "dot" and row["path"] != "reference" and row["status"] == "ok":
                dots[row["path"]] = row
            add_dot_ratios(row, dots)
            rows.append(row)
            print(_format_row(row), flush=True)
    return rows


def crossovers(rows: list[dict]) -> dict[str, int | None]:
    """Per case and path: the shortest T from which on it is faster than dot at every
    longer T measured (None: not within the lengths measured)."""
    found: dict[str, int | None] = {}
    for key in dict.fromkeys(f"{r['case']} ({r['path']})" for r in rows if r["kind"] != "dot"):
        timed = sorted(
            (r["seq_len"], r["time_vs_dot"])
            for r in rows
            if f"{r['case']} ({r['path']})" == key and "time_vs_dot" in r
        )
        faster = [T for T, _ in timed if all(x < 1 for t, x in timed if t >= T)]
        found[key] = faster[0] if faster else None
    return found


def describe_settings(args: argparse.Namespace, base: dict) -> dict:
    """The JSON's settings: what was run and how each figure was measured, so a result
    file can be read without this source."""
    import torch

    return {
        **base,
        "seq_lens": args.seq_lens,
        "threads_used": args.threads or torch.get_num_threads(),
        "torch": torch.__version__,
        "time": "median wall time of forward + backward (loss = out.sum()) after two warm-ups",
        "memory": "peak RSS growth of a fresh process during one forward + backward, inputs "
        "excluded (VmHWM reset via /proc/self/clear_refs, minus VmRSS before), with "
        "MALLOC_MMAP_THRESHOLD_=65536 so freed blocks >= 64 KiB go back to the OS; on CUDA "
        "the caching allocator's peak above what was allocated before the step",
        "scipy_detached": "forward only: scipy.signal.correlate over all axes of detached "
        "q, k (mode='same'), unmasked softmax, times v; a re-creation of the old approach",
        "compiled": "the fast path under torch.compile(dynamic=False), compiled in the "
        "warm-ups (the memory process compiles before measuring)",
        "ratios": "against dot at the same T: compiled rows against compiled dot, the others "
        "against eager dot (fast path)",
    }


def print_notes(args: argparse.Namespace, settings: dict) -> None:
    """The legend under the table: the shapes, and what the columns measure."""
    print(
        f"\nB={args.batch} H={args.heads} d={args.head_dim} {args.dtype}, "
        f"{settings['threads_used']} threads; x dot: median and peak against dot at the same T "
        "(compiled rows: against compiled dot); min ms: the fastest repeat (less exposed to "
        "other load on the machine).\n"
        f"Time: {settings['time']}; scipy_detached: {settings['scipy_detached']}.\n"
        f"Memory: {settings['memory']}."
    )


def main() -> None:
    """Measure every row (or, as a worker, one case), print the table, write the JSON."""
    args = parse_args()
    if args.worker:
        emit(worker(json.loads(args.worker)))
        return
    base = base_spec(args)
    rows = measure_all(args, base, build_plan(args))
    settings = describe_settings(args, base)
    print_notes(args, settings)
    faster_from = crossovers(rows)
    print("Faster than dot from T =", ", ".join(f"{k}: {v}" for k, v in faster_from.items()))
    write_json(
        args.out, {"settings": settings, "results": rows, "faster_than_dot_from": faster_from}
    )


TABLE = Table(
    Col("case", "<16"),
    Col("path", "<11"),
    Col("T", ">6"),
    Col("median ms", ">11.2f"),
    Col("min ms", ">10.2f"),
    Col("x dot", ">8.2f"),
    Col("peak MiB", ">10.1f"),
    Col("x dot", ">8.2f"),
    sep="",
)


def _format_row(row: dict) -> str:
    lead = f"{row['case']:<16}{row['path']:<11}{row['seq_len']:>6}"
    if row["status"] != "ok":
        return f"{lead}  {row['status']}"
    return TABLE.row(
        row["case"],
        row["path"],
        row["seq_len"],
        row["ms"],
        row["min_ms"],
        row.get("time_vs_dot"),
        row["peak_mib"],
        row.get("mem_vs_dot"),
    )


if __name__ == "__main__":
    main()
