"""Run every config x seed on one dataset under one budget; collect what the runs left.

Rules (see also `leviathan compare --help` and the README):

* One dataset: every config must have the same `data` section (after the shared
  overrides), else `CompareError` before anything runs. Forcing the first config's data
  onto the others would silently compare models trained on different text or with a
  different tokenizer than their configs say; refusing makes the mismatch visible.
* One budget: `steps=K` sets `train.max_steps=K`; `tokens=K` sets it to
  ceil(K / tokens per step) of each config (micro_batch_size x grad_accum x seq_len, one
  process); `minutes=K` sets `train.max_steps` to `MINUTES_MAX_STEPS` and stops each run
  after K minutes of training (the LR schedule's cosine then spans the huge max_steps:
  warmup, then an almost constant LR).
* Run `<config stem>-s<seed>` lives in `OUT/runs/<config stem>-s<seed>`, with `train.seed`
  = seed and `run.dir` there; `compare.json` beside it records the budget and the
  resolved config it was started with.
* A run whose `compare.json` matches and whose `summary.json` shows the budget done is
  reused. One with a checkpoint but no finished summary (interrupted) resumes from its
  latest checkpoint (a `minutes` run gets the time it has left). A folder that holds a
  run of another config or budget is refused (`CompareError`) before anything runs.
* A run that raises is recorded as failed, with its error; the others go on.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from leviathan.config import Config, load_config
from leviathan.data import prepare
from leviathan.errors import LeviathanError
from leviathan.sizing import ModelSize, model_size
from leviathan.train.checkpoint import latest_checkpoint

MARKER = "compare.json"
MINUTES_MAX_STEPS = 10**9  # "train until the clock says stop"
# keys a rerun may change without invalidating a finished run (where it lives, its logging)
MARKER_IGNORES = {"run": ("dir", "wandb", "wandb_project"), "train": ("threads",)}
BudgetKind = Literal["steps", "tokens", "minutes"]


class CompareError(LeviathanError):
    """The comparison cannot start: configs disagree on data, names clash, a bad budget,
    or a run folder holds a run of another config or budget."""


@dataclass(frozen=True)
class Budget:
    """How much each run trains: `steps`, `tokens` or wall-clock `minutes`."""

    kind: BudgetKind
    amount: float

    def __str__(self) -> str:
        return f"{self.kind}={self.amount:g}"

    def max_steps(self, cfg: Config) -> int:
        """`train.max_steps` for a run of `cfg` under this budget."""
        if self.kind == "steps":
            return int(self.amount)
        if self.kind == "tokens":
            t = cfg.train
            return max(1, math.ceil(self.amount / (t.micro_batch_size * t.grad_accum * t.seq_len)))
        return MINUTES_MAX_STEPS

    @property
    def seconds(self) -> float | None:
        """The wall-clock budget in seconds, or None for a steps or tokens budget."""
        return self.amount * 60 if self.kind == "minutes" else None


def parse_budget(text: str) -> Budget:
    """`steps=K`, `tokens=K` (integers; 1e6 style accepted) or `minutes=K` (any K > 0)."""
    kind, sep, value = text.partition("=")
    kind = kind.strip()
    if not sep or kind not in ("steps", "tokens", "minutes"):
        raise CompareError(f"--budget {text!r}: expected steps=K, tokens=K or minutes=K")
    try:
        amount = float(value)
    except ValueError:
        raise CompareError(f"--budget {text!r}: {value!r} is not a number") from None
    if not math.isfinite(amount) or amount <= 0:
        raise CompareError(f"--budget {text!r}: must be positive")
    if kind != "minutes" and amount != int(amount):
        raise CompareError(f"--budget {text!r}: {kind} must be a whole number")
    return Budget(kind, int(amount) if kind != "minutes" else amount)


@dataclass
class RunSpec:
    """One config x seed: its resolved config and its folder."""

    name: str  # <config stem>-s<seed>
    label: str  # the config stem
    config_path: str
    seed: int
    cfg: Config

    @property
    def dir(self) -> Path:
        return Path(self.cfg.run.dir)

    def marker(self, budget: Budget) -> dict[str, Any]:
        """What `compare.json` records: the budget and the config, less the keys that do
        not change what is trained (MARKER_IGNORES)."""
        config = self.cfg.to_dict()
        for section, keys in MARKER_IGNORES.items():
            for key in keys:
                config[section].pop(key)
        return json.loads(json.dumps({"budget": str(budget), "config": config}))


@dataclass
class RunResult:
    name: str
    label: str
    seed: int
    dir: str
    status: Literal["trained", "resumed", "reused", "failed"]
    error: str | None = None
    steps: int | None = None
    final_val_bpc: float | None = None
    final_val_loss: float | None = None
    best_val_bpc: float | None = None
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
        return [r for r in self.runs if r.status != "failed"]

    def final_bpc(self) -> tuple[float, float] | None:
        """Mean and sample standard deviation (0 for one run) of the finished runs."""
        values = [r.final_val_bpc for r in self.ok if r.final_val_bpc is not None]
        if not values:
            return None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    def best_bpc(self) -> float | None:
        values = [r.best_val_bpc for r in self.ok if r.best_val_bpc is not None]
        return min(values) if values else None

    def tokens_per_s(self) -> float | None:
        values = [r.tokens_per_s for r in self.ok if r.tokens_per_s is not None]
        return statistics.fmean(values) if values else None

    def to_dict(self) -> dict[str, Any]:
        final = self.final_bpc()
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
            "best_val_bpc": self.best_bpc(),
            "tokens_per_s": self.tokens_per_s(),
            "runs_ok": len(self.ok),
            "runs": [asdict(r) for r in self.runs],
        }


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
        }


def describe_mixer(options: Any) -> str:
    if options.kind == "token_xcorr":
        return f"token_xcorr W={options.window_q}x{options.window_k} r={options.rank}"
    if options.kind == "channel_xcorr":
        return f"channel_xcorr L={options.lags}"
    return options.kind


def describe_ffn(options: Any) -> str:
    if options.kind == "dense":
        return f"dense {options.activation} {options.hidden_mult:g}x"
    if options.kind == "moe":
        text = f"moe {options.n_experts}e top-{options.top_k} {options.expert_hidden_mult:g}x"
        if options.n_shared:
            text += f" +{options.n_shared} shared"
        if options.moe_every > 1:
            text += f" every {options.moe_every}"
        return text
    return options.kind


def plan(
    config_paths: list[str],
    seeds: list[int],
    budget: Budget,
    out: Path,
    overrides: Sequence[str] = (),
    wandb: str = "disabled",
) -> list[list[RunSpec]]:
    """The runs, grouped by config, after checking the configs can be compared."""
    if not config_paths:
        raise CompareError("compare needs at least one config")
    if not seeds:
        raise CompareError("--seeds: needs at least one seed")
    loaded = [(path, load_config(path, list(overrides))) for path in config_paths]
    labels = [Path(path).stem for path, _ in loaded]
    clashes = sorted({x for x in labels if labels.count(x) > 1})
    if clashes:
        raise CompareError(
            f"two configs share the name {clashes[0]!r}: run folders are named after the "
            "config file; rename one"
        )
    first_path, first = loaded[0]
    for path, cfg in loaded[1:]:
        diffs = differences(first.to_dict()["data"], cfg.to_dict()["data"], "data")
        if diffs:
            raise CompareError(
                f"{path} and {first_path} have different data sections ({'; '.join(diffs)}): "
                "every run of a comparison must see the same data and tokenizer; make the "
                "sections equal or override them on the command line"
            )
    groups = []
    for (path, _), label in zip(loaded, labels, strict=True):
        group = []
        for seed in seeds:
            name = f"{label}-s{seed}"
            cfg = load_config(path, list(overrides))
            cfg.train.seed = seed
            cfg.train.max_steps = budget.max_steps(cfg)
            cfg.run.dir = str(out / "runs" / name)
            cfg.run.wandb = wandb
            group.append(RunSpec(name, label, path, seed, cfg))
        groups.append(group)
    return groups


def differences(a: Any, b: Any, path: str) -> list[str]:
    """Dotted keys whose values differ between two nested mappings."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            d
            for k in {**a, **b}
            for d in differences(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        ]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def run_state(spec: RunSpec, budget: Budget) -> Literal["done", "resume", "new"]:
    """What to do with a run's folder; CompareError if it holds someone else's run."""
    folder = spec.dir
    if not folder.is_dir() or not any(folder.iterdir()):
        return "new"
    marker = folder / MARKER
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise CompareError(
            f"{folder} exists and holds no {MARKER}: not a run of this comparison; move it "
            "away or choose another --out"
        ) from None
    expected = spec.marker(budget)
    if recorded != expected:
        what = (
            f"budget {recorded.get('budget')}, not {budget}"
            if recorded.get("budget") != expected["budget"]
            else "; ".join(differences(recorded.get("config"), expected["config"], "")[:3])
        )
        raise CompareError(
            f"{folder} holds a run of another config or budget ({what}); delete it to rerun, "
            "or choose another --out"
        )
    summary = read_json(folder / "summary.json")
    if summary is not None and (
        budget.kind == "minutes" or summary.get("steps") == spec.cfg.train.max_steps
    ):
        return "done"
    if latest_checkpoint(folder / "checkpoints") is not None:
        return "resume"
    return "new"


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


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
    summary = read_json(spec.dir / "summary.json") if status != "failed" else None
    result = RunResult(spec.name, spec.label, spec.seed, str(spec.dir), status, error, curve=curve)
    if records:
        result.steps = records[-1]["step"]
        result.tokens_per_s = statistics.median(r["tokens_per_s"] for r in records)
        result.train_s = times[-1]
    if summary is not None:
        result.steps = summary["steps"]
        result.final_val_bpc = summary["val_bpc"]
        result.final_val_loss = summary["val_loss"]
    bests = [p["val_bpc"] for p in curve] + (
        [result.final_val_bpc] if result.final_val_bpc is not None else []
    )
    result.best_val_bpc = min(bests) if bests else None
    return result


def execute(spec: RunSpec, budget: Budget, log: Callable[[str], None]) -> RunResult:
    """Train (or resume, or reuse) one run; an exception makes a failed result."""
    from leviathan.train.loop import train

    state = run_state(spec, budget)
    if state == "done":
        log(f"{spec.name}: finished earlier, reused")
        return collect(spec, "reused")
    spec.dir.mkdir(parents=True, exist_ok=True)
    (spec.dir / MARKER).write_text(json.dumps(spec.marker(budget), indent=1), encoding="utf-8")
    cfg = copy.deepcopy(spec.cfg)  # train() fills in model.vocab_size
    try:
        if state == "resume":
            step = int(latest_checkpoint(spec.dir / "checkpoints").name.removeprefix("step_"))
            left = None
            if budget.seconds is not None:
                used = cumulative_times([r for r in read_records(spec.dir) if r["step"] <= step])
                left = budget.seconds - (used[-1] if used else 0.0)
            log(f"{spec.name}: resuming from step {step}")
            if left is not None and left <= 0:
                train(cfg, resume=True, stop_at=step, log=log)  # time was up: just finish
            else:
                train(cfg, resume=True, stop_after_s=left, log=log)
        else:
            log(f"{spec.name}: training ({budget})")
            train(cfg, stop_after_s=budget.seconds, log=log)
    except Exception as err:  # a failed run is reported; the others go on
        message = f"{type(err).__name__}: {err}"
        (spec.dir / "error.txt").write_text(traceback.format_exc(), encoding="utf-8")
        log(f"{spec.name}: FAILED: {message}")
        return collect(spec, "failed", message)
    return collect(spec, "resumed" if state == "resume" else "trained")


def compare(
    config_paths: list[str],
    *,
    budget: Budget | str,
    seeds: int | list[int] = 1,
    out: str | Path = "runs/compare",
    overrides: Sequence[str] = (),
    wandb: str = "disabled",
    log: Callable[[str], None] = print,
) -> Comparison:
    """Train every config x seed under one budget on one dataset, then write
    `OUT/results.md`, `OUT/results.json` and the BPC plots. `seeds` is a count (seeds
    0..n-1) or a list. Returns the comparison; its `failed` lists the runs that raised."""
    from leviathan.compare.report import write_report

    budget = parse_budget(budget) if isinstance(budget, str) else budget
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    out = Path(out)
    groups = plan(config_paths, seed_list, budget, out, overrides, wandb)
    for group in groups:  # refuse foreign folders before an hour of training, not after
        for spec in group:
            run_state(spec, budget)
    first = groups[0][0].cfg
    index = prepare(first.data, log=log)
    total = sum(len(g) for g in groups)
    results = []
    done = 0
    for group in groups:
        runs = []
        for spec in group:
            done += 1
            log(f"[{done}/{total}] {spec.name}")
            runs.append(execute(spec, budget, log))
        cfg = copy.deepcopy(group[0].cfg)
        if cfg.model.vocab_size is None:
            cfg.model.vocab_size = index.vocab_size
        try:
            size = model_size(cfg)
        except Exception:  # the runs' errors say why; the table shows no size
            size = None
        results.append(
            ConfigResult(
                group[0].label,
                group[0].config_path,
                describe_mixer(cfg.model.mixer),
                describe_ffn(cfg.model.ffn),
                size,
                runs,
            )
        )
    data = {
        "dir": str(index.dir),
        "vocab_size": index.vocab_size,
        "train_tokens": index.splits["train"]["tokens"],
        "val_tokens": index.splits["val"]["tokens"],
        "val_characters": index.splits["val"]["characters"],
    }
    comparison = Comparison(out, budget, seed_list, data, results)
    write_report(comparison)
    return comparison
