"""The one training loop. `Trainer` builds, restores, steps, evaluates, checkpoints and
finishes; it asks an engine to take steps and never knows which engine.

Every step's batch and learning rate are pure functions of (seed, step), and the torch
RNG state travels in the checkpoint (`checkpoint_state`), so a resumed run takes exactly
the steps the uninterrupted run would have taken.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from leviathan.config import Config, ModelConfig, save_config
from leviathan.data import DataIndex, get_batch, load_tokens, prepare
from leviathan.data.shards import HELDOUT, TOKENIZER_FILE, opening_line, record_dataset
from leviathan.errors import CheckpointError, ConfigError, Interrupted, TrainingError
from leviathan.parallel.engines import ENGINES
from leviathan.parallel.host import configure_host
from leviathan.parallel.layout import lay_out
from leviathan.parallel.world import World, init_world, on_rank0
from leviathan.train import mfu
from leviathan.train.checkpoint import checkpoint_step, latest_checkpoint, quiet, save_checkpoint
from leviathan.train.checkpoint_state import TrainingState, resume_source
from leviathan.train.ctrl_c import CtrlC
from leviathan.train.evaluate import EvalResult, evaluate, unigram_bpc
from leviathan.train.run_folder import claim_run_dir
from leviathan.train.sample import sample_text
from leviathan.train.schedule import lr_at
from leviathan.train.sinks import Sinks

EVAL_BATCH = 16
OnStep = Callable[[dict], None]
OnCheckpoint = Callable[[Path, dict], None]


@dataclass
class TrainSummary:
    steps: int
    params: int
    parallel: dict  # engine, world_size, zero_stage, ep_size
    val_loss: float | None  # None: no validation split (data.val_fraction=0)
    val_bpc: float | None
    unigram_bpc: float | None
    wall_s: float
    tokens_per_s: float
    sample: str
    heldout_bpc: float | None = None  # the whole held-out documents (data.val_documents)


def train(
    cfg: Config,
    *,
    resume: bool | Path = False,
    resume_from: int | None = None,
    stop_at: int | None = None,
    stop_after_s: float | None = None,
    rebuild: bool = False,
    claimed: bool = False,
    log: Callable[[str], None] = print,
    on_step: OnStep | None = None,
    on_checkpoint: OnCheckpoint | None = None,
) -> TrainSummary:
    """Train `cfg` to `train.max_steps`, evaluating, checkpointing and logging on the way.

    `stop_at` ends the session early after that step, with a checkpoint, as a job with
    a time slot would; `resume=True` later continues it from the run's latest checkpoint
    (`resume_from=STEP` from that step's, `resume=<folder>` from that folder) as if it
    had never stopped, on any number of ranks. `stop_after_s` likewise ends it after the
    first step that finishes that many seconds into this session's training (a
    wall-clock budget; one process only). `rebuild` lets `prepare` replace a dataset of
    other inputs in data.dir. The run folder is locked for the whole call; `claimed`
    says the caller (a Ray driver) holds that lock and has checked the folder.
    Every rank calls this. `on_step(record)` and `on_checkpoint(folder, record)` run on
    every rank, for a scheduler that wants the metrics and checkpoints (Ray).
    """
    if stop_at is not None and stop_at < 1:
        raise ConfigError(f"--stop-at: must be a step >= 1, got {stop_at}")
    world = init_world(cfg)
    configure_host(cfg.train.threads, world.device)
    say = log if world.rank == 0 else quiet
    for warning in config_warnings(cfg, world.engine):
        say(f"warning: {warning}")
    index = prepare(cfg.data, log=say, rebuild=rebuild)  # locked: one rank builds
    model_cfg = model_config_for(cfg, index)
    run_dir = Path(cfg.run.dir)
    resuming = bool(resume) or resume_from is not None
    lock = on_rank0(world, lambda: claim_run_dir(run_dir, index, resuming, claimed))
    try:
        trainer = Trainer(cfg, world, index, model_cfg, log, on_step, on_checkpoint)
        trainer.restore(resume_source(trainer.ckpt_root, resume, resume_from, say))
        return trainer.train(stop_at, stop_after_s)
    finally:
        if lock is not None:
            lock.release()


class Trainer:
    """One rank's run, in a folder `train` has locked and checked."""

    def __init__(
        self,
        cfg: Config,
        world: World,
        index: DataIndex,
        model_cfg: ModelConfig,
        log: Callable[[str], None] = print,
        on_step: OnStep | None = None,
        on_checkpoint: OnCheckpoint | None = None,
    ):
        self.cfg, self.world, self.index, self.log = cfg, world, index, log
        self.on_step, self.on_checkpoint = on_step, on_checkpoint
        self.main = world.rank == 0
        self.say = log if self.main else quiet
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        torch.manual_seed(cfg.train.seed)
        laid = lay_out(cfg, model_cfg, world)
        self.model = laid.model
        self.engine = ENGINES[world.engine](self.model, cfg, world)
        self.state = TrainingState(self.engine, cfg)
        t = cfg.train
        self.global_batch = t.micro_batch_size * t.grad_accum * self.engine.world_size
        self.parallel = {
            "engine": world.engine,
            "world_size": world.world_size,
            "zero_stage": self.engine.zero_stage,
            "ep_size": cfg.parallel.ep_size,
        }
        self.flops_per_token = laid.whole.flops_per_token(cfg.train.seq_len)
        self.n_params = laid.whole.num_params()
        self.peak = mfu.peak_flops(world.device, cfg.train.precision, cfg.train.peak_flops)
        self.say(self.model_line(laid.whole.active_params(), laid.compiled))
        self.parallel["local_params"] = self.engine.local_param_numel()  # ZeRO-3: ~1/world
        self.step = 0

    def model_line(self, n_active: int, compiled: bool) -> str:
        m = self.cfg.model
        return (
            f"model: {self.n_params:,} parameters ({n_active:,} active), "
            f"{self.flops_per_token / 1e6:.1f} MFLOPs/token forward, "
            f"mixer {m.mixer.kind}, ffn {m.ffn.kind}; "
            + ", ".join(f"{k} {v}" for k, v in self.parallel.items() if v is not None)
            + f"; compiled {compiled}"
        )

    def restore(self, source: Path | None) -> None:
        """Continue from checkpoint folder `source` (None: a fresh run from step 0)."""
        if source is not None:
            self.step = self.state.restore(source, self.say)

    def train(self, stop_at: int | None = None, stop_after_s: float | None = None) -> TrainSummary:
        """Steps from the restored one to `train.max_steps` (or `stop_at`), then `finish`."""
        end = self.end_step(stop_at, stop_after_s)
        self.start_files()
        sinks = Sinks(
            self.cfg,
            self.step,
            self.parallel,
            routed=bool(self.model.sparse_layers()),
            enabled=self.main,
            log=self.log,
        )
        start, started = self.step, time.perf_counter()
        with CtrlC(enabled=self.engine.world_size == 1) as ctrl_c, contextlib.closing(sinks):
            for step in range(start, end):
                record = self.train_step(step, started)
                self.evaluate_if_due(record, sinks)
                sinks.log(record)
                if self.on_step:
                    self.on_step(record)
                elapsed = time.perf_counter() - started
                out_of_time = stop_after_s is not None and elapsed >= stop_after_s
                interrupted = ctrl_c.requested  # read once: a signal may land at any line
                if self.checkpoint_due(step + 1, end) or out_of_time or interrupted:
                    folder = self.checkpoint(record)
                if interrupted:
                    raise Interrupted(
                        f"interrupted after step {step + 1}: checkpoint {folder} written; "
                        "continue the run with --resume"
                    )
                if out_of_time:
                    end = step + 1
                    break
        return self.finish(sinks, end, time.perf_counter() - started, end - start)

    def end_step(self, stop_at: int | None, stop_after_s: float | None) -> int:
        if stop_at is not None and stop_at < self.step:
            raise ConfigError(f"--stop-at {stop_at}: the run is already at step {self.step}")
        if stop_after_s is not None and self.engine.world_size > 1:
            raise ConfigError("stop_after_s: ranks' clocks would disagree; use one process")
        return min(stop_at or self.cfg.train.max_steps, self.cfg.train.max_steps)

    def start_files(self) -> None:
        """The run's config, tokenizer and dataset record in run.dir (rank 0), and the
        token streams this rank reads."""
        index = self.index
        if self.main:
            save_config(self.cfg, self.run_dir / "config.yaml")
            shutil.copyfile(index.tokenizer_path, self.run_dir / TOKENIZER_FILE)
            record_dataset(self.run_dir, index)
        self.train_tokens = load_tokens(index.dir, "train")
        self.val_tokens = load_tokens(index.dir, "val")
        self.val_chars = index.splits["val"]["characters"]
        self.has_val = len(self.val_tokens) > 1  # data.val_fraction=0 leaves none to score

    def train_step(self, step: int, started: float) -> dict[str, Any]:
        """One optimizer step on the step's batch; its record."""
        t, engine = self.cfg.train, self.engine
        tick = time.perf_counter()
        lr = lr_at(step, t.lr, t.min_lr, t.warmup_steps, t.max_steps)
        x, y = get_batch(
            self.train_tokens,
            t.seq_len,
            self.global_batch,
            t.seed,
            step,
            engine.rank,
            engine.world_size,
        )
        micro = list(zip(x.split(t.micro_batch_size), y.split(t.micro_batch_size), strict=True))
        result = engine.train_step(micro, lr)
        if not math.isfinite(result.loss):
            raise diverged(result.loss, step + 1, lr, t.lr, self.ckpt_root)
        record = {
            "step": step + 1,
            "train_loss": result.loss,
            "lr": lr,
            "grad_norm": result.grad_norm,
            "tokens_per_s": self.global_batch * t.seq_len / (time.perf_counter() - tick),
            "elapsed_s": time.perf_counter() - started,
        }
        record.update(
            mfu.throughput(
                record["tokens_per_s"], self.flops_per_token, self.peak, engine.world_size
            )
        )
        routing = self.model.pop_layer_metrics()
        if routing:
            record.update(aux_loss=result.aux_loss, moe=routing)
        return record

    def evaluate_if_due(self, record: dict[str, Any], sinks: Sinks) -> None:
        """Every `train.eval_interval` steps and at the last: val loss on a prefix of the
        split (`train.eval_tokens`), an estimate unless the prefix is the whole split."""
        t, done = self.cfg.train, record["step"]
        if not self.has_val or (done % t.eval_interval and done != t.max_steps):
            return
        ev = self.score(self.val_tokens, self.val_chars, max_tokens=t.eval_tokens or None)
        record.update(val_loss=ev.loss, val_bpc=ev.bpc)
        sinks.write(
            f"step {done}: train loss {record['train_loss']:.4f}, "
            f"val loss {ev.loss:.4f}, val BPC {ev.bpc:.4f}" + ("" if ev.exact else " (estimate)")
        )

    def score(self, tokens: Any, characters: int, max_tokens: int | None = None) -> EvalResult:
        t = self.cfg.train
        return evaluate(
            self.model, tokens, t.seq_len, EVAL_BATCH, characters, max_tokens, t.precision
        )

    def checkpoint_due(self, done: int, end: int) -> bool:
        return done % self.cfg.train.ckpt_interval == 0 or done == end

    def checkpoint(self, record: dict[str, Any]) -> Path:
        """Every rank writes its state into one step folder; rank 0 seals it."""
        done, engine = record["step"], self.engine
        write = functools.partial(self.state.write, done)
        keep = self.cfg.train.keep_last
        folder = save_checkpoint(self.ckpt_root, done, write, keep, engine.rank, engine.barrier)
        if self.on_checkpoint:
            self.on_checkpoint(folder, record)
        return folder

    def finish(self, sinks: Sinks, end: int, wall: float, steps_run: int) -> TrainSummary:
        """The exact final scores (val, unigram baseline, held-out), the sample, the plots
        and summary.json."""
        t, index = self.cfg.train, self.index
        final = self.score(self.val_tokens, self.val_chars) if self.has_val else None
        baseline = (
            unigram_bpc(self.train_tokens, self.val_tokens, index.vocab_size, self.val_chars)
            if self.has_val
            else None
        )
        heldout = (
            self.score(load_tokens(index.dir, HELDOUT), index.splits[HELDOUT]["characters"])
            if HELDOUT in index.splits
            else None
        )
        # every rank samples: under ZeRO-3 each forward gathers parameters from all of them
        run = self.cfg.run
        prompt = opening_line(index) if run.sample_prompt is None else run.sample_prompt
        sample = sample_text(self.model, index.tokenizer(), prompt, run.sample_tokens, seed=t.seed)
        if self.main:
            (self.run_dir / "sample.txt").write_text(sample + "\n", encoding="utf-8")
        sinks.finish(end, final and final.bpc, baseline, heldout and heldout.bpc, sample)
        tokens_per_step = self.global_batch * t.seq_len
        summary = TrainSummary(
            steps=end,
            params=self.n_params,
            parallel=self.parallel,
            val_loss=final.loss if final else None,
            val_bpc=final.bpc if final else None,
            unigram_bpc=baseline,
            wall_s=wall,
            tokens_per_s=steps_run * tokens_per_step / wall if steps_run else 0.0,
            sample=sample,
            heldout_bpc=heldout.bpc if heldout else None,
        )
        if self.main:
            (self.run_dir / "summary.json").write_text(
                json.dumps(summary.__dict__, indent=1), encoding="utf-8"
            )
        return summary


def model_config_for(cfg: Config, index: DataIndex) -> ModelConfig:
    """The model config with the vocabulary the tokenizer actually has."""
    if cfg.model.vocab_size is not None and cfg.model.vocab_size != index.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} differs from the tokenizer in "
            f"{index.dir} ({index.vocab_size} pieces); remove the key or match it"
        )
    cfg.model.vocab_size = index.vocab_size
    return cfg.model


def config_warnings(cfg: Config, engine: str) -> list[str]:
    """Settings that run, but not as their author probably meant."""
    t = cfg.train
    warnings = []
    if t.warmup_steps >= t.max_steps:
        warnings.append(
            f"train.warmup_steps ({t.warmup_steps}) >= train.max_steps ({t.max_steps}): the "
            "learning rate is still warming up when the run ends and never decays"
        )
    if t.precision == "fp16" and engine == "torch":
        warnings.append(
            "train.precision: fp16 on the plain torch engine runs bf16 autocast (fp16 needs "
            "DeepSpeed's loss scaling: parallel.engine=deepspeed or a distributed launcher)"
        )
    return warnings


def diverged(loss: float, step: int, lr: float, peak_lr: float, root: Path) -> TrainingError:
    """The error of a non-finite loss: where, at which LR, and the checkpoint that is kept."""
    try:
        kept = latest_checkpoint(root)
    except CheckpointError:
        kept = None
    where = (
        f"its last checkpoint {kept} is kept: lower train.lr and continue with --resume "
        f"(or --resume-from {checkpoint_step(kept)})"
        if kept
        else "no checkpoint was written yet: lower train.lr and start again"
    )
    return TrainingError(
        f"train loss is {loss} at step {step}: the run diverged (lr {lr:.3g} at that step, "
        f"train.lr={peak_lr}); {where}"
    )
