"""The training loop end to end: exact resume, run artefacts, refusals, the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from leviathan.config import config_from_dict
from leviathan.errors import CheckpointError, ConfigError
from leviathan.train.checkpoint import latest_checkpoint
from leviathan.train.trainer import train
from leviathan.trained import load_run


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data") / "prepared"


def small_config(corpus: Path, data_dir: Path, run_dir: Path, **sections):
    raw = {
        "model": {
            "block_size": 32,
            "n_layer": 2,
            "n_head": 2,
            "d_model": 32,
            "dropout": 0.1,
            "mixer": {"kind": "token_xcorr", "window_q": 3, "window_k": 3, "rank": 2},
        },
        "data": {"inputs": [str(corpus)], "dir": str(data_dir), "tokenizer": {"vocab_size": 384}},
        "train": {
            "seq_len": 32,
            "micro_batch_size": 4,
            "grad_accum": 2,
            "max_steps": 8,
            "warmup_steps": 2,
            "eval_interval": 4,
            "eval_tokens": 512,
            "ckpt_interval": 4,
            "keep_last": 2,
            "threads": 1,
        },
        "run": {"dir": str(run_dir), "wandb": "disabled", "sample_tokens": 10},
    }
    for section, values in sections.items():
        raw[section].update(values)
    return config_from_dict(raw)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_gives_identical_losses(corpus, data_dir, tmp_path):
    straight = train(small_config(corpus, data_dir, tmp_path / "a"), log=lambda *_: None)
    cfg_b = small_config(corpus, data_dir, tmp_path / "b")
    train(cfg_b, stop_at=4, log=lambda *_: None)
    assert latest_checkpoint(tmp_path / "b" / "checkpoints").name == "step_0000004"
    resumed = train(cfg_b, resume=True, log=lambda *_: None)

    losses_a = [r["train_loss"] for r in read_metrics(tmp_path / "a")]
    losses_b = [r["train_loss"] for r in read_metrics(tmp_path / "b")]
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == list(range(1, 9))
    assert losses_a == losses_b  # bit-identical, dropout RNG included
    assert straight.val_bpc == resumed.val_bpc


def test_run_folder_holds_everything(corpus, data_dir, tmp_path):
    cfg = small_config(corpus, data_dir, tmp_path / "run", run={"wandb": "offline"})
    summary = train(cfg, log=lambda *_: None)
    run_dir = tmp_path / "run"
    for name in (
        "config.yaml",
        "tokenizer.model",
        "metrics.jsonl",
        "curves.png",
        "sample.txt",
        "summary.json",
    ):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "wandb").glob("offline-run-*"))
    records = read_metrics(run_dir)
    assert [r["step"] for r in records if "val_bpc" in r] == [4, 8]
    assert summary.val_bpc < summary.unigram_bpc * 1.5  # sane scale, not a quality claim
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == [
        "step_0000004",
        "step_0000008",
    ]
    run = load_run(run_dir)
    assert run.step == 8
    assert run.evaluate().bpc == pytest.approx(summary.val_bpc, rel=1e-6)


def test_lag_weights_move_in_training(corpus, data_dir, tmp_path):
    cfg = small_config(corpus, data_dir, tmp_path / "run", train={"lr": 1e-2})
    train(cfg, log=lambda *_: None)
    mixer = load_run(tmp_path / "run").model.blocks[0].mixer
    delta = torch.zeros_like(mixer.f)
    delta[:, 0, 0] = 1.0
    assert not torch.allclose(mixer.f, delta)
    assert mixer.g[:, 1:].abs().sum() > 0  # the factors that start at zero learned too


def test_existing_run_is_not_overwritten_without_resume(corpus, data_dir, tmp_path):
    cfg = small_config(corpus, data_dir, tmp_path / "run", train={"max_steps": 4})
    train(cfg, log=lambda *_: None)
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match="already holds checkpoints: pass --resume"):
        train(cfg, log=lambda *_: None)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_resume_refuses_truncated_checkpoint(corpus, data_dir, tmp_path):
    cfg = small_config(corpus, data_dir, tmp_path / "run")
    train(cfg, stop_at=4, log=lambda *_: None)
    model_file = latest_checkpoint(tmp_path / "run" / "checkpoints") / "model.pt"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"model\.pt is truncated"):
        train(cfg, resume=True, log=lambda *_: None)


def test_resume_refuses_checkpoint_of_another_model(corpus, data_dir, tmp_path):
    train(small_config(corpus, data_dir, tmp_path / "run"), stop_at=4, log=lambda *_: None)
    other = small_config(corpus, data_dir, tmp_path / "run", model={"n_layer": 3})
    with pytest.raises(
        CheckpointError, match=r"different model: model\.n_layer: checkpoint 2, config 3"
    ):
        train(other, resume=True, log=lambda *_: None)


def test_resume_without_checkpoint_is_refused(corpus, data_dir, tmp_path):
    with pytest.raises(CheckpointError, match="--resume: no checkpoint in"):
        train(small_config(corpus, data_dir, tmp_path / "run"), resume=True, log=lambda *_: None)


def test_tokenizer_vocab_must_match_model(corpus, data_dir, tmp_path):
    cfg = small_config(corpus, data_dir, tmp_path / "run", model={"vocab_size": 1000})
    with pytest.raises(
        ConfigError, match=r"model\.vocab_size: 1000 differs from the tokenizer .*384"
    ):
        train(cfg, log=lambda *_: None)
    assert not (tmp_path / "run").exists()


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "leviathan.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_cli_prepare_train_eval_sample(corpus, tmp_path):
    overrides = [
        f"data.inputs=[{corpus}]",
        "data.dir=prepared",
        "data.tokenizer.vocab_size=384",
        "data.val_documents=1",  # the middle of the three plays, held out whole
        "model.n_layer=2",
        "model.d_model=32",
        "model.block_size=32",
        "train.seq_len=32",
        "train.micro_batch_size=4",
        "train.max_steps=6",
        "train.warmup_steps=2",
        "train.eval_interval=3",
        "train.ckpt_interval=3",
        "run.dir=run",
    ]
    prepared = cli("prepare", *overrides, cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr
    assert "val:" in prepared.stdout and (tmp_path / "prepared" / "index.json").is_file()

    trained = cli("train", "--wandb", "disabled", *overrides, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    bpc = float(trained.stdout.split("final val BPC ")[1].split()[0])
    heldout_bpc = float(trained.stdout.split("final heldout BPC ")[1].split()[0])
    assert "unigram baseline of this tokenizer" in trained.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["heldout_bpc"] == pytest.approx(heldout_bpc, abs=1e-4)

    evaluated = cli("eval", "--run", "run", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert float(evaluated.stdout.split("val BPC ")[1].split()[0]) == pytest.approx(bpc, abs=1e-4)
    scored = float(evaluated.stdout.split("heldout BPC ")[1].split()[0])
    assert scored == pytest.approx(heldout_bpc, abs=1e-4) and scored != pytest.approx(bpc, abs=1e-3)

    sampled = cli(
        "sample", "--run", "run", "--prompt", "KING", "--max-new-tokens", "12", cwd=tmp_path
    )
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout.startswith("KING") and len(sampled.stdout) > len("KING")

    # past block_size with a cut context, greedy: the compiled cached steps give the same text
    greedy = ["sample", "--run", "run", "--prompt", "KING", "--max-new-tokens", "40"]
    greedy += ["--temperature", "0", "--context-keep", "16"]
    texts = [cli(*greedy, *extra, cwd=tmp_path) for extra in ([], ["--compile"])]
    assert all(t.returncode == 0 for t in texts), [t.stderr for t in texts]
    assert texts[0].stdout == texts[1].stdout and len(texts[0].stdout) > len(sampled.stdout)
    for bad in ("0", "33"):  # block_size is 32
        refused = cli(*greedy[:-1], bad, cwd=tmp_path)
        assert refused.returncode == 2 and "--context-keep" in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr


def test_cli_reports_errors_without_traceback(tmp_path):
    result = cli("train", "model.n_layers=3", cwd=tmp_path)
    assert result.returncode == 2
    assert "error: model.n_layers: unknown key" in result.stderr
    assert "Traceback" not in result.stderr
    missing = cli("eval", "--run", str(tmp_path / "nothing"), cwd=tmp_path)
    assert missing.returncode == 2 and "has no checkpoint" in missing.stderr
