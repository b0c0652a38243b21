"""Typed run configuration: YAML -> dataclasses, validated before any work starts.

Every error names the dotted key path and what was expected, so a typo in a YAML file or
a command-line override fails in milliseconds instead of an hour into a run.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from leviathan.errors import ConfigError
from leviathan.model.config import ModelConfig
from leviathan.model.ffn import FFNS
from leviathan.model.mixers import MIXERS
from moe import MoEOptions

PACKAGED_CONFIGS = Path(__file__).parent / "configs"
DEFAULT_CONFIG = "configs/tiny.yaml"
RUN_CONFIG = "config.yaml"  # a run folder's own config, as it last trained
# the keys of the data section a resumed run may change: where its dataset lies, how it is read
RESUME_MAY_CHANGE = ("data.dir", "data.workers", "data.batch_chars")


@dataclass
class TokenizerConfig:
    kind: Literal["bpe", "unigram"] = "bpe"
    vocab_size: int = 4096
    model: str | None = None  # an existing SentencePiece model to reuse instead of training
    # the tokenizer trains on a seeded sample of at most this many characters of training
    # text (4096-character chunks); a smaller training text (the bundled corpus) whole
    sample_chars: int = 10_000_000


@dataclass
class DataConfig:
    # None (not given): the dataset in `dir` as it was prepared, or the bundled corpus when
    # `dir` holds none; [] (given empty): the bundled Shakespeare corpus
    inputs: list[str] | None = None
    dir: str = "data/shakespeare"
    val_fraction: float = 0.05
    # whole documents held out in their own split, `heldout` (never trained on, nor seen by
    # the tokenizer): a count N (N documents spread evenly over the corpus) or a list of
    # names, basenames or globs of them; 0 = none
    val_documents: int | list[str] = 0
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    text_field: str = "text"  # the JSONL field / Parquet column holding the text
    workers: int = 0  # encoding processes of `prepare`; 0 = every core
    batch_chars: int = 4_000_000  # characters per encoding batch: bounds prepare's memory
    shard_tokens: int = 100_000_000  # tokens per shard file (whole documents per shard)


@dataclass
class TrainConfig:
    seed: int = 1337
    seq_len: int = 256
    micro_batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    eval_interval: int = 100
    eval_tokens: int = 65536  # val tokens scored at each periodic eval; 0 = the whole split
    ckpt_interval: int = 250
    keep_last: int = 2
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    device: str = "auto"  # auto (cuda when available), cpu, cuda, cuda:1, ...
    # bf16: autocast (torch) or bf16 weights with fp32 masters (DeepSpeed); fp16: DeepSpeed
    # only, with dynamic loss scaling
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    peak_flops: float | None = None  # FLOP/s of one device for MFU; None: train/mfu.py's table
    # progress on rank 0: auto draws the bar when stderr is a terminal, else plain lines
    progress: Literal["auto", "bar", "lines"] = "auto"
    log_interval: int = 50  # steps between plain progress lines (first and last always)
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    # torch.compile the blocks at train.seq_len (MoE FFNs stay eager); auto: on CUDA, and on
    # CPU for the correlation mixers in runs long enough to pay back (train/compiled.py)
    compile: bool | Literal["auto"] = "auto"


@dataclass
class ParallelConfig:
    # auto: DeepSpeed when started by a distributed launcher (WORLD_SIZE set), else torch
    engine: Literal["auto", "torch", "deepspeed"] = "auto"
    zero_stage: int = 0  # DeepSpeed ZeRO stage: 0 none, 1 optimizer, 2 +gradients, 3 +params
    ep_size: int = 1  # expert parallelism: each MoE layer's experts split over this many ranks
    deepspeed: Any = field(default_factory=dict)  # extra DeepSpeed JSON, merged over the derived


@dataclass
class RunConfig:
    dir: str = "runs/tiny"  # load_config fills a missing one in (default_run_dir)
    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"
    wandb_project: str = "leviathan"
    sample_prompt: str | None = None  # None: the first line of the dataset's validation text
    sample_tokens: int = 200


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


REGISTRIES = {"model.mixer": MIXERS, "model.ffn": FFNS}


class YamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads `3e-4` as a float (YAML 1.1 wants `3.0e-4`)."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML file, apply `a.b.c=value` overrides, parse and validate."""
    return config_from_dict(asked_config(path, overrides))


def asked_config(path: str | Path | None, overrides: Sequence[str]) -> dict[str, Any]:
    """The mapping `load_config` parses: the file with the overrides applied, and run.dir,
    when neither names it, `default_run_dir`'s."""
    path = resolve_config_path(path or DEFAULT_CONFIG)
    raw = read_yaml(path)
    own_data_dir = section(raw, "data").get("dir", DataConfig.dir)
    for item in overrides:
        apply_override(raw, item)
    run = raw.setdefault("run", {})
    if isinstance(run, dict) and "dir" not in run:
        data_dir = section(raw, "data").get("dir", DataConfig.dir)
        run["dir"] = default_run_dir(path.stem, own_data_dir, data_dir)
    return raw


def section(raw: dict[str, Any], name: str) -> dict[str, Any]:
    """`raw[name]` when it is a mapping, else {} (parsing names what is wrong with it)."""
    value = raw.get(name)
    return value if isinstance(value, dict) else {}


def default_run_dir(config_name: str, own_data_dir: Any, data_dir: Any) -> str:
    """`runs/<config name>`, or `runs/<config name>-<data folder name>` when data.dir is
    not the config file's own: a run on another dataset never lands in (and is refused
    by) the folder of the config's usual run."""
    if os.path.normpath(str(data_dir)) == os.path.normpath(str(own_data_dir)):
        return f"runs/{config_name}"
    return f"runs/{config_name}-{Path(os.path.abspath(os.path.expanduser(str(data_dir)))).name}"


def asked_run_dir(path: str | Path | None, overrides: Sequence[str]) -> Path:
    """The run folder `load_config(path, overrides)` names, found without parsing the rest
    (the overrides of a resumed run may suit only that run's own config)."""
    run = asked_config(path, overrides)["run"]
    if not isinstance(run, dict) or not isinstance(run.get("dir"), str):
        return Path(load_config(path, overrides).run.dir)  # raises the error naming the key
    return Path(run["dir"])


def resume_config(run_dir: Path, overrides: Sequence[str] = ()) -> Config:
    """The run's own config (`run_dir/config.yaml`) with `overrides` applied and run.dir
    `run_dir`. A resumed run keeps its model and data, so an override that changes a
    model.* or data.* key (other than RESUME_MAY_CHANGE) is refused, naming the key."""
    path = run_dir / RUN_CONFIG
    if not path.is_file():
        why = f"no {RUN_CONFIG} in it" if run_dir.is_dir() else "the folder does not exist"
        raise ConfigError(f"run.dir {run_dir}: no run to resume ({why}); start it without --resume")
    saved = read_yaml(path)
    raw = copy.deepcopy(saved)
    for item in overrides:
        apply_override(raw, item)
    run = raw.setdefault("run", {})
    if not isinstance(run, dict):
        raise ConfigError(f"{path}: run: expected a mapping, got {run!r}")
    run["dir"] = str(run_dir)
    try:
        before = config_from_dict(saved).to_dict()
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    cfg = config_from_dict(raw)
    after = cfg.to_dict()
    for name in ("model", "data"):
        for key, (old, new) in differences(before[name], after[name], name).items():
            if key not in RESUME_MAY_CHANGE:
                raise ConfigError(
                    f"{key}: {new!r}, but the run in {run_dir} has {old!r} ({path}); a resumed "
                    "run keeps its model and data: start a new run.dir to change them"
                )
    if cfg.data.inputs is None and not Path(cfg.data.dir).expanduser().is_dir():
        raise ConfigError(
            f"data.dir: {cfg.data.dir}, the run's dataset ({path}), is not a folder from "
            f"{Path.cwd()}: resume where the run started, or give data.dir=<its folder>"
        )
    return cfg


def differences(a: Any, b: Any, path: str = "") -> dict[str, tuple[Any, Any]]:
    """The dotted keys whose values differ between two nested mappings: key -> (a's, b's)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {
            key: pair
            for name in {**a, **b}
            for key, pair in differences(a.get(name), b.get(name), join(path, str(name))).items()
        }
    return {} if a == b else {path: (a, b)}


def config_from_dict(raw: dict[str, Any]) -> Config:
    cfg = parse(Config, translate_moved_keys(raw), "")
    validate(cfg)
    check_layout(cfg)
    derive(cfg)
    return cfg


def translate_moved_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """A config (or a checkpoint's) written before `parallel.ep_size` existed carries it as
    `model.ffn.ep_size`: how experts are split over ranks is a layout, not the model, so it
    is read as `parallel.ep_size` (both given and different: refused)."""
    ffn = raw.get("model", {}).get("ffn") if isinstance(raw.get("model"), dict) else None
    if not isinstance(ffn, dict) or "ep_size" not in ffn:
        return raw
    ep_size = ffn["ep_size"]
    parallel = raw.get("parallel") if isinstance(raw.get("parallel"), dict) else {}
    if parallel.get("ep_size", ep_size) != ep_size:
        raise ConfigError(
            f"parallel.ep_size: {parallel['ep_size']} differs from model.ffn.ep_size: "
            f"{ep_size} (the key's old place); set parallel.ep_size only"
        )
    model = raw["model"] | {"ffn": {k: v for k, v in ffn.items() if k != "ep_size"}}
    return raw | {"model": model, "parallel": parallel | {"ep_size": ep_size}}


def check_layout(cfg: Config) -> None:
    """`parallel.ep_size` splits the experts of a MoE FFN: at least 1 and a divisor of
    `model.ffn.n_experts` (that it also divides the world size is checked at launch)."""
    ep_size, ffn = cfg.parallel.ep_size, cfg.model.ffn
    if ep_size < 1:
        raise ConfigError(f"parallel.ep_size: must be >= 1, got {ep_size}")
    if ep_size > 1 and not isinstance(ffn, MoEOptions):
        raise ConfigError(
            f"parallel.ep_size: {ep_size} splits experts over ranks, but model.ffn is "
            f"{ffn.kind} (no experts); use ep_size 1"
        )
    if ep_size > 1 and ffn.n_experts % ep_size:
        raise ConfigError(
            f"parallel.ep_size: {ep_size} does not divide model.ffn.n_experts={ffn.n_experts}"
        )


def derive(cfg: Config) -> None:
    """Fill the keys other keys decide: a capacity-mode MoE sizes its expert slots per
    sequence of train.seq_len tokens (so eval and generation drop what training did)."""
    ffn = cfg.model.ffn
    if isinstance(ffn, MoEOptions) and ffn.capacity_factor is not None:
        if ffn.capacity_seq_len is None:
            ffn.capacity_seq_len = cfg.train.seq_len


def resolve_config_path(path: str | Path) -> Path:
    """A path as given, else the copy shipped inside the package (for a pip-installed user)."""
    path = Path(path)
    if path.is_file():
        return path
    packaged = PACKAGED_CONFIGS / path.name
    if path.parent.name == "configs" and packaged.is_file():
        return packaged
    raise ConfigError(f"config file not found: {path}")


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=YamlLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at top level, got {type(raw).__name__}")
    return raw


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `model.n_layer=4` in the raw mapping; the value is parsed as YAML (4, 1e-3, [a, b])."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. model.n_layer=4")
    *parents, leaf = key.split(".")
    node = raw
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            if isinstance(child, str) and ".".join(parents[: i + 1]) in REGISTRIES:
                child = node[part] = {"kind": child}  # `ffn: moe` shorthand, then ffn.top_k=2
            else:
                raise ConfigError(
                    f"override {item!r}: {'.'.join(parents[: i + 1])} is not a section"
                )
        node = child
    node[leaf] = yaml.load(text, Loader=YamlLoader) if text else ""


def parse(cls: type, raw: Any, path: str) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    where = path or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__} {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = join(path, str(unknown[0]))
        raise ConfigError(f"{key}: unknown key; expected one of {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        key = join(path, name)
        values[name] = (
            parse_registry_entry(key, value)
            if key in REGISTRIES
            else coerce(hints[name], value, key)
        )
    return cls(**values)


def parse_registry_entry(key: str, value: Any) -> Any:
    """`mixer: token_xcorr` or `mixer: {kind: token_xcorr, rank: 2}` -> that kind's options."""
    registry = REGISTRIES[key]
    if isinstance(value, str):
        value = {"kind": value}
    if not isinstance(value, dict) or "kind" not in value:
        raise ConfigError(f"{key}: expected a kind name or a mapping with `kind`, got {value!r}")
    kind = value["kind"]
    if kind not in registry:
        raise ConfigError(f"{key}.kind: unknown {kind!r}; expected one of {', '.join(registry)}")
    return parse(registry[kind].Options, value, key)


def coerce(hint: Any, value: Any, key: str) -> Any:
    """Check `value` against a type hint; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return parse(hint, value, key)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return coerce(option, value, key)
            except ConfigError:
                continue
        raise type_error(key, hint, value)
    if origin is Literal:
        if value not in typing.get_args(hint):
            choices = ", ".join(repr(c) for c in typing.get_args(hint))
            raise ConfigError(f"{key}: expected one of {choices}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise type_error(key, hint, value)
        (item,) = typing.get_args(hint)
        return [coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is Any:
        return value
    if hint is type(None):
        if value is not None:
            raise type_error(key, hint, value)
        return None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise type_error(key, hint, value)
    return value


def type_error(key: str, hint: Any, value: Any) -> ConfigError:
    name = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
    return ConfigError(f"{key}: expected {name}, got {type(value).__name__} {value!r}")


def join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def validate(cfg: Config) -> None:
    """Semantic checks: shapes that cannot be built and values that cannot train."""
    m, t = cfg.model, cfg.train
    check_finite(cfg.to_dict(), "")
    if not cfg.run.dir.strip():
        raise ConfigError("run.dir: empty; name a folder (an empty path is the current one)")
    check_data(cfg.data)
    positive = {
        "model.n_layer": m.n_layer,
        "model.n_head": m.n_head,
        "model.d_model": m.d_model,
        "model.block_size": m.block_size,
        "train.seq_len": t.seq_len,
        "train.micro_batch_size": t.micro_batch_size,
        "train.grad_accum": t.grad_accum,
        "train.max_steps": t.max_steps,
        "train.eval_interval": t.eval_interval,
        "train.ckpt_interval": t.ckpt_interval,
        "train.log_interval": t.log_interval,
        "train.keep_last": t.keep_last,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
    non_negative = {
        "train.lr": t.lr,
        "train.min_lr": t.min_lr,
        "train.warmup_steps": t.warmup_steps,
        "train.weight_decay": t.weight_decay,
        "train.grad_clip": t.grad_clip,
        "train.eval_tokens": t.eval_tokens,
        "train.threads": t.threads,
        "run.sample_tokens": cfg.run.sample_tokens,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key}: must be >= 0, got {value}")
    if t.lr == 0:
        raise ConfigError("train.lr: must be positive, got 0")
    if t.peak_flops is not None and t.peak_flops <= 0:
        raise ConfigError(f"train.peak_flops: must be positive, got {t.peak_flops}")
    if t.min_lr > t.lr:
        raise ConfigError(f"train.min_lr: must be <= train.lr ({t.lr}), got {t.min_lr}")
    for key, value in {"train.beta1": t.beta1, "train.beta2": t.beta2}.items():
        if not 0 <= value < 1:
            raise ConfigError(f"{key}: must be in [0, 1), got {value}")
    if not 0 <= m.dropout < 1:
        raise ConfigError(f"model.dropout: must be in [0, 1), got {m.dropout}")
    if m.d_model % m.n_head:
        raise ConfigError(f"model.d_model: {m.d_model} is not divisible by model.n_head={m.n_head}")
    if t.seq_len > m.block_size:
        raise ConfigError(
            f"train.seq_len: {t.seq_len} is longer than the model's positions "
            f"(model.block_size={m.block_size})"
        )
    if m.vocab_size is not None and m.vocab_size <= 0:
        raise ConfigError(f"model.vocab_size: must be positive, got {m.vocab_size}")
    p = cfg.parallel
    if p.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage: must be 0, 1, 2 or 3, got {p.zero_stage}")
    if not isinstance(p.deepspeed, dict):
        raise ConfigError(
            f"parallel.deepspeed: expected a mapping of DeepSpeed keys, got {p.deepspeed!r}"
        )
    if t.precision == "fp16" and p.engine == "torch":
        raise ConfigError(
            "train.precision: fp16 needs DeepSpeed's loss scaling (parallel.engine=deepspeed); "
            "the torch engine supports fp32 and bf16"
        )
    MIXERS[m.mixer.kind].check(m.mixer, m.d_model, m.n_head)
    MIXERS[m.mixer.kind].check_model(m.mixer, m.n_layer, m.block_size)
    if m.positions == "rope":
        MIXERS[m.mixer.kind].check_rope(m.d_model, m.n_head)
    FFNS[m.ffn.kind].check(m.ffn, m.d_model)


def check_data(d: DataConfig) -> None:
    """The one check of the data section, each refusal naming its `data.<key>`: made when a
    config loads and again by `prepare`, which may be handed a DataConfig built in code."""
    if not d.dir.strip():
        raise ConfigError("data.dir: empty; name a folder (an empty path is the current one)")
    folder = os.path.abspath(os.path.expanduser(d.dir))
    if os.path.dirname(folder) == folder:
        raise ConfigError(f"data.dir: {d.dir!r} cannot hold a dataset; name a folder")
    positive = {
        "data.tokenizer.vocab_size": d.tokenizer.vocab_size,
        "data.tokenizer.sample_chars": d.tokenizer.sample_chars,
        "data.batch_chars": d.batch_chars,
        "data.shard_tokens": d.shard_tokens,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
    if d.workers < 0:
        raise ConfigError(f"data.workers: must be >= 0, got {d.workers}")
    if not 0 <= d.val_fraction < 1:
        raise ConfigError(
            f"data.val_fraction: must be in [0, 1) (0: no validation split), got {d.val_fraction}"
        )
    if isinstance(d.val_documents, int) and d.val_documents < 0:
        raise ConfigError(f"data.val_documents: must be >= 0 or a list, got {d.val_documents}")
    if isinstance(d.val_documents, list) and not all(d.val_documents):
        raise ConfigError(f"data.val_documents: empty name in {d.val_documents}")


def check_finite(node: Any, path: str) -> None:
    """No float key means anything at nan or inf (train.lr=.nan would train on garbage);
    the DeepSpeed pass-through is DeepSpeed's to check."""
    if isinstance(node, dict) and path != "parallel.deepspeed":
        for name, value in node.items():
            check_finite(value, join(path, str(name)))
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{path}: must be a finite number, got {node}")


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
