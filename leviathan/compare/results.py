"""What a comparison's runs left: per run, per config, and the whole comparison."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from leviathan.compare.plan import Budget, RunSpec, read_json
from leviathan.sizing import ModelSize
from leviathan.storage import read_records as metrics_records
from leviathan.train.checkpoint import quiet

# the statuses of a run that reached its budget. The others: "failed" (it raised, in this
# try or, read from its error.txt by compare --report-only, an earlier one) and "pending"
# (compare --report-only: not finished)
FINISHED = ("trained", "resumed", "reused")


@dataclass
class RunResult:
    name: str
    label: str
    seed: int
    dir: str
    status: Literal["trained", "resumed", "reused", "failed", "pending"]
    error: str | None = None
    steps: int | None = None
    final_val_bpc: float | None = None
    final_val_loss: float | None = None
    final_heldout_bpc: float | None = None  # the held-out documents (data.val_documents)
    # the lowest periodic val BPC: an estimate on the first train.eval_tokens val tokens
    # (periodic evaluations score a prefix), comparable across runs but not with the exact
    # final_val_bpc, so never mixed with it
    best_periodic_val_bpc: float | None = None
    tokens_per_s: float | None = None  # median training throughput over the steps
    train_s: float | None = None  # training time (all sessions, periodic evals included)
    curve: list[dict[str, float]] = field(default_factory=list)  # step, time_s, val_bpc


@dataclass
class ConfigResult:
    label: str
    config_path: str
    mixer: str
    ffn: str
    size: ModelSize | None
    runs: list[RunResult]

    @property
    def ok(self) -> list[RunResult]:
        return [r for r in self.runs if r.status in FINISHED]

    def final_bpc(self, split: Split = "val") -> tuple[float, float] | None:
        """Mean and sample standard deviation of the finished runs' final BPC on `split`."""
        return mean_std([final_of(r, split) for r in self.ok])

    def by_seed(self, split: Split) -> dict[int, float]:
        """Final BPC on `split` of each seed that finished."""
        return {r.seed: v for r in self.ok if (v := final_of(r, split)) is not None}

    def best_periodic_bpc(self) -> float | None:
        """The lowest periodic val BPC (an estimate) of any finished seed."""
        values = [r.best_periodic_val_bpc for r in self.ok if r.best_periodic_val_bpc is not None]
        return min(values) if values else None

    def tokens_per_s(self) -> float | None:
        values = [r.tokens_per_s for r in self.ok if r.tokens_per_s is not None]
        return statistics.fmean(values) if values else None

    def to_dict(self) -> dict[str, Any]:
        final, heldout = self.final_bpc(), self.final_bpc("heldout")
        return {
            "label": self.label,
            "config": self.config_path,
            "mixer": self.mixer,
            "ffn": self.ffn,
            "params": self.size.total if self.size else None,
            "active_params": self.size.active if self.size else None,
            "flops_per_token": self.size.flops_per_token if self.size else None,
            "final_val_bpc_mean": final[0] if final else None,
            "final_val_bpc_std": final[1] if final else None,
            "final_heldout_bpc_mean": heldout[0] if heldout else None,
            "final_heldout_bpc_std": heldout[1] if heldout else None,
            "best_periodic_val_bpc": self.best_periodic_bpc(),
            "tokens_per_s": self.tokens_per_s(),
            "runs_ok": len(self.ok),
            "runs": [asdict(r) for r in self.runs],
        }


Split = Literal["val", "heldout"]


def final_of(run: RunResult, split: Split) -> float | None:
    return run.final_val_bpc if split == "val" else run.final_heldout_bpc


def mean_std(values: list[float | None]) -> tuple[float, float] | None:
    """Mean and sample standard deviation (0 for one value) of the values not None."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    return statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else 0.0


@dataclass(frozen=True)
class PairedDifference:
    """A config's final BPC minus the baseline's, seed by seed (same seed, same data
    order and init draws where the shapes agree), over the seeds both finished."""

    label: str
    baseline: str
    split: Split
    seeds: list[int]
    differences: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.differences)

    @property
    def std(self) -> float:
        """Sample standard deviation of the differences (0 for one seed)."""
        return statistics.stdev(self.differences) if len(self.differences) > 1 else 0.0

    @property
    def t(self) -> float | None:
        """The paired t statistic, mean / (std / sqrt(seeds)), with seeds - 1 degrees of
        freedom (None for one seed, or differences all equal)."""
        n = len(self.differences)
        return self.mean / (self.std / n**0.5) if n > 1 and self.std > 0 else None


def paired_differences(configs: list[ConfigResult], split: Split) -> list[PairedDifference]:
    """Every config after the first against the first (the baseline), on `split`."""
    if not configs:
        return []
    base = configs[0].by_seed(split)
    out = []
    for config in configs[1:]:
        mine = config.by_seed(split)
        seeds = sorted(set(base) & set(mine))
        if seeds:
            diffs = [mine[s] - base[s] for s in seeds]
            out.append(PairedDifference(config.label, configs[0].label, split, seeds, diffs))
    return out


@dataclass
class Comparison:
    out: Path
    budget: Budget
    seeds: list[int]
    data: dict[str, Any]
    configs: list[ConfigResult]

    @property
    def failed(self) -> list[RunResult]:
        return [r for c in self.configs for r in c.runs if r.status == "failed"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": str(self.budget),
            "seeds": self.seeds,
            "data": self.data,
            "configs": [c.to_dict() for c in self.configs],
            "paired_differences": [
                {**asdict(d), "mean": d.mean, "std": d.std, "t": d.t}
                for split in ("val", "heldout")
                for d in paired_differences(self.configs, split)
            ],
        }


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return metrics_records(path, log=quiet)  # a torn last line (a killed run) is left out


def cumulative_times(records: list[dict[str, Any]]) -> list[float]:
    """Training time at each record across sessions: `elapsed_s` restarts on resume."""
    times, offset, last, last_total = [], 0.0, 0.0, 0.0
    for record in records:
        elapsed = record["elapsed_s"]
        if elapsed < last:
            offset = last_total
        last = elapsed
        last_total = offset + elapsed
        times.append(last_total)
    return times


def collect(spec: RunSpec, status: str, error: str | None = None) -> RunResult:
    """What a run folder shows: summary, curve, throughput (partial for a failed run)."""
    records = read_records(spec.dir)
    times = cumulative_times(records)
    curve = [
        {"step": r["step"], "time_s": t, "val_bpc": r["val_bpc"]}
        for r, t in zip(records, times, strict=True)
        if "val_bpc" in r
    ]
    summary = read_json(spec.dir / "summary.json") if status in FINISHED else None
    result = RunResult(spec.name, spec.label, spec.seed, str(spec.dir), status, error, curve=curve)
    if records:
        result.steps = records[-1]["step"]
        result.tokens_per_s = statistics.median(r["tokens_per_s"] for r in records)
        result.train_s = times[-1]
    if summary is not None:
        result.steps = summary["steps"]
        result.final_val_bpc = summary["val_bpc"]
        result.final_val_loss = summary["val_loss"]
        result.final_heldout_bpc = summary.get("heldout_bpc")  # absent before val_documents
    result.best_periodic_val_bpc = min((p["val_bpc"] for p in curve), default=None)
    return result
