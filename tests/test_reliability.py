"""Reliability (issue 14): run folders that cannot be clobbered, faults that leave the
last checkpoint whole, and user mistakes that end in one `error:` line, not a traceback.

Concurrent cases run real processes: two `leviathan train` on one run.dir, a 2-rank
DeepSpeed launch against a locked folder, SIGINT sent to a training process. A full disk
is a real tmpfs (in a private mount namespace) where one can be mounted.
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from test_distributed import launch
from test_train import cli as run_cli
from test_train import read_metrics, small_config

from leviathan.cli import build_parser, main, parse_args
from leviathan.config import load_config
from leviathan.data import prepare, read_documents
from leviathan.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    RunDirError,
    StorageError,
    TrainingError,
)
from leviathan.storage import read_records
from leviathan.train.checkpoint import (
    LATEST,
    latest_checkpoint,
    quiet,
    save_checkpoint,
    verify_checkpoint,
)
from leviathan.train.run_folder import RunLock
from leviathan.train.trainer import config_warnings, train
from leviathan.trained import load_run

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", DS_ACCELERATOR="cpu")


class Logged(list):
    """A `log` that keeps what it was told."""

    def __call__(self, message: str) -> None:
        self.append(message)

    def any(self, text: str) -> bool:
        return any(text in m for m in self)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, corpus) -> Path:
    """The three-play dataset, prepared once (every run here reuses it)."""
    folder = tmp_path_factory.mktemp("data") / "prepared"
    cfg = small_config(corpus, folder, tmp_path_factory.mktemp("unused"))
    prepare(cfg.data, log=quiet)
    return folder


def write_config(cfg, path: Path) -> Path:
    """A YAML file of `cfg` for the command line."""
    path.write_text(yaml.safe_dump(cfg.to_dict()), encoding="utf-8")
    return path


def cli(*args: str, cwd: Path | None = None, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "leviathan.cli", *args],
        cwd=cwd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def private_mounts() -> bool:
    """Can this test mount a tmpfs of its own (root, `unshare -m`)?"""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = "mount -t tmpfs -o size=64k tmpfs /mnt && umount /mnt"
    done = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", probe])
    return done.returncode == 0


def in_private_mounts(script: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["unshare", "-m", "--propagation", "private", "bash", "-c", script],
        env=dict(ENV, PY=sys.executable, **env),
        capture_output=True,
        text=True,
        timeout=600,
    )


needs_mounts = pytest.mark.skipif(not private_mounts(), reason="cannot mount a private tmpfs")


# 1. One training per run folder -------------------------------------------------------


@pytest.mark.slow
def test_second_training_is_refused_and_ctrl_c_checkpoints(corpus, data_dir, tmp_path):
    """Two real `leviathan train` on one run.dir: the second (fresh, or --resume) is refused
    while the first runs; Ctrl-C then makes the first write a checkpoint and exit 130; a
    resume from it continues with every step logged once."""
    run_dir = tmp_path / "run"
    cfg = small_config(
        corpus,
        data_dir,
        run_dir,
        train={"max_steps": 100_000, "eval_interval": 100_000, "ckpt_interval": 100_000},
    )
    config = write_config(cfg, tmp_path / "run.yaml")
    first = cli("train", "--config", str(config), "--wandb", "disabled")
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "the first training never started"
        time.sleep(0.2)
    for extra in ([], ["--resume"]):
        code, _, err = finish(cli("train", "--config", str(config), *extra))
        assert code == 2, err
        assert f"error: run.dir {run_dir} is in use by another training" in err
        assert f"process {first.pid} holds" in err and "Traceback" not in err
    first.send_signal(signal.SIGINT)
    code, _, err = finish(first)
    assert code == 130, err
    assert "Traceback" not in err and "interrupted after step" in err
    step = int(err.split("interrupted after step ")[1].split(":")[0])
    ckpt = run_dir / "checkpoints" / f"step_{step:07d}"
    assert latest_checkpoint(run_dir / "checkpoints") == ckpt
    verify_checkpoint(ckpt)
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, step + 1))

    resumed = cli("train", "--config", str(config), "--resume", "--stop-at", str(step + 2))
    code, out, err = finish(resumed)
    assert code == 0, err
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, step + 3))
    RunLock(run_dir).release()  # free again once the processes are gone


@pytest.mark.slow
def test_locked_run_dir_stops_every_rank(corpus, data_dir, tmp_path):
    """2 DeepSpeed ranks against a folder another process holds: both end with the error
    (rank 0 takes the lock and tells the others), none waits forever."""
    run_dir = tmp_path / "run"
    cfg = small_config(corpus, data_dir, run_dir, model={"dropout": 0.0})
    config = write_config(cfg, tmp_path / "run.yaml")
    holder = RunLock(run_dir)
    try:
        done = launch(config, 2, run_dir, check=False)
    finally:
        holder.release()
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert output.count(f"error: run.dir {run_dir} is in use by another training") == 2, output
    assert not (run_dir / "checkpoints").exists()


def test_ray_driver_takes_the_run_dir_lock(corpus, data_dir, tmp_path):
    """The Ray job's driver holds the lock for its workers (a restarted worker group must
    not lock itself out), so a job on a folder in use is refused before Ray starts."""
    run_dir = tmp_path / "run"
    config = write_config(small_config(corpus, data_dir, run_dir), tmp_path / "run.yaml")
    holder = RunLock(run_dir)
    try:
        done = subprocess.run(
            [sys.executable, str(REPO / "launch/train_moe.py"), "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=120,
            env=ENV,
        )
    finally:
        holder.release()
    assert done.returncode == 2, done.stderr
    assert f"error: run.dir {run_dir} is in use by another training" in done.stderr


def test_lock_dies_with_its_process(tmp_path):
    """A SIGKILLed holder leaves no stale lock: the kernel drops a flock with the process."""
    script = (
        "import sys, time; from pathlib import Path; "
        "from leviathan.train.run_folder import RunLock; "
        "lock = RunLock(Path(sys.argv[1])); print('locked', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunDirError, match=f"process {holder.pid} holds"):
        RunLock(tmp_path)
    holder.kill()
    holder.wait()
    RunLock(tmp_path).release()


# 2. The `latest` pointer and damaged checkpoints ----------------------------------------


@pytest.fixture
def stopped_at_6(corpus, data_dir, tmp_path):
    """A run stopped at step 6: checkpoints step_4 and step_6, metrics 1..6."""
    cfg = small_config(corpus, data_dir, tmp_path / "run")
    train(cfg, stop_at=6, log=quiet)
    return cfg, tmp_path / "run"


@pytest.fixture(scope="module")
def straight(corpus, data_dir, tmp_path_factory) -> list[float]:
    """The losses of the uninterrupted 8-step run."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    train(small_config(corpus, data_dir, run_dir), log=quiet)
    return [r["train_loss"] for r in read_metrics(run_dir)]


@pytest.mark.parametrize("pointer", [None, "", "garbage\n", "step_0000099\n"])
def test_missing_or_bad_pointer_resumes_from_newest_verified(stopped_at_6, straight, pointer):
    cfg, run_dir = stopped_at_6
    latest = run_dir / "checkpoints" / LATEST
    if pointer is None:
        latest.unlink()
    else:
        latest.write_text(pointer)
    log = Logged()
    train(cfg, resume=True, log=log)
    assert log.any("using the newest verified checkpoint, step_0000006")
    assert log.any("resumed from") and log.any("at step 6")
    assert [r["train_loss"] for r in read_metrics(run_dir)] == straight


def test_fresh_run_is_refused_over_step_folders_or_metrics(stopped_at_6, corpus, data_dir):
    cfg, run_dir = stopped_at_6
    (run_dir / "checkpoints" / LATEST).unlink()
    before = (run_dir / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match="already holds checkpoints: pass --resume"):
        train(cfg, log=quiet)
    shutil.rmtree(run_dir / "checkpoints")
    with pytest.raises(CheckpointError, match="already holds metrics.jsonl of a run with no"):
        train(cfg, log=quiet)
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_corrupt_newest_checkpoint_offers_the_previous(stopped_at_6, straight):
    cfg, run_dir = stopped_at_6
    newest = run_dir / "checkpoints" / "step_0000006"
    data = bytearray((newest / "model.pt").read_bytes())
    data[-100] ^= 0xFF
    (newest / "model.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as caught:
        train(cfg, resume=True, log=quiet)
    message = str(caught.value)
    assert "step_0000006/model.pt is corrupt: SHA-256 mismatch" in message
    assert "before it is step_0000004: resume from it with --resume-from 4" in message
    with pytest.raises(CheckpointError, match=r"--checkpoint .*step_0000004"):
        load_run(run_dir)  # eval / sample / export say the same with --checkpoint
    assert load_run(run_dir, run_dir / "checkpoints" / "step_0000004").step == 4
    with pytest.raises(CheckpointError, match=r"no checkpoint of step 5 .*it has steps 4, 6"):
        train(cfg, resume_from=5, log=quiet)
    train(cfg, resume_from=4, log=quiet)
    assert [r["train_loss"] for r in read_metrics(run_dir)] == straight  # 5, 6 retaken
    verify_checkpoint(latest_checkpoint(run_dir / "checkpoints"))


def test_resume_from_on_the_command_line(stopped_at_6, tmp_path, capsys):
    cfg, run_dir = stopped_at_6
    config = write_config(cfg, tmp_path / "run.yaml")
    assert main(["train", "--config", str(config), "--resume-from", "4", "--stop-at", "5"]) == 0
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5]
    with pytest.raises(SystemExit) as code:
        main(["train", "--config", str(config), "--resume-from", "0"])
    assert code.value.code == 2
    assert "argument --resume-from: must be a step number >= 1, got 0" in capsys.readouterr().err


# 3. A torn last line of metrics.jsonl ------------------------------------------------------


def test_torn_metrics_tail_is_dropped_on_resume(corpus, data_dir, tmp_path, straight):
    cfg = small_config(corpus, data_dir, tmp_path / "run")
    train(cfg, stop_at=4, log=quiet)
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 5, "train_loss": 4.1')  # the crash cut this record short
    log = Logged()
    train(cfg, resume=True, log=log)
    assert log.any("dropping its torn last line 5")
    assert [r["train_loss"] for r in read_metrics(tmp_path / "run")] == straight


def test_a_bad_line_before_the_end_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(StorageError, match=r"metrics\.jsonl:2: not a JSON record"):
        read_records(path, log=quiet)


# 4. Disk full while checkpointing --------------------------------------------------------


def payload(directory: Path) -> None:
    (directory / "model.pt").write_bytes(os.urandom(4096))


def test_enospc_during_a_checkpoint_is_named_and_keeps_the_previous(tmp_path):
    first = save_checkpoint(tmp_path, 4, payload, keep_last=2)

    def disk_full(directory: Path) -> None:
        (directory / "model.pt").write_bytes(b"part of a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "model.pt"))

    with pytest.raises(StorageError) as caught:
        save_checkpoint(tmp_path, 8, disk_full, keep_last=2)
    message = str(caught.value)
    assert "no space left on device (ENOSPC) writing checkpoint" in message
    assert ".step_0000008.tmp/model.pt" in message and f"{first} is intact" in message
    assert latest_checkpoint(tmp_path) == first
    verify_checkpoint(first)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, first.name]  # no tmp left


FULL_DISK = """
set -eu
mount -t tmpfs -o size=$SIZE tmpfs "$MNT"
set +e
"$PY" -m leviathan.cli train --config "$CONFIG" > "$OUT/train.out" 2> "$OUT/train.err"
echo $? > "$OUT/train.rc"
df -B1 "$MNT" > "$OUT/df.txt"
cp -a "$MNT/run" "$OUT/run"
"""


@pytest.mark.slow
@needs_mounts
def test_full_disk_during_a_real_checkpoint(corpus, data_dir, tmp_path):
    """A real tmpfs with room for one checkpoint and a half: the second checkpoint hits
    ENOSPC (torch.save says only "iostream error"); the error names it, the first stays."""
    probe = tmp_path / "probe"
    train(small_config(corpus, data_dir, probe), stop_at=4, log=quiet)
    used = sum(p.stat().st_blocks * 512 for p in (probe / "checkpoints").rglob("*") if p.is_file())
    room = int(used * 1.5) + (probe / "tokenizer.model").stat().st_size + (64 << 10)
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    cfg = small_config(corpus, data_dir, mnt / "run")
    done = in_private_mounts(
        FULL_DISK,
        SIZE=str(room),
        MNT=str(mnt),
        OUT=str(out),
        CONFIG=str(write_config(cfg, tmp_path / "run.yaml")),
    )
    assert done.returncode == 0, done.stderr
    err = (out / "train.err").read_text()
    assert (out / "train.rc").read_text().strip() == "2", err
    assert "Traceback" not in err
    assert f"no space left on device (ENOSPC) writing checkpoint {mnt}/run/checkpoints/" in err
    assert f"{mnt}/run/checkpoints/step_0000004 is intact" in err
    copied = out / "run" / "checkpoints"
    assert latest_checkpoint(copied).name == "step_0000004"
    verify_checkpoint(copied / "step_0000004")
    assert sorted(p.name for p in copied.iterdir()) == [LATEST, "step_0000004"]


# 5. Bad run folders, non-finite numbers, divergence ---------------------------------------


@pytest.mark.parametrize(
    "override,message",
    [
        ("run.dir=", "run.dir: empty; name a folder"),
        ("data.dir=", "data.dir: empty; name a folder"),
        ("train.lr=.nan", "train.lr: must be a finite number, got nan"),
        ("train.lr=.inf", "train.lr: must be a finite number, got inf"),
        ("train.grad_clip=.inf", "train.grad_clip: must be a finite number, got inf"),
        ("model.dropout=.nan", "model.dropout: must be a finite number, got nan"),
        ("data.val_fraction=-.inf", "data.val_fraction: must be a finite number, got -inf"),
    ],
)
def test_empty_folders_and_non_finite_numbers_are_refused(override, message, capsys):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/tiny.yaml", [override])
    assert main(["train", override]) == 2
    assert f"error: {message}" in capsys.readouterr().err


def test_non_finite_expert_options_are_refused():
    with pytest.raises(ConfigError, match="model.ffn.aux_coef: must be a finite number"):
        load_config("configs/tiny-moe.yaml", ["model.ffn.aux_coef=.nan"])


def test_run_dir_that_is_a_file(corpus, data_dir, tmp_path):
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(ConfigError, match=r"run.dir: .*/run is a file, not a folder"):
        train(small_config(corpus, data_dir, tmp_path / "run"), log=quiet)
    with pytest.raises(ConfigError, match=r"run.dir: cannot create .*/run/sub"):
        train(small_config(corpus, data_dir, tmp_path / "run" / "sub"), log=quiet)


def test_diverging_run_ends_with_an_error_and_keeps_its_checkpoint(
    corpus, data_dir, tmp_path, capsys
):
    cfg = small_config(corpus, data_dir, tmp_path / "run")
    train(cfg, stop_at=4, log=quiet)
    hot = small_config(corpus, data_dir, tmp_path / "run", train={"lr": 1e30, "min_lr": 1e29})
    with pytest.raises(TrainingError) as caught:
        train(hot, resume=True, log=quiet)
    message = str(caught.value)
    found = re.search(r"train loss is nan at step (\d+): the run diverged", message)
    assert found and int(found.group(1)) > 4, message  # the first huge step, or the next
    assert "step_0000004 is kept" in message and "--resume-from 4" in message
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step_0000004"
    verify_checkpoint(tmp_path / "run" / "checkpoints" / "step_0000004")
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == list(range(1, int(found[1])))
    config = write_config(hot, tmp_path / "hot.yaml")
    assert main(["train", "--config", str(config), "--resume"]) == 2  # the CLI: one line
    assert f"error: train loss is nan at step {found[1]}" in capsys.readouterr().err


# 6. Sampling and export arguments ------------------------------------------------------


@pytest.fixture(scope="module")
def finished(corpus, data_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    train(small_config(corpus, data_dir, run_dir), log=quiet)
    return run_dir


@pytest.mark.parametrize(
    "args,message",
    [
        (["sample", "--top-k", "0"], "argument --top-k: must be a number of tokens >= 1, got 0"),
        (["sample", "--top-k", "-1"], "argument --top-k: must be a number of tokens >= 1, got -1"),
        (["sample", "--max-new-tokens", "-5"], "--max-new-tokens: must be a count >= 0, got -5"),
        (["sample", "--temperature", "-0.5"], "--temperature: must be a number >= 0"),
        (["sample", "--temperature", "nan"], "--temperature: must be a number >= 0"),
        (["train", "--stop-at", "0"], "argument --stop-at: must be a step number >= 1, got 0"),
        (["train", "--stop-at", "-3"], "argument --stop-at: must be a step number >= 1, got -3"),
    ],
)
def test_impossible_command_line_values_are_named(finished, args, message, capsys):
    with pytest.raises(SystemExit) as code:
        main([*args, "--run", str(finished)] if args[0] == "sample" else args)
    assert code.value.code == 2
    assert message in capsys.readouterr().err


def test_sampling_at_the_edges_works(finished, capsys):
    assert main(["sample", "--run", str(finished), "--prompt", "KING", "--top-k", "1"]) == 0
    greedy = ["--temperature", "0", "--max-new-tokens", "0"]
    assert main(["sample", "--run", str(finished), "--prompt", "KING", *greedy]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "KING"


def test_stop_at_zero_is_refused_by_the_api(corpus, data_dir, tmp_path):
    with pytest.raises(ConfigError, match="--stop-at: must be a step >= 1, got 0"):
        train(small_config(corpus, data_dir, tmp_path / "run"), stop_at=0, log=quiet)


def test_export_into_a_missing_folder(finished, tmp_path, capsys):
    out = tmp_path / "missing" / "model.safetensors"
    assert main(["export", "--run", str(finished), "--out", str(out)]) == 2
    assert f"error: --out {out}: the folder {out.parent} does not exist" in capsys.readouterr().err


READ_ONLY = """
set -eu
mount -t tmpfs -o ro,size=1m tmpfs "$MNT"
"$PY" -m leviathan.cli export --run "$RUN" --out "$MNT/model.safetensors"
"""


@needs_mounts
def test_export_into_a_read_only_folder(finished, tmp_path):
    """Root writes through chmod, so the read-only folder is a read-only mount."""
    (tmp_path / "ro").mkdir()
    done = in_private_mounts(READ_ONLY, MNT=str(tmp_path / "ro"), RUN=str(finished))
    assert done.returncode == 2, done.stderr
    want = f"error: --out {tmp_path}/ro/model.safetensors: cannot write it: Read-only file system"
    assert want in done.stderr and "Traceback" not in done.stderr


# 7. Datasets of other inputs, tokenizers of the same size, no validation split ------------


@pytest.fixture(scope="module")
def one_play(corpus, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("one-play")
    first = sorted(corpus.iterdir())[0]
    shutil.copy(first, folder / first.name)
    return folder


def test_dataset_of_other_inputs_is_replaced_only_with_rebuild(corpus, one_play, tmp_path, capsys):
    cfg = small_config(corpus, tmp_path / "ds", tmp_path / "run")
    built = prepare(cfg.data, log=quiet)
    bundled = small_config(corpus, tmp_path / "ds", tmp_path / "run", data={"inputs": []})
    with pytest.raises(DataError) as caught:
        prepare(bundled.data, log=quiet)  # `train data.dir=X data.inputs=[]` (given)
    message = str(caught.value)
    assert (
        f"holds a dataset prepared from {corpus}, but data.inputs asks for the bundled" in message
    )
    assert "pass --rebuild to replace it" in message
    other = small_config(
        corpus, tmp_path / "ds", tmp_path / "run", data={"inputs": [str(one_play)]}
    )
    with pytest.raises(
        DataError, match=f"prepared from {corpus}, but data.inputs asks for {one_play}"
    ):
        train(other, log=quiet)
    assert prepare(cfg.data, log=quiet).fingerprint == built.fingerprint  # untouched
    config = write_config(other, tmp_path / "other.yaml")
    assert main(["prepare", "--config", str(config)]) == 2
    assert "pass --rebuild" in capsys.readouterr().err
    assert main(["prepare", "--config", str(config), "--rebuild"]) == 0
    assert prepare(other.data, log=quiet).meta["corpus"]["source"] == str(one_play)


def test_resume_with_another_tokenizer_of_the_same_size_is_refused(
    corpus, data_dir, one_play, tmp_path
):
    cfg = small_config(corpus, data_dir, tmp_path / "run")
    train(cfg, stop_at=4, log=quiet)
    data = {"inputs": [str(one_play)], "dir": str(tmp_path / "other-data")}
    other = small_config(corpus, data_dir, tmp_path / "run", data=data)
    with pytest.raises(CheckpointError, match="trained with another tokenizer") as caught:
        train(other, resume=True, log=quiet)
    assert "both may have 384 pieces" in str(caught.value)


def test_no_validation_split_trains_end_to_end(corpus, tmp_path, capsys):
    cfg = small_config(corpus, tmp_path / "ds", tmp_path / "run", data={"val_fraction": 0})
    config = write_config(cfg, tmp_path / "run.yaml")
    assert main(["train", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "no validation split (data.val_fraction=0)" in out
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, 9))
    assert not any("val_bpc" in r for r in records)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["val_bpc"] is None and (tmp_path / "run" / "curves.png").is_file()
    run = load_run(tmp_path / "run")
    with pytest.raises(DataError, match="has no validation split .* eval --data"):
        run.evaluate()
    assert run.evaluate_documents(read_documents([str(corpus)])).bpc > 0


# 8. Warnings and where overrides go --------------------------------------------------------


def test_warnings_for_settings_that_do_not_do_what_they_say(corpus, data_dir, tmp_path):
    cfg = small_config(
        corpus,
        data_dir,
        tmp_path / "run",
        train={"warmup_steps": 8, "max_steps": 4, "precision": "fp16"},
    )
    log = Logged()
    train(cfg, log=log)
    assert log.any("warning: train.warmup_steps (8) >= train.max_steps (4)")
    assert log.any("warning: train.precision: fp16 on the plain torch engine runs bf16")
    quiet_cfg = small_config(corpus, data_dir, tmp_path / "run2")
    assert config_warnings(quiet_cfg, "torch") == []
    fp16 = small_config(corpus, data_dir, tmp_path / "r", train={"precision": "fp16"})
    assert config_warnings(fp16, "deepspeed") == []


def test_overrides_after_options_are_parsed(capsys):
    args = parse_args(
        build_parser(),
        ["train", "model.n_layer=2", "--wandb", "disabled", "train.lr=1e-3", "--stop-at", "3"],
    )
    assert args.overrides == ["model.n_layer=2", "train.lr=1e-3"] and args.stop_at == 3
    assert main(["params", "configs/tiny.yaml", "--active", "model.n_layer=2"]) == 0
    after = capsys.readouterr().out
    assert main(["params", "configs/tiny.yaml", "model.n_layer=2", "--active"]) == 0
    assert capsys.readouterr().out == after
    with pytest.raises(SystemExit) as code:
        main(["eval", "--run", "runs/x", "model.n_layer=2"])
    assert code.value.code == 2
    assert "eval takes no KEY=VALUE overrides (model.n_layer=2)" in capsys.readouterr().err


def command_parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    """Every parser a user meets: `leviathan` and each subcommand, the launch scripts."""
    found = []

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        found.append((name, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for command, sub in action.choices.items():
                    walk(sub, f"{name} {command}")

    walk(build_parser(), "leviathan")
    for script in ("train", "train_moe"):
        found.append((f"launch/{script}.py", launch_script(script).build_parser()))
    return found


def launch_script(name: str):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_option_has_help_that_shows_its_default():
    missing = []
    for name, parser in command_parsers():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            if action.help == argparse.SUPPRESS:  # deepspeed's --local_rank: not for users
                continue
            text = parser._get_formatter()._expand_help(action) if action.help else ""
            default = action.default
            hidden = default not in (None, False, argparse.SUPPRESS) and not (
                str(default) in text or repr(default) in text
            )
            if not text or hidden:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []
    moe = launch_script("train_moe")
    assert moe.parse_args(["--wandb", "offline"]).wandb == "offline"


def test_version_and_config_files_on_the_command_line():
    def leviathan(*args: str) -> subprocess.CompletedProcess:
        return run_cli(*args, cwd=REPO)

    done = leviathan("--version")
    assert (done.returncode, done.stdout) == (0, f"leviathan {version('leviathan')}\n")
    by_option = leviathan("params", "--config", "configs/tiny.yaml", "model.n_layer=2")
    assert by_option.returncode == 0 and by_option.stdout.startswith("configs/tiny.yaml: ")
    positional = leviathan("params", "configs/tiny.yaml", "model.n_layer=2")  # the older form
    assert (positional.returncode, positional.stdout) == (0, by_option.stdout)
    assert "deprecated: use `leviathan params --config configs/tiny.yaml`" in positional.stderr
    derived = leviathan("ds-config", "--config", "configs/tiny.yaml", "parallel.zero_stage=3")
    assert json.loads(derived.stdout)["zero_optimization"]["stage"] == 3
    both = leviathan("ds-config", "--config", "configs/tiny.yaml", "configs/small.yaml")
    assert both.returncode == 2
    assert both.stderr.splitlines() == [
        "error: ds-config: one config, got configs/tiny.yaml and configs/small.yaml: give it "
        "as --config CONFIG; the other items must be KEY=VALUE overrides"
    ]
