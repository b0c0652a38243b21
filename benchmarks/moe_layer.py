"""Time our MoE layer against DeepSpeed's MoE layer and a dense FFN of equal active width.

    python -m benchmarks.moe_layer --threads 1 --tokens 4096 16384 --repeats 5 --processes 3 \
        --out benchmarks/results/moe.json

One process, one input per (case, token count), shared by every layer. For each case
(d_model, experts E, top-k) it times six layers on the same tokens ``x`` of shape (T, d):

- ``ours dropless``   ``moe.MoE`` with ``capacity_factor=None``;
- ``DS dropless``     ``deepspeed.moe.layer.MoE(..., drop_tokens=False)``;
- ``ours capacity``   ``moe.MoE`` with ``capacity_factor=1.25``;
- ``DS capacity``     ``deepspeed.moe.layer.MoE(..., capacity_factor=1.25, drop_tokens=True)``;
- ``dense``           Linear(d, k*h) -> GELU -> Linear(k*h, d), the active width of one token;
- ``ours grouped``    ``ours dropless`` through torch's ``grouped_mm``
                      (``expert_matmul="grouped"``): the measured reason ``auto`` keeps
                      the per-expert loop on CPU.

Our layers are timed with ``expert_matmul="loop"``, what ``auto`` picks on CPU.

Both capacity layers size each expert's buffer as ceil(k * T / E * 1.25) tokens (DeepSpeed's
top-1, top-2 and top-k gates all multiply the factor by k). Experts: Linear(d, h) -> GELU ->
Linear(h, d) with h = expert_hidden_mult * d, 4d for the two d=256 cases and d/2 for the
fine-grained (512, 64, 8) case, the same width in both MoE layers.

Time: median wall time of forward + loss + backward over ``--repeats`` rounds, after two
warm-up rounds. Each round runs the six layers once each, in an order rotated every round,
so background load on a shared machine falls on all of them alike. Gradients are cleared
(set to None) outside the timed region. ``x`` requires grad, as a layer inside a model would.
The ratios (ours/DS, ours/dense, grouped/loop) are paired: the median over rounds of the
two layers' times in the same round, with the range of those per-round ratios. Load that
drifts between rounds (a 16,384-token round takes about 30 s) cancels within a round; the
ratio of the two medians, which it does not cancel, is kept too (``*_of_medians``).

``--processes N`` times each (case, T) in N fresh processes, one after another, and pools
their rounds (the per-process paired medians are in the JSON and the table). A process
adds its own error that pairing cannot cancel: where its tensors land (page and cache
placement, the allocator's state) moved ours/dense at d512-E64-k8, T=16,384, from 0.86x
to 1.09x between processes running the same code on a quiet machine, while the rounds
within one process agreed to a few percent. ``make bench-moe`` uses 3.

Loss (what the backward differentiates):
- ours:  ``out.sum() + layer.aux_loss`` (the layer's own auxiliary loss: with ``balance="aux"``
  the Switch load-balancing loss times ``aux_coef`` plus the router z-loss times ``z_coef``);
- DeepSpeed: ``out.sum() + aux_coef * l_aux`` (its GShard/Switch balance loss, same
  coefficient; it has no z-loss);
- dense: ``out.sum()``.

The DeepSpeed measured is whatever is installed (0.19.8 for benchmarks/results/moe.json): that
version already dispatches sparsely (index_select into the (E, C, d) buffer, then a weighted
gather back), not with the dense one-hot einsum of older releases, and its top-k gate takes
any k (k > 2 through ``topkgating``).
DeepSpeed settings: ``ep_size=1``; ``top2_2nd_expert_sampling=False`` so its top-2 route is
the deterministic top-2 like ours (its default adds Gumbel noise to pick the second
expert); everything else at its defaults (top-1 keeps ``use_rts=True``, random token
selection when dropping; its top-k gate for k>2 drops by gate probability; ``min_capacity=4``).
Its ``Experts`` deep-copies one expert module, so every DeepSpeed expert is re-initialised
here; then its router and expert weights are copied from ours when ours has a single (E, d)
router matrix and stacked ``w_in`` (E, d, h) / ``w_out`` (E, h, d) expert weights: identical
routing decisions, hence identical expert loads, and for k >= 2 in dropless mode the same
function (the JSON records the relative output difference as a cross-check). ep_size=1 needs
no process group; if a DeepSpeed version does, a one-process gloo group is started on 127.0.0.1.

Memory: peak resident-set growth over one forward + backward (activations, temporaries and
the parameter gradients; parameters and input excluded), one subprocess per (case, T) that
builds the same layers and measures them in turn after a warm-up step each (VmHWM reset
through /proc/self/clear_refs; MALLOC_MMAP_THRESHOLD_=65536 so glibc returns freed blocks
and the peak follows the live bytes). ``--no-memory`` skips it. (A saved_tensors_hooks count
would miss tensors a custom autograd Function keeps on ``ctx`` itself.)

The JSON also records ours' own metrics over the timed steps (``pop_metrics``: dropped
fraction, load imbalance) and a SHA-256 of the ``moe`` package sources measured.

The machine load is recorded: load average before and after, and the CPU time that other
processes used during the run (from /proc/stat minus this process), in cores.
For each missed goal, the worst row is profiled (torch.profiler, top ops by self CPU time
over forward + backward), ours and the baseline it missed against (DeepSpeed or dense);
``--profile always`` / ``never`` overrides that.

On a shared 2-core machine, ``--threads 1`` gives far steadier numbers: with 2 threads any
other busy process stalls torch's OpenMP barriers and times swing by up to 10x.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from benchmarks.harness import (  # noqa: E402
    RESULTS,
    Col,
    LoadMeter,
    Table,
    WorkerFailed,
    emit,
    free_port,
    in_fresh_process,
    paired_ratio,
    proc_status_kib,
    reset_peak_rss,
    returning_frees,
    rotated,
    write_json,
)

# name -> (d_model, n_experts, top_k, expert_hidden_mult)
CASES: dict[str, tuple[int, int, int, float]] = {
    "d256-E8-k1": (256, 8, 1, 4.0),
    "d256-E8-k2": (256, 8, 2, 4.0),
    "d512-E64-k8": (512, 64, 8, 0.5),
}
CAPACITY_FACTOR = 1.25
AUX_COEF = 0.01  # MoEOptions.aux_coef default; DeepSpeed's l_aux is scaled by the same
GOAL_VS_DS = 0.65
GOAL_VS_DENSE = {8: 1.05, 64: 1.15}  # by expert count: coarse experts, fine-grained
LAYERS = ("ours_dropless", "ds_dropless", "ours_capacity", "ds_capacity", "dense", "ours_grouped")


def dense_goal(n_experts: int) -> float:
    return GOAL_VS_DENSE.get(n_experts, max(GOAL_VS_DENSE.values()))


# --- layers --------------------------------------------------------------------------


def _mlp(d: int, h: int) -> nn.Module:
    # bias-free, like our experts (MoEOptions has no bias switch; moe.experts defaults to none)
    return nn.Sequential(nn.Linear(d, h, bias=False), nn.GELU(), nn.Linear(h, d, bias=False))


def _ensure_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)


def make_ours(
    d: int,
    n_experts: int,
    k: int,
    mult: float,
    capacity_factor: float | None,
    matmul: str = "loop",
):
    from moe import MoE, MoEOptions

    opts = MoEOptions(
        expert_matmul=matmul,
        n_experts=n_experts,
        top_k=k,
        expert_hidden_mult=mult,
        activation="gelu",
        capacity_factor=capacity_factor,
        balance="aux",
        aux_coef=AUX_COEF,
    )
    return MoE(d, opts)


def _router_weight(ours: nn.Module, d: int, n_experts: int) -> torch.Tensor | None:
    found = [p for p in ours.parameters() if tuple(p.shape) == (n_experts, d)]
    return found[0] if len(found) == 1 else None


def _expert_weights(ours: nn.Module, d: int, n_experts: int, h: int):
    """Our stacked (E, d, h) input and (E, h, d) output expert weights, if recognisable."""
    w_in = [p for n, p in ours.named_parameters() if n.endswith("w_in")]
    w_out = [p for n, p in ours.named_parameters() if n.endswith("w_out")]
    if len(w_in) == 1 and len(w_out) == 1:
        if tuple(w_in[0].shape) == (n_experts, d, h) and tuple(w_out[0].shape) == (n_experts, h, d):
            return w_in[0], w_out[0]
    return None


def make_ds(d, n_experts, k, mult, capacity_factor, ours):
    """DeepSpeed's MoE layer, router and experts copied from ours where recognisable,
    else (experts) independently re-initialised."""
    from deepspeed.moe.layer import MoE as DSMoE

    h = int(round(mult * d))
    kwargs = dict(
        hidden_size=d,
        expert=_mlp(d, h),
        num_experts=n_experts,
        ep_size=1,
        k=k,
        top2_2nd_expert_sampling=False,
    )
    if capacity_factor is None:
        kwargs.update(drop_tokens=False)
    else:
        kwargs.update(drop_tokens=True, capacity_factor=capacity_factor)
    layer = DSMoE(**kwargs)
    for module in layer.deepspeed_moe.experts.modules():
        if isinstance(module, nn.Linear):
            module.reset_parameters()
    router = _router_weight(ours, d, n_experts)
    weights = _expert_weights(ours, d, n_experts, h)
    with torch.no_grad():
        if router is not None:
            layer.deepspeed_moe.gate.wg.weight.copy_(router)
        if weights is not None:
            for e, expert in enumerate(layer.deepspeed_moe.experts.deepspeed_experts):
                expert[0].weight.copy_(weights[0][e].t())
                expert[2].weight.copy_(weights[1][e].t())
    layer.copied = {"router": router is not None, "experts": weights is not None}
    return layer


def _ds_forward(layer, x):
    out, l_aux, _ = layer(x)
    return out.sum() + AUX_COEF * l_aux, out


def _ours_forward(layer, x):
    out = layer(x)
    return out.sum() + layer.aux_loss, out


def _dense_forward(layer, x):
    out = layer(x)
    return out.sum(), out


# --- measurement ---------------------------------------------------------------------


def _step(layer, forward, x) -> float:
    for p in layer.parameters():
        p.grad = None
    x.grad = None
    if x.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss, _ = forward(layer, x)
    loss.backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def layers_ratio(times: dict[str, list[float]], a: str, b: str) -> dict | None:
    """Layer a's time over layer b's, paired by round (None if either was not timed)."""
    if a not in times or b not in times:
        return None
    return paired_ratio(times[a], times[b])


def peak_growth_mib(layer, forward, x) -> float:
    """Peak resident-set growth over one forward + loss + backward, in MiB.

    VmHWM is reset through /proc/self/clear_refs just before; the worker process runs with
    MALLOC_MMAP_THRESHOLD_=65536 so freed blocks go back to the OS and the peak follows the
    bytes live (activations, temporaries, the new parameter gradients), not glibc's cache.
    """
    for p in layer.parameters():
        p.grad = None
    x.grad = None
    gc.collect()
    base = proc_status_kib("VmRSS")
    reset_peak_rss()
    loss, _ = forward(layer, x)
    loss.backward()
    del loss
    return (proc_status_kib("VmHWM") - base) / 1024


def memory_worker(name: str, T: int, seed: int) -> dict:
    """Run in its own process (see measure_memory): peak growth of each layer in turn."""
    x, layers, _ = build_layers(name, T, seed)
    for layer, forward in layers.values():
        _step(layer, forward, x)  # one-time allocations out of the way
    out = {n: round(peak_growth_mib(*layers[n], x), 1) for n in LAYERS if n in layers}
    return out | {"moe_sources_sha256": moe_sources_sha256()}


def in_subprocess(worker: str, name: str, T: int, args, env: dict[str, str] | None = None) -> dict:
    """Run `--memory-worker` or `--time-worker` for one (case, T) in a fresh process."""
    flags = [worker, name, T, "--seed", args.seed, "--repeats", args.repeats]
    flags += ["--budget", args.budget, "--device", args.device, "--dtype", args.dtype]
    flags += ["--threads", args.threads] if args.threads else []
    try:
        return in_fresh_process(__spec__.name, *flags, env=env)
    except WorkerFailed as failed:
        return {"error": failed.output[-300:]}


def measure_memory(name: str, T: int, args) -> dict:
    return in_subprocess("--memory-worker", name, T, args, returning_frees(65536))


def profile_layer(layer, forward, x, iters: int = 3, top: int = 15) -> dict:
    """Top ops by self CPU time over forward + loss + backward, per step."""
    from torch.profiler import ProfilerActivity, profile

    _step(layer, forward, x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            _step(layer, forward, x)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    rows = [
        {
            "op": e.key,
            "self_ms_per_step": round(e.self_cpu_time_total / 1e3 / iters, 3),
            "share": round(e.self_cpu_time_total / total, 4),
            "calls_per_step": e.count / iters,
        }
        for e in events[:top]
    ]
    return {"total_self_ms_per_step": round(total / 1e3 / iters, 2), "top_ops": rows}


def build_layers(
    name: str, T: int, seed: int, device: str = "cpu", dtype: torch.dtype = torch.float32
):
    """The input and the six layers (name -> (module, forward)) of one (case, T), built on
    the CPU from the seeds (the same weights wherever they run), then moved."""
    d, n_experts, k, mult = CASES[name]
    h = int(round(mult * d))
    torch.manual_seed(seed)
    x = torch.randn(T, d).requires_grad_(True)

    layers: dict[str, tuple[nn.Module, object]] = {}
    skipped: dict[str, str] = {}
    for mode, cf in (("dropless", None), ("capacity", CAPACITY_FACTOR)):
        torch.manual_seed(seed + 1)
        ours = make_ours(d, n_experts, k, mult, cf)
        layers[f"ours_{mode}"] = (ours, _ours_forward)
        try:
            torch.manual_seed(seed + 2)
            ds = make_ds(d, n_experts, k, mult, cf, ours)
            _ds_forward(ds, x[:64].detach())  # fails here if it needs a process group
        except Exception as exc:  # noqa: BLE001 - reported in the table, not hidden
            if "process group" in str(exc).lower() or "init_process_group" in str(exc):
                _ensure_process_group()
                ds = make_ds(d, n_experts, k, mult, cf, ours)
            else:
                skipped[f"ds_{mode}"] = f"{type(exc).__name__}: {exc}"[:200]
                ds = None
        if ds is not None:
            layers[f"ds_{mode}"] = (ds, _ds_forward)
    torch.manual_seed(seed + 3)
    layers["dense"] = (_mlp(d, k * h), _dense_forward)
    torch.manual_seed(seed + 1)  # ours dropless again, through torch's grouped_mm
    layers["ours_grouped"] = (make_ours(d, n_experts, k, mult, None, "grouped"), _ours_forward)
    for layer, _ in layers.values():
        layer.to(device, dtype)
    x = x.detach().to(device, dtype).requires_grad_(True)
    return x, layers, skipped


def time_case(name: str, T: int, args) -> dict:
    """What one process measures of one (case, T): build the layers, cross-check ours
    against DeepSpeed, warm up, then time the rounds (seconds per layer per round)."""
    x, layers, skipped = build_layers(name, T, args.seed, args.device, getattr(torch, args.dtype))
    names = [n for n in LAYERS if n in layers]
    # cross-check: with router and experts copied, the two dropless layers compute the same
    # function for k >= 2 (for k = 1 DeepSpeed weights the output by the top-1 softmax
    # probability, ours by 1 after renormalising); capacity modes differ in what they drop.
    agreement = {}
    for mode in ("dropless", "capacity"):
        if f"ds_{mode}" not in layers:
            continue
        with torch.no_grad():
            a = layers[f"ours_{mode}"][0](x)
            b = layers[f"ds_{mode}"][0](x)[0]
        agreement[mode] = {
            "max_abs_diff_over_max_abs": float((a - b).abs().max() / b.abs().max()),
            "copied_from_ours": layers[f"ds_{mode}"][0].copied,
        }
    # warm-up, and how long one round takes
    t0 = time.perf_counter()
    for _ in range(2):
        for n in names:
            _step(layers[n][0], layers[n][1], x)
    round_s = (time.perf_counter() - t0) / 2
    repeats = args.repeats
    if round_s * repeats > args.budget:
        repeats = max(3, min(repeats, int(args.budget // max(round_s, 1e-9))))
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in rotated(names, r):
            times[n].append(_step(layers[n][0], layers[n][1], x))
    ours_metrics = {}
    for mode in ("dropless", "capacity"):
        m = layers[f"ours_{mode}"][0].pop_metrics()
        ours_metrics[mode] = {key: m[key] for key in ("dropped_frac", "imbalance") if key in m}
    return {
        "times": times,
        "round_s": round_s,
        "ours_metrics": ours_metrics,
        "skipped": skipped,
        "agreement": agreement,
        "params": {n: sum(p.numel() for p in layers[n][0].parameters()) for n in names},
        "_layers": layers,  # for the profile; dropped before writing JSON
        "_x": x,
    }


def time_in_processes(name: str, T: int, args) -> list[dict]:
    """time_case in this process (--processes 1) or in each of N fresh ones in turn."""
    if args.processes == 1:
        return [time_case(name, T, args)]
    runs = [in_subprocess("--time-worker", name, T, args) for _ in range(args.processes)]
    failed = [r["error"] for r in runs if "error" in r]
    if failed:
        raise RuntimeError(f"{name} T={T}: a timing process failed: {failed[0]}")
    return runs


def run_case(name: str, T: int, args, log) -> dict:
    d, n_experts, k, mult = CASES[name]
    h = int(round(mult * d))
    runs = time_in_processes(name, T, args)
    # the rounds of all processes pooled; the per-process medians show what a process adds
    times = {n: [t for run in runs for t in run["times"][n]] for n in runs[0]["times"]}
    ms = {n: statistics.median(v) * 1e3 for n, v in times.items()}
    first = runs[0]  # same seed, inputs and routing in every process

    def by_process(a: str, b: str) -> list[float] | None:
        if len(runs) == 1 or a not in times or b not in times:
            return None
        return [layers_ratio(run["times"], a, b)["median"] for run in runs]

    mem = measure_memory(name, T, args) if args.memory else None

    result = {
        "case": name,
        "d_model": d,
        "n_experts": n_experts,
        "top_k": k,
        "expert_hidden": h,
        "dense_hidden": k * h,
        "tokens": T,
        "processes": len(runs),
        "repeats": len(times["dense"]),
        "round_s": round(statistics.median(run["round_s"] for run in runs), 3),
        "ms": {n: round(v, 2) for n, v in ms.items()},
        "ms_all": {n: [round(t * 1e3, 2) for t in v] for n, v in times.items()},
        "peak_rss_growth_mib": mem,
        "ours_metrics": first["ours_metrics"],
        "skipped": first["skipped"],
        "ours_vs_ds_outputs": first["agreement"],
        "params": first["params"],
        "rows": [],
        "grouped_over_loop": layers_ratio(times, "ours_grouped", "ours_dropless")["median"],
    }
    for mode in ("dropless", "capacity"):
        ds_ms = ms.get(f"ds_{mode}")
        vs_ds = layers_ratio(times, f"ours_{mode}", f"ds_{mode}")
        vs_dense = layers_ratio(times, f"ours_{mode}", "dense")
        result["rows"].append(
            {
                "mode": mode,
                "ours_ms": round(ms[f"ours_{mode}"], 2),
                "ds_ms": None if ds_ms is None else round(ds_ms, 2),
                "ds_na_reason": first["skipped"].get(f"ds_{mode}"),
                "dense_ms": round(ms["dense"], 2),
                "ours_over_ds": None if vs_ds is None else vs_ds["median"],
                "ours_over_ds_range": None if vs_ds is None else vs_ds["range"],
                "ours_over_ds_of_medians": None if vs_ds is None else vs_ds["of_medians"],
                "ours_over_ds_by_process": by_process(f"ours_{mode}", f"ds_{mode}"),
                "ours_over_dense": vs_dense["median"],
                "ours_over_dense_range": vs_dense["range"],
                "ours_over_dense_of_medians": vs_dense["of_medians"],
                "ours_over_dense_by_process": by_process(f"ours_{mode}", "dense"),
                "goal_vs_ds_met": None if vs_ds is None else vs_ds["median"] <= GOAL_VS_DS,
                "goal_vs_dense_met": vs_dense["median"] <= dense_goal(n_experts),
            }
        )
    log(
        f"  {name} T={T}: "
        + ", ".join(f"{n} {v:.1f} ms" for n, v in ms.items())
        + f" ({result['repeats']} rounds in {len(runs)} process(es))"
    )
    result["_layers"], result["_x"] = first.get("_layers"), first.get("_x")
    return result


def moe_sources_sha256() -> str:
    """SHA-256 of the ``moe`` package's sources on disk now (names and bytes): which
    version of the layer a result measured, and whether it changed during the run."""
    import moe

    digest = hashlib.sha256()
    for path in sorted(Path(moe.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


TABLE = Table(
    Col("case", "<12"),
    Col("mode", "<9"),
    Col("tokens", ">6"),
    Col("ours ms", ">9.1f"),
    Col("DS ms", ">9.1f"),
    Col("dense ms", ">9.1f"),
    Col("ours/DS", ">8.2f"),
    Col("ours/dense", ">10.2f"),
    Col("(range)", ">11"),
    Col("grouped/loop", ">12"),
    missing="N/A",
)


def print_table(results: list[dict]) -> None:
    goals = f"DS<={GOAL_VS_DS}, dense<={GOAL_VS_DENSE[8]} E8, {GOAL_VS_DENSE[64]} E64"
    print(TABLE.header(f"  goal met? ({goals})"))
    for res in results:
        for row in res["rows"]:
            ds_ok = row["goal_vs_ds_met"]
            goal = (
                f"DS {'N/A' if ds_ok is None else ('yes' if ds_ok else 'NO')}, "
                f"dense {'yes' if row['goal_vs_dense_met'] else 'NO'}"
            )
            print(
                TABLE.row(
                    res["case"],
                    row["mode"],
                    res["tokens"],
                    row["ours_ms"],
                    row["ds_ms"],
                    row["dense_ms"],
                    row["ours_over_ds"],
                    row["ours_over_dense"],
                    "{:.2f}-{:.2f}".format(*row["ours_over_dense_range"]),
                    res["grouped_over_loop"] if row["mode"] == "dropless" else "",
                    extra=f"  {goal}",
                )
            )
            if row["ds_na_reason"]:
                print(f"{'':<12} DS N/A: {row['ds_na_reason']}")
            if row["ours_over_dense_by_process"]:
                each = ", ".join(f"{v:.2f}" for v in row["ours_over_dense_by_process"])
                print(f"{'':<12} ours/dense in each process: {each}")
    if any(res["peak_rss_growth_mib"] for res in results):
        print()
        print("peak RSS growth over one forward+backward, MiB")
        print("  (ours dropless / DS dropless / ours capacity / DS capacity / dense / grouped):")
        for res in results:
            m = res["peak_rss_growth_mib"] or {}
            vals = (
                m["error"]
                if "error" in m
                else " / ".join("N/A" if m.get(n) is None else f"{m[n]:.1f}" for n in LAYERS)
            )
            print(f"  {res['case']:<12} T={res['tokens']:<6} {vals}")


def _worst_rows(results: list[dict], always: bool) -> list[tuple[str, dict, dict]]:
    """(goal, result, row) of the worst row against each goal: missed ones, or all if always."""
    pairs = [(res, row) for res in results for row in res["rows"]]
    out = []
    for goal, key, met in (
        ("ds", "ours_over_ds", "goal_vs_ds_met"),
        ("dense", "ours_over_dense", "goal_vs_dense_met"),
    ):
        rated = [p for p in pairs if p[1][key] is not None and (always or p[1][met] is False)]
        if rated:
            res, row = max(rated, key=lambda p: p[1][key])
            out.append((goal, res, row))
    return out


def _print_profile(title: str, prof: dict) -> None:
    print(f"{title}: {prof['total_self_ms_per_step']} ms self CPU per forward+backward")
    print(f"  {'op':<44} {'ms/step':>8} {'share':>6} {'calls':>6}")
    for r in prof["top_ops"]:
        print(
            f"  {r['op'][:44]:<44} {r['self_ms_per_step']:>8.2f} "
            f"{r['share'] * 100:>5.1f}% {r['calls_per_step']:>6.0f}"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``--memory-worker`` / ``--time-worker CASE TOKENS`` (hidden) make
    this process one worker. On CUDA, memory and profiles are off: both read the CPU side."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    ap.add_argument("--out", type=Path, default=RESULTS / "moe.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--budget",
        type=float,
        default=300.0,
        help="seconds of timed rounds per (case, tokens); fewer repeats (>= 3) past it",
    )
    ap.add_argument("--profile", choices=["auto", "always", "never"], default="auto")
    ap.add_argument(
        "--no-memory",
        dest="memory",
        action="store_false",
        help="skip the peak-memory subprocesses",
    )
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument(
        "--processes",
        type=int,
        default=1,
        help="time each (case, tokens) in this many fresh processes, rounds pooled (1: here)",
    )
    ap.add_argument("--memory-worker", nargs=2, metavar=("CASE", "TOKENS"), help=argparse.SUPPRESS)
    ap.add_argument("--time-worker", nargs=2, metavar=("CASE", "TOKENS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device == "cuda":  # memory and profiles read this process's CPU side
        args.memory, args.profile = False, "never"
    if args.processes < 1:
        ap.error(f"--processes: expected at least 1, got {args.processes}")
    return args


def setup_libraries(args: argparse.Namespace) -> None:
    """Torch's thread count, and DeepSpeed imported with its INFO lines silenced (they
    would bury the progress lines), in the driver and in every worker alike."""
    if args.threads:
        torch.set_num_threads(args.threads)
    from deepspeed.utils import logger as ds_logger  # deepspeed itself imported here

    ds_logger.setLevel(logging.WARNING)


def run_worker(args: argparse.Namespace) -> dict:
    """What a worker process measures of its (case, T): peak memory, or one timing run
    (less the layers and input, which are not JSON)."""
    case, tokens = args.memory_worker or args.time_worker
    if args.memory_worker:
        return memory_worker(case, int(tokens), args.seed)
    return {k: v for k, v in time_case(case, int(tokens), args).items() if k[0] != "_"}


def log(msg: str) -> None:
    """Progress on stderr, so stdout keeps only the tables."""
    print(msg, file=sys.stderr, flush=True)


def measure_all(args: argparse.Namespace) -> list[dict]:
    """Every (case, T), after a line saying what is measured and how loaded the machine is."""
    import deepspeed

    log(
        f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, "
        f"{torch.get_num_threads()} threads, loadavg {os.getloadavg()}"
    )
    return [run_case(name, T, args, log) for name in args.cases for T in args.tokens]


def check_memory_sources(results: list[dict], ours_sha: str) -> None:
    """Record, per result, whether its memory worker (which imported moe later) measured
    the same sources as the timing did; its own hash leaves the memory figures."""
    for res in results:
        mem = res["peak_rss_growth_mib"]
        if mem and "moe_sources_sha256" in mem:
            res["memory_same_moe_sources"] = mem.pop("moe_sources_sha256") == ours_sha


def profile_pair(goal: str, res: dict, row: dict, args: argparse.Namespace) -> dict:
    """Profile ours and the baseline it missed against (DeepSpeed or dense) on one row,
    printing each; the layers are built here if the row was timed in other processes."""
    mode = row["mode"]
    base = f"ds_{mode}" if goal == "ds" else "dense"
    entry = {"goal": goal, "case": res["case"], "tokens": res["tokens"], "mode": mode}
    if res["_layers"] is None:
        dtype = getattr(torch, args.dtype)
        res["_x"], res["_layers"], _ = build_layers(
            res["case"], res["tokens"], args.seed, args.device, dtype
        )
    for who in (f"ours_{mode}", base):
        layer, forward = res["_layers"][who]
        entry[who] = profile_layer(layer, forward, res["_x"])
        print()
        _print_profile(
            f"profile of {who}, {res['case']} T={res['tokens']} (worst vs {goal})", entry[who]
        )
    return entry


def profile_worst(results: list[dict], args: argparse.Namespace) -> list[dict]:
    """Profiles of the worst row against each missed goal (each goal with ``--profile
    always``, none with ``never``): where the time goes when a goal is missed."""
    if args.profile == "never":
        return []
    worst = _worst_rows(results, args.profile == "always")
    return [profile_pair(goal, res, row, args) for goal, res, row in worst]


def print_machine(load: dict) -> None:
    """How busy the machine was during the run: the figures mean less under load."""
    print()
    print(
        f"machine: {load['cpus']} CPUs, loadavg before {load['loadavg_before']}, after "
        f"{load['loadavg_after']}; other processes used {load['other_processes_cores']} cores "
        f"on average during the run ({load['wall_s']} s)"
    )


def run_settings(args: argparse.Namespace) -> dict:
    """The JSON's settings: how the layers were run, DeepSpeed's included."""
    return {
        "repeats": args.repeats,
        "processes": args.processes,
        "warmup": 2,
        "threads": torch.get_num_threads(),
        "device": args.device,
        "dtype": args.dtype,
        "seed": args.seed,
        "deepspeed": {
            "ep_size": 1,
            "top2_2nd_expert_sampling": False,
            "experts": "re-initialised (its Experts deep-copies one module), then copied "
            "from ours when recognisable (see ours_vs_ds_outputs.copied_from_ours)",
            "router": "copied from ours when ours has one (E, d) router matrix",
            "bias": "none in the experts or the dense FFN (like ours)",
        },
    }


def build_report(
    args: argparse.Namespace, load: dict, results: list[dict], profiles: list[dict], sha: str
) -> dict:
    """The JSON written: results and profiles with the losses, goals, settings, versions
    and load behind them; the in-memory layers and inputs are dropped (not JSON)."""
    import deepspeed

    for res in results:
        res.pop("_layers")
        res.pop("_x")
    return {
        "benchmark": "moe forward+backward, median ms",
        "loss": {
            "ours": "out.sum() + layer.aux_loss",
            "deepspeed": f"out.sum() + {AUX_COEF} * l_aux",
            "dense": "out.sum()",
        },
        "goals": {"ours_over_ds": GOAL_VS_DS, "ours_over_dense_by_n_experts": GOAL_VS_DENSE},
        "capacity_factor": CAPACITY_FACTOR,
        "settings": run_settings(args),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
            "moe_sources_sha256": sha,
            "moe_sources_changed_during_run": moe_sources_sha256() != sha,
        },
        "machine": load,
        "results": results,
        "profiles": profiles,
    }


def main(argv: list[str] | None = None) -> dict:
    """Time (and profile, and measure) every (case, T), print the tables, write the JSON;
    as a worker, emit its one measurement instead. Returns the report ({} for a worker)."""
    args = parse_args(argv)
    setup_libraries(args)
    if args.memory_worker or args.time_worker:
        emit(run_worker(args))
        return {}
    ours_sha = moe_sources_sha256()  # the version measured is the one on disk now
    meter, t_start = LoadMeter(), time.perf_counter()
    results = measure_all(args)
    load = meter.report()
    check_memory_sources(results, ours_sha)
    print()
    print_table(results)
    profiles = profile_worst(results, args)
    load["wall_s"] = round(time.perf_counter() - t_start, 1)
    print_machine(load)
    report = build_report(args, load, results, profiles, ours_sha)
    write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
