"""The one training loop. It asks an engine to take steps; it never knows which engine.

Every step's batch and learning rate are pure functions of (seed, step), and the torch
RNG state travels in the checkpoint, so a resumed run takes exactly the steps the
uninterrupted run would have taken.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from leviathan.config import Config, ModelConfig, save_config
from leviathan.data import DataIndex, get_batch, load_tokens, prepare
from leviathan.data.shards import HELDOUT, TOKENIZER_FILE, record_dataset
from leviathan.errors import (
    CheckpointError,
    ConfigError,
    Interrupted,
    LeviathanError,
    TrainingError,
)
from leviathan.parallel.activation_checkpointing import apply_activation_checkpointing
from leviathan.parallel.deepspeed.zero3 import build_model, full_size
from leviathan.parallel.engines import ENGINES
from leviathan.parallel.step import Engine
from leviathan.parallel.torch_compile import apply_compile, resolve_compile
from leviathan.parallel.world import World, ep_size_of, init_world
from leviathan.storage import read_records
from leviathan.train import mfu
from leviathan.train.checkpoint import (
    checkpoint_at,
    checkpoint_step,
    latest_checkpoint,
    offer_previous,
    quiet,
    save_checkpoint,
    verify_checkpoint,
)
from leviathan.train.evaluate import evaluate, unigram_bpc
from leviathan.train.metrics import MetricsLog, WandbRun
from leviathan.train.plots import plot_curves, plot_expert_load
from leviathan.train.progress import Progress
from leviathan.train.run_folder import METRICS_FILE, RunLock, check_fresh, usable_run_dir
from leviathan.train.sample import sample_text
from leviathan.train.schedule import lr_at

EVAL_BATCH = 16
T = TypeVar("T")


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


def model_config_for(cfg: Config, index: DataIndex):
    """The model config with the vocabulary the tokenizer actually has."""
    if cfg.model.vocab_size is not None and cfg.model.vocab_size != index.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} differs from the tokenizer in "
            f"{index.dir} ({index.vocab_size} pieces); remove the key or match it"
        )
    cfg.model.vocab_size = index.vocab_size
    return cfg.model


def train(
    cfg: Config,
    *,
    resume: bool | Path = False,
    resume_from: int | None = None,
    stop_at: int | None = None,
    stop_after_s: float | None = None,
    rebuild: bool = False,
    claimed: bool = False,
    log=print,
    on_step: Callable[[dict], None] | None = None,
    on_checkpoint: Callable[[Path, dict], None] | None = None,
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
    t = cfg.train
    if stop_at is not None and stop_at < 1:
        raise ConfigError(f"--stop-at: must be a step >= 1, got {stop_at}")
    if t.threads:
        torch.set_num_threads(t.threads)
    world = init_world(cfg)
    say = log if world.rank == 0 else quiet
    for warning in config_warnings(cfg, world.engine):
        say(f"warning: {warning}")
    index = prepare(cfg.data, log=say, rebuild=rebuild)  # locked: one rank builds
    model_cfg = model_config_for(cfg, index)
    run_dir = Path(cfg.run.dir)
    resuming = bool(resume) or resume_from is not None
    lock = on_rank0(world, lambda: claim_run_dir(run_dir, index, resuming, claimed))
    try:
        return run_training(
            cfg,
            world,
            index,
            model_cfg,
            resume_source(run_dir / "checkpoints", resume, resume_from, say),
            stop_at,
            stop_after_s,
            log,
            on_step,
            on_checkpoint,
        )
    finally:
        if lock is not None:
            lock.release()


def claim_run_dir(run_dir: Path, index: DataIndex, resuming: bool, claimed: bool) -> RunLock | None:
    """Lock the run folder (unless the caller holds it) and check it suits the run."""
    usable_run_dir(run_dir)
    lock = None if claimed else RunLock(run_dir)
    try:
        if resuming:
            check_same_tokenizer(run_dir, index)
        elif not claimed:
            check_fresh(run_dir)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock


def on_rank0(world: World, action: Callable[[], T]) -> T | None:
    """Run `action` on rank 0 alone; what it raises is raised on every rank (the others
    would otherwise wait for rank 0 in their next collective forever)."""
    result, failure = None, None
    if world.rank == 0:
        try:
            result = action()
        except Exception as err:  # any failure: the other ranks must not wait for rank 0
            failure = err
    if world.world_size > 1:
        import torch.distributed as dist

        box = [None if failure is None else (type(failure), str(failure))]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None and failure is None:
            kind, message = box[0]
            failure = (
                kind(message)
                if issubclass(kind, LeviathanError)
                else RuntimeError(f"rank 0: {kind.__name__}: {message}")
            )
    if failure is not None:
        raise failure
    return result


def resume_source(
    root: Path, resume: bool | Path, resume_from: int | None, log: Callable[[str], None]
) -> Path | None:
    """The checkpoint folder a run continues from, or None for a fresh run."""
    if resume_from is not None:
        return checkpoint_at(root, resume_from)
    if isinstance(resume, Path):
        return resume
    if not resume:
        return None
    source = latest_checkpoint(root, log)
    if source is None:
        raise CheckpointError(f"--resume: no checkpoint in {root}")
    return source


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


def run_training(
    cfg: Config,
    world: World,
    index: DataIndex,
    model_cfg: ModelConfig,
    source: Path | None,
    stop_at: int | None,
    stop_after_s: float | None,
    log: Callable[[str], None],
    on_step: Callable[[dict], None] | None,
    on_checkpoint: Callable[[Path, dict], None] | None,
) -> TrainSummary:
    """The run itself, in a folder `train` has locked and checked."""
    t = cfg.train
    main = world.rank == 0
    say = log if main else quiet
    torch.manual_seed(t.seed)
    model = build_model(cfg, model_cfg, world)
    whole = full_size(model)  # ZeRO-3 built it in shards: count on a twin without memory
    run_tokens = t.max_steps * t.grad_accum * t.micro_batch_size * t.seq_len
    run_flops = 3 * whole.flops_per_token(t.seq_len) * run_tokens
    compiled = resolve_compile(t.compile, world.device, model_cfg.mixer.kind, run_flops)
    if compiled:
        apply_compile(model, t.seq_len)
    if t.activation_checkpointing:
        apply_activation_checkpointing(model)
    n_params = whole.num_params()
    n_active = whole.active_params()
    flops_per_token = whole.flops_per_token(t.seq_len)
    engine = ENGINES[world.engine](model, cfg, world)
    parallel = {
        "engine": world.engine,
        "world_size": world.world_size,
        "zero_stage": engine.zero_stage,
        "ep_size": ep_size_of(cfg),
    }
    say(
        f"model: {n_params:,} parameters ({n_active:,} active), "
        f"{flops_per_token / 1e6:.1f} MFLOPs/token forward, "
        f"mixer {model_cfg.mixer.kind}, ffn {model_cfg.ffn.kind}; "
        + ", ".join(f"{k} {v}" for k, v in parallel.items() if v is not None)  # torch: no ZeRO
        + f"; compiled {compiled}"
    )
    parallel["local_params"] = engine.local_param_numel()  # this rank's; ZeRO-3: ~1/world

    run_dir = Path(cfg.run.dir)
    ckpt_root = run_dir / "checkpoints"
    start_step = 0 if source is None else restore(engine, cfg, source, say)
    if stop_at is not None and stop_at < start_step:
        raise ConfigError(f"--stop-at {stop_at}: the run is already at step {start_step}")
    if stop_after_s is not None and engine.world_size > 1:
        raise ConfigError("stop_after_s: ranks' clocks would disagree; use one process")
    peak = mfu.peak_flops(world.device, t.precision, t.peak_flops)
    if main:
        save_config(cfg, run_dir / "config.yaml")
        shutil.copyfile(index.tokenizer_path, run_dir / TOKENIZER_FILE)
        record_dataset(run_dir, index)

    train_tokens = load_tokens(index.dir, "train")
    val_tokens = load_tokens(index.dir, "val")
    val_chars = index.splits["val"]["characters"]
    has_val = len(val_tokens) > 1  # data.val_fraction=0 leaves none to score
    global_batch = t.micro_batch_size * t.grad_accum * engine.world_size
    tokens_per_step = global_batch * t.seq_len

    metrics = MetricsLog(run_dir / METRICS_FILE, start_step, log) if main else None
    # the expert-load plot's records: those kept on resume, read once, then each step's
    moe_records = (
        [r for r in read_records(run_dir / METRICS_FILE, quiet) if "moe" in r]
        if main and model.sparse_layers()
        else []
    )
    wandb_run = (
        WandbRun(run_dir, cfg.run.wandb, cfg.run.wandb_project, cfg.to_dict() | parallel)
        if main
        else None
    )
    progress = Progress(
        t.max_steps, start_step, enabled=main, mode=t.progress, interval=t.log_interval, log=log
    )
    started = time.perf_counter()
    end_step = min(stop_at or t.max_steps, t.max_steps)
    with (
        CtrlC(enabled=engine.world_size == 1) as ctrl_c,
        contextlib.closing(progress),
        contextlib.closing(metrics) if main else contextlib.nullcontext(),
    ):
        for step in range(start_step, end_step):
            tick = time.perf_counter()
            lr = lr_at(step, t.lr, t.min_lr, t.warmup_steps, t.max_steps)
            x, y = get_batch(
                train_tokens,
                t.seq_len,
                global_batch,
                t.seed,
                step,
                engine.rank,
                engine.world_size,
            )
            micro = list(zip(x.split(t.micro_batch_size), y.split(t.micro_batch_size), strict=True))
            result = engine.train_step(micro, lr)
            if not math.isfinite(result.loss):
                raise diverged(result.loss, step + 1, lr, t.lr, ckpt_root)
            done = step + 1
            record = {
                "step": done,
                "train_loss": result.loss,
                "lr": lr,
                "grad_norm": result.grad_norm,
                "tokens_per_s": tokens_per_step / (time.perf_counter() - tick),
                "elapsed_s": time.perf_counter() - started,
            }
            record.update(
                mfu.throughput(record["tokens_per_s"], flops_per_token, peak, engine.world_size)
            )
            routing = model.pop_layer_metrics()
            if routing:
                record.update(aux_loss=result.aux_loss, moe=routing)
            if has_val and (done % t.eval_interval == 0 or done == t.max_steps):
                ev = evaluate(
                    model,
                    val_tokens,
                    t.seq_len,
                    EVAL_BATCH,
                    val_chars,
                    max_tokens=t.eval_tokens or None,
                    precision=t.precision,
                )
                record.update(val_loss=ev.loss, val_bpc=ev.bpc)
                if main:
                    progress.write(
                        f"step {done}: train loss {result.loss:.4f}, "
                        f"val loss {ev.loss:.4f}, val BPC {ev.bpc:.4f}"
                        + ("" if ev.exact else " (estimate)")
                    )
            if main:
                metrics.log(record)
                wandb_run.log(record)
                if routing:
                    moe_records.append(record)
                if routing and "val_loss" in record and wandb_run.run is not None:
                    load_png = run_dir / "expert_load.png"
                    plot_expert_load(moe_records, load_png)
                    wandb_run.log_image("moe/expert_load", load_png, done)
                progress.step(record)
            if on_step:
                on_step(record)
            out_of_time = stop_after_s is not None and time.perf_counter() - started >= stop_after_s
            interrupted = ctrl_c.requested  # read once: a signal may land at any line
            if done % t.ckpt_interval == 0 or done == end_step or out_of_time or interrupted:
                folder = save_checkpoint(
                    ckpt_root,
                    done,
                    functools.partial(write_state, engine, cfg, done),
                    t.keep_last,
                    engine.rank,
                    engine.barrier,
                )
                if on_checkpoint:
                    on_checkpoint(folder, record)
            if interrupted:
                raise Interrupted(
                    f"interrupted after step {done}: checkpoint {folder} written; "
                    "continue the run with --resume"
                )
            if out_of_time:
                end_step = done
                break
    wall = time.perf_counter() - started
    steps_run = end_step - start_step

    final = (
        evaluate(model, val_tokens, t.seq_len, EVAL_BATCH, val_chars, precision=t.precision)
        if has_val
        else None
    )
    baseline = (
        unigram_bpc(train_tokens, val_tokens, index.vocab_size, val_chars) if has_val else None
    )
    heldout = (
        evaluate(
            model,
            load_tokens(index.dir, HELDOUT),
            t.seq_len,
            EVAL_BATCH,
            index.splits[HELDOUT]["characters"],
            precision=t.precision,
        )
        if HELDOUT in index.splits
        else None
    )
    # every rank samples: under ZeRO-3 each forward gathers parameters from all of them
    sample = sample_text(
        model, index.tokenizer(), cfg.run.sample_prompt, cfg.run.sample_tokens, seed=t.seed
    )
    if main:
        (run_dir / "sample.txt").write_text(sample + "\n", encoding="utf-8")
        plot_curves(run_dir / METRICS_FILE, run_dir / "curves.png")
        if model.sparse_layers():
            plot_expert_load(moe_records, run_dir / "expert_load.png")
        if final is not None:
            wandb_run.log({"step": end_step, "final_val_bpc": final.bpc, "unigram_bpc": baseline})
        if heldout is not None:
            wandb_run.log({"step": end_step, "final_heldout_bpc": heldout.bpc})
        wandb_run.finish()
    summary = TrainSummary(
        steps=end_step,
        params=n_params,
        parallel=parallel,
        val_loss=final.loss if final else None,
        val_bpc=final.bpc if final else None,
        unigram_bpc=baseline,
        wall_s=wall,
        tokens_per_s=steps_run * tokens_per_step / wall if steps_run else 0.0,
        sample=sample,
        heldout_bpc=heldout.bpc if heldout else None,
    )
    if main:
        (run_dir / "summary.json").write_text(
            json.dumps(summary.__dict__, indent=1), encoding="utf-8"
        )
    return summary


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


class CtrlC:
    """While active, Ctrl-C (SIGINT) asks the loop to stop after the current step with a
    checkpoint; a second Ctrl-C interrupts at once. Only one process in its main thread
    (a rank cannot stop alone, and signals reach only the main thread)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self.previous = None

    def __enter__(self) -> CtrlC:
        if self.enabled:
            self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nCtrl-C: stopping after this step with a checkpoint (again to abort)",
            file=sys.stderr,
        )

    def __exit__(self, *exc) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self.previous)


def write_state(engine: Engine, cfg: Config, step: int, directory: Path) -> None:
    """Everything a resume needs: engine state, the loop's step, every rank's RNG, config."""
    engine.save(directory)
    torch.save(rng_state(), directory / f"rng_rank{engine.rank}.pt")
    if engine.rank == 0:
        torch.save({"step": step, "world_size": engine.world_size}, directory / "trainer.pt")
        (directory / "config.json").write_text(
            json.dumps(cfg.to_dict(), indent=1), encoding="utf-8"
        )


def restore(engine: Engine, cfg: Config, directory: Path, log) -> int:
    """Load checkpoint `directory` into `engine`; return the step it was taken at.

    The data position is the step itself (batches are a function of the step). The RNG
    of each rank is restored when the world size is unchanged; on another world size
    dropout masks cannot continue bit for bit, so each rank reseeds from (seed, step).
    """
    try:
        verify_checkpoint(directory)
    except CheckpointError as err:
        how = "resume from it with --resume-from {}".format
        raise offer_previous(err, directory, lambda p: how(checkpoint_step(p))) from None
    check_same_model(json.loads((directory / "config.json").read_text())["model"], cfg, directory)
    engine.load(directory)
    state = torch.load(directory / "trainer.pt", weights_only=True)
    rng = directory / f"rng_rank{engine.rank}.pt"
    if state["world_size"] == engine.world_size and rng.is_file():
        set_rng_state(torch.load(rng, weights_only=True))
    else:
        torch.manual_seed(hash((cfg.train.seed, state["step"], engine.rank)) % 2**63)
    log(
        f"resumed from {directory} at step {state['step']} "
        f"({state['world_size']} -> {engine.world_size} ranks)"
    )
    return state["step"]


def rng_state() -> dict[str, torch.Tensor]:
    """The CPU generator, and this rank's GPU one (dropout on GPU draws from it)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def check_same_model(saved: dict, cfg: Config, directory: Path) -> None:
    saved, current = without_layout(saved), without_layout(cfg.to_dict()["model"])
    diffs = [
        f"model.{k}: checkpoint {saved.get(k)!r}, config {v!r}"
        for k, v in current.items()
        if saved.get(k) != v
    ]
    if diffs:
        raise CheckpointError(
            f"checkpoint {directory} is from a different model: " + "; ".join(diffs)
        )


def without_layout(model: dict) -> dict:
    """A model config less `ffn.ep_size`: how experts are split over ranks is a layout,
    which a resume may change, not part of the model."""
    ffn = {k: v for k, v in model.get("ffn", {}).items() if k != "ep_size"}
    return model | {"ffn": ffn}


def check_same_tokenizer(run_dir: Path, index: DataIndex) -> None:
    """A resumed model must read the token ids it was trained on: the run's tokenizer
    (copied into run.dir at its start) must be the dataset's, not one of the same size."""
    used = run_dir / TOKENIZER_FILE
    if not used.is_file():
        return
    if used.read_bytes() != index.tokenizer_path.read_bytes():
        raise CheckpointError(
            f"run.dir {run_dir} was trained with another tokenizer than data.dir "
            f"{index.dir} holds ({used} differs from {index.tokenizer_path}, though both may "
            f"have {index.vocab_size} pieces): resume with the run's dataset, or start a new "
            "run.dir"
        )
