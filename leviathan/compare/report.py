"""The comparison's outputs: results.md (tables), results.json (everything), and the
val-BPC plots against steps and against training time (one line per config: the mean
over seeds of the periodic estimates, with a min-max band, ending in a star at the exact
final val BPC)."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from leviathan.compare.results import paired_differences

if TYPE_CHECKING:
    from leviathan.compare.results import Comparison, ConfigResult, RunResult, Split

PLOT_STEPS = "val_bpc_steps.png"
PLOT_TIME = "val_bpc_time.png"


def write_report(comparison: Comparison) -> None:
    out = comparison.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps(comparison.to_dict(), indent=1) + "\n", encoding="utf-8"
    )
    plot_bpc(comparison.configs, "step", out / PLOT_STEPS)
    plot_bpc(comparison.configs, "time_s", out / PLOT_TIME)
    (out / "results.md").write_text(markdown(comparison), encoding="utf-8")


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def fmt_count(value: int | None) -> str:
    if value is None:
        return "-"
    if value >= 1e9:
        return f"{value / 1e9:.2f}B"
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    return f"{value / 1e3:.1f}k"


def cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def mean_text(values: tuple[float, float] | None, runs: int) -> str:
    """`mean ± std` over several runs, the value alone for one, `-` for none."""
    if values is None:
        return "-"
    return f"{values[0]:.4f} ± {values[1]:.4f}" if runs > 1 else f"{values[0]:.4f}"


def markdown(c: Comparison) -> str:
    seeds = ", ".join(str(s) for s in c.seeds)
    heldout = "heldout_tokens" in c.data
    data_line = (
        f"Data: `{c.data['dir']}` (vocabulary {c.data['vocab_size']:,}; train "
        f"{c.data['train_tokens']:,} tokens; val {c.data['val_tokens']:,} tokens, "
        f"{c.data['val_characters']:,} characters"
    )
    if heldout:
        names = ", ".join(Path(d).stem for d in c.data["heldout_documents"])
        data_line += (
            f"; held out {c.data['heldout_tokens']:,} tokens, "
            f"{c.data['heldout_characters']:,} characters: {names}"
        )
    lines = [
        f"# Comparison: budget {c.budget}, seeds {seeds}",
        "",
        data_line + ").",
        "",
        "| config | mixer | ffn | params | active | FLOPs/token | final val BPC "
        + ("| held-out BPC " if heldout else "")
        + "| best periodic val BPC (estimate) | tokens/s | runs ok |",
        "|---|---|---|---:|---:|---:|---:|" + ("---:|" if heldout else "") + "---:|---:|---:|",
    ]
    for r in c.configs:
        n_ok = len(r.ok)
        size = r.size
        lines.append(
            f"| {cell(r.label)} | {cell(r.mixer)} | {cell(r.ffn)} "
            f"| {fmt_count(size.total if size else None)} "
            f"| {fmt_count(size.active if size else None)} "
            f"| {fmt_count(size.flops_per_token if size else None)} "
            f"| {mean_text(r.final_bpc(), n_ok)} "
            + (f"| {mean_text(r.final_bpc('heldout'), n_ok)} " if heldout else "")
            + f"| {fmt(r.best_periodic_bpc(), '.4f')} | {fmt(r.tokens_per_s(), ',.0f')} "
            f"| {n_ok}/{len(r.runs)} |"
        )
    lines += paired_table(c.configs, ("val", "heldout") if heldout else ("val",))
    lines += [
        "",
        "Final val BPC: the whole validation split, exact, after the last step; mean ± "
        "sample standard deviation over the seeds that finished. Held-out BPC: the same on "
        "the whole documents of `data.val_documents`, which training never saw. Best "
        "periodic val BPC: the lowest any seed reached at a periodic evaluation, which scores "
        "only the first `train.eval_tokens` val tokens: an estimate, comparable between "
        "configs but not with final val BPC (the plots draw the same estimates, and the exact "
        "final value as a star). FLOPs/token: "
        "active forward FLOPs at `train.seq_len` (training is about 3x). tokens/s: median "
        "training throughput over the steps of a run, mean over seeds.",
        "",
        "## Runs",
        "",
        "| run | seed | status | steps | final val BPC | best periodic val BPC (estimate) "
        "| tokens/s | train s "
        "| error |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in c.configs:
        for run in r.runs:
            lines.append(
                f"| {cell(run.name)} | {run.seed} | {run.status} | {fmt(run.steps, 'd')} "
                f"| {fmt(run.final_val_bpc, '.4f')} | {fmt(run.best_periodic_val_bpc, '.4f')} "
                f"| {fmt(run.tokens_per_s, ',.0f')} | {fmt(run.train_s, '.1f')} "
                f"| {cell(run.error or '')} |"
            )
    lines += [
        "",
        "Train time: seconds of training, periodic evaluations included, summed over the "
        "sessions of a resumed run.",
        "",
        f"![val BPC against steps]({PLOT_STEPS})",
        "",
        f"![val BPC against training time]({PLOT_TIME})",
        "",
    ]
    return "\n".join(lines)


def paired_table(configs: list[ConfigResult], splits: tuple[Split, ...]) -> list[str]:
    """Each config minus the first, seed by seed, on each split: the mean difference,
    its spread over the seeds and every difference."""
    rows = [d for split in splits for d in paired_differences(configs, split)]
    if not rows:
        return []
    lines = [
        "",
        f"## Paired differences against {configs[0].label}",
        "",
        "| config | split | seeds | mean BPC difference | std | t | per seed |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for d in rows:
        per_seed = ", ".join(f"{s}: {v:+.4f}" for s, v in zip(d.seeds, d.differences, strict=True))
        lines.append(
            f"| {cell(d.label)} | {d.split} | {len(d.seeds)} | {d.mean:+.4f} | {d.std:.4f} "
            f"| {fmt(d.t, '+.2f')} | {per_seed} |"
        )
    lines += [
        "",
        f"Difference: the config's final BPC minus {configs[0].label}'s at the same seed "
        "(negative: better than the baseline); std: sample standard deviation of the "
        "per-seed differences (0 for one seed); t: the paired t statistic, mean / (std / "
        "sqrt(seeds)), seeds - 1 degrees of freedom (|t| > 4.30 is p < 0.05, two-sided, "
        "at 3 seeds).",
    ]
    return lines


def band(runs, x_key: str) -> tuple[list[float], list[float], list[float], list[float]]:
    """Per evaluation step: x (the step, or the mean time over seeds), mean, min and max
    val BPC over the seeds that reached it."""
    by_step: dict[int, list[dict]] = defaultdict(list)
    for run in runs:
        for point in run.curve:
            by_step[point["step"]].append(point)
    xs, mean, low, high = [], [], [], []
    for step in sorted(by_step):
        points = by_step[step]
        values = [p["val_bpc"] for p in points]
        xs.append(sum(p[x_key] for p in points) / len(points))
        mean.append(sum(values) / len(values))
        low.append(min(values))
        high.append(max(values))
    return xs, mean, low, high


def final_point(runs: list[RunResult], x_key: str) -> tuple[float, float] | None:
    """The exact final val BPC, mean over the seeds, at their mean last step or time."""
    done = [r for r in runs if r.final_val_bpc is not None and r.train_s is not None]
    if not done:
        return None
    xs = [r.steps if x_key == "step" else r.train_s for r in done]
    return statistics.fmean(xs), statistics.fmean(r.final_val_bpc for r in done)


def plot_bpc(configs: list[ConfigResult], x_key: str, path: Path) -> None:
    """Periodic val BPC (estimates) as lines and bands; the exact final value as a star,
    so the plot's end and the table's final val BPC are told apart."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, config in enumerate(configs):
        xs, mean, low, high = band(config.ok, x_key)
        if not xs:
            continue
        color = f"C{i % 10}"
        ax.plot(xs, mean, "o-", ms=3, color=color, label=f"{config.label} ({len(config.ok)})")
        ax.fill_between(xs, low, high, color=color, alpha=0.2, lw=0)
        final = final_point(config.ok, x_key)
        if final is not None:
            ax.plot(*final, "*", ms=13, color=color, mec="black", mew=0.6)
    xlabel = "step" if x_key == "step" else "training time (s)"
    ax.set(
        xlabel=xlabel,
        ylabel="val bits per character",
        title=f"val BPC against {xlabel}\nlines: periodic estimates (first train.eval_tokens "
        "val tokens); stars: exact final",
    )
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(title="config (seeds); band: min-max")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
