"""Which runs a comparison makes, under which budget, and what each run's folder holds.

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
  latest checkpoint with its own config.yaml, as `train --resume` does (a `minutes` run
  gets the time it has left). A folder that holds a run of another config or budget is
  refused (`CompareError`) before anything runs. A config that gives no `data.inputs`
  is recorded with the inputs of the dataset in `data.dir` (which it trains on as is).
* A run that raises is recorded as failed, with its error; the others go on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from leviathan.config import Config, config_from_dict, differences, load_config
from leviathan.data import recorded_inputs
from leviathan.errors import LeviathanError
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
        config = marked_config(self.cfg)
        config["data"]["inputs"] = recorded_inputs(self.cfg.data)  # not given: the dataset's
        return json.loads(json.dumps({"budget": str(budget), "config": config}))


def marked_config(cfg: Config) -> dict[str, Any]:
    """A config as `compare.json` holds it: every key but MARKER_IGNORES."""
    config = cfg.to_dict()
    for section, keys in MARKER_IGNORES.items():
        for key in keys:
            config[section].pop(key)
    return config


def as_read_now(recorded: dict[str, Any]) -> dict[str, Any]:
    """A marker as this version reads it: keys added since it was written take their
    defaults and moved keys their new place, so a finished run stays reusable when the
    config schema grows (study v2's runs predate `parallel.ep_size`). A marker this version
    cannot read is returned as it is, and so differs."""
    try:
        config = marked_config(config_from_dict(json.loads(json.dumps(recorded["config"]))))
        config["data"]["inputs"] = recorded["config"]["data"]["inputs"]
    except (LeviathanError, KeyError, TypeError, ValueError):
        return recorded
    return json.loads(json.dumps({**recorded, "config": config}))


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
        diffs = described(first.to_dict()["data"], cfg.to_dict()["data"], "data")
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


def described(a: Any, b: Any, path: str) -> list[str]:
    """`key: a's vs b's` for each dotted key whose values differ between two mappings."""
    return [f"{key}: {x!r} vs {y!r}" for key, (x, y) in differences(a, b, path).items()]


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
    recorded = as_read_now(recorded)
    if recorded != expected:
        what = (
            f"budget {recorded.get('budget')}, not {budget}"
            if recorded.get("budget") != expected["budget"]
            else "; ".join(described(recorded.get("config"), expected["config"], "")[:3])
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
