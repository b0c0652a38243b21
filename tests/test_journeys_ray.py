"""The Ray job as the README shows it: a local head, `ray job submit` from a folder of one's
own (the code uploaded with `--working-dir $REPO`, as `--working-dir .` uploads it from a
checkout), `python launch/train_moe.py --config configs/tiny-moe.yaml --workers 2 ...
run.dir=$PWD/... data.dir=$PWD/...`, then `ray stop` (tests/ray_cluster.py).

The job prepares the data once, where the user asked; each logged step is one line of the
job's log; Ray Train's report dumps stay out of it; it ends with the closing lines of
`leviathan train`. A relative run.dir in a submitted job is refused, naming the fix: the
job runs in Ray's temporary copy of the working dir. How each path is made absolute is
checked here without Ray.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
from pathlib import Path

import pytest
from ray_cluster import HEAD, REPO, run_on_cluster

from leviathan.config import load_config
from leviathan.errors import ConfigError

STEPS = 6
SMALL = (  # configs/tiny-moe.yaml shrunk to seconds: the job's shape, not its size
    "model.n_layer=2 model.n_head=2 model.d_model=32 model.block_size=32 train.seq_len=32 "
    f"train.micro_batch_size=4 train.max_steps={STEPS} train.warmup_steps=2 "
    f"train.eval_interval={STEPS} train.ckpt_interval={STEPS} train.eval_tokens=512 "
    "train.log_interval=1 run.sample_tokens=8 data.tokenizer.vocab_size=384 "
    "data.val_documents=1 --wandb disabled"
)
JOURNEY = f"""cd "$HOME_DIR"
JOB="python launch/train_moe.py --config configs/tiny-moe.yaml --workers 2 parallel.zero_stage=2"
ray job submit --address {HEAD} --working-dir "$REPO" -- $JOB \\
    run.dir=runs/tiny-moe-ray "data.inputs=[$CORPUS]" $SMALL > "$OUT/relative.log" 2>&1
echo $? > "$OUT/relative.rc"
SECONDS=0
ray job submit --address {HEAD} --working-dir "$REPO" -- $JOB \\
    run.dir=$PWD/runs/tiny-moe-ray data.dir=$PWD/data/shakespeare-bpe2048 \\
    "data.inputs=[$CORPUS]" $SMALL > "$OUT/job.log" 2>&1
echo $? > "$OUT/job.rc"
echo $SECONDS > "$OUT/job.seconds"
"""


@pytest.mark.slow
def test_the_ray_job_as_the_readme_shows_it(tmp_path, corpus):
    home = tmp_path / "home"  # where the user submits from; Ray's: tmp_path/ray-tmp
    home.mkdir()
    env = {"HOME_DIR": str(home), "CORPUS": str(corpus), "SMALL": SMALL}
    run_on_cluster(JOURNEY, tmp_path, 600, **env)
    refused = (tmp_path / "relative.log").read_text()
    assert (tmp_path / "relative.rc").read_text().strip() != "0"  # a failed job fails the submit
    assert "error: run.dir: 'runs/tiny-moe-ray' is relative" in refused
    assert "e.g. run.dir=$PWD/runs/tiny-moe-ray" in refused
    log = (tmp_path / "job.log").read_text()
    assert (tmp_path / "job.rc").read_text().strip() == "0", log[-5000:]
    run_dir, data_dir = home / "runs/tiny-moe-ray", home / "data/shakespeare-bpe2048"
    assert re.findall(r"^prepared (\S+) in ", log, re.M) == [str(data_dir)]  # once, there
    assert json.loads((run_dir / "dataset.json").read_text())["dir"] == str(data_dir.resolve())
    assert not list((tmp_path / "ray-tmp").rglob("index.json"))  # no dataset in Ray's folders
    for step in range(1, STEPS + 1):
        assert log.count(f"step {step}/{STEPS}: loss ") == 1, step
    assert "TrainingReport(" not in log and "Reporting training result" not in log
    assert_closing_lines(log, run_dir)
    assert (tmp_path / "stop.rc").read_text().strip() == "0"
    print(f"the README's Ray job: {(tmp_path / 'job.seconds').read_text().strip()} s")


def assert_closing_lines(log: str, run_dir: Path) -> None:
    """The lines `leviathan train` ends with, from the run's summary.json, in order."""
    summary = json.loads((run_dir / "summary.json").read_text())
    lines = [
        f"\nsample:\n{summary['sample']}\n\n",
        f"final val loss {summary['val_loss']:.4f} nats/token\n",
        f"final val BPC {summary['val_bpc']:.4f} "
        f"(unigram baseline of this tokenizer {summary['unigram_bpc']:.4f})\n",
        f"final heldout BPC {summary['heldout_bpc']:.4f} (whole documents never trained on)\n",
        f"run folder {run_dir}, wall time ",
    ]
    assert "".join(lines) in log, log[-3000:]


def train_moe(monkeypatch, cwd: Path, submitted: bool):
    """launch/train_moe.py as a module, run from `cwd`, as a submitted job's driver or not."""
    spec = importlib.util.spec_from_file_location("train_moe", REPO / "launch/train_moe.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    monkeypatch.chdir(cwd)
    if submitted:
        monkeypatch.setenv(job.SUBMITTED_JOB, "{}")
    else:
        monkeypatch.delenv(job.SUBMITTED_JOB, raising=False)
    return job


def made_absolute(job, overrides: list[str], storage: str | None = None):
    """`absolute_paths` on configs/tiny-moe.yaml with `overrides` and `--storage`."""
    cfg = load_config("configs/tiny-moe.yaml", overrides)
    args = argparse.Namespace(storage=storage)
    job.absolute_paths(cfg, args)
    return cfg, args.storage


def test_paths_resolve_against_the_folder_the_job_was_started_in(tmp_path, monkeypatch):
    job = train_moe(monkeypatch, tmp_path, submitted=False)
    inputs = ["data.inputs=[corpus/, 'more/*.txt']", "data.tokenizer.model=~/tok.model"]
    cfg, storage = made_absolute(job, inputs)
    assert cfg.run.dir == str(tmp_path / "runs/tiny-moe")
    assert cfg.data.dir == str(tmp_path / "data/shakespeare-bpe2048")
    assert cfg.data.inputs == [str(tmp_path / "corpus"), str(tmp_path / "more/*.txt")]
    assert cfg.data.tokenizer.model == str(Path.home() / "tok.model")
    assert storage == str(tmp_path / "runs/tiny-moe/ray")
    assert made_absolute(job, [], storage="results")[1] == str(tmp_path / "results")


def test_a_submitted_job_refuses_relative_paths_it_would_write(tmp_path, monkeypatch):
    """In a job from `ray job submit` the working directory is Ray's temporary copy:
    inputs may be read from it, but no run, dataset or Ray storage is written there."""
    job = train_moe(monkeypatch, tmp_path, submitted=True)
    run, data = f"run.dir={tmp_path}/run", f"data.dir={tmp_path}/data"
    copy = "is relative, and this job runs in Ray's temporary copy of its working dir"
    with pytest.raises(ConfigError, match=rf"^run.dir: 'runs/x' {copy}"):
        made_absolute(job, ["run.dir=runs/x", data])
    with pytest.raises(ConfigError, match=r"^data.dir: 'data/x' .* e\.g\. data.dir=\$PWD/data/x$"):
        made_absolute(job, [run, "data.dir=data/x"])
    with pytest.raises(ConfigError, match=r"^--storage: 'ray' .* e\.g\. --storage \$PWD/ray$"):
        made_absolute(job, [run, data], storage="ray")
    cfg, storage = made_absolute(job, [run, data, "data.inputs=[corpus/]"])
    assert cfg.data.inputs == [str(tmp_path / "corpus")]  # read from the copy: allowed
    assert storage == f"{tmp_path}/run/ray"
