"""`leviathan inspect` (lag weights, attention-distance profile) and `eval --data`."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from leviathan.cli import main
from leviathan.config import config_from_dict
from leviathan.data import load_tokens, read_documents, split_documents
from leviathan.inspection import attention_weights, distance_profile, lag_weights
from leviathan.train.trainer import train
from leviathan.trained import encode_documents, load_run

SEQ = 16


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory) -> dict[str, Path]:
    """Three-step runs of each mixer on the same data."""
    root = tmp_path_factory.mktemp("runs")
    mixers = {
        "token": {"kind": "token_xcorr", "window_q": 3, "window_k": 2, "rank": 2},
        "channel": {"kind": "channel_xcorr", "lags": 1},
        "dot": {"kind": "dot"},
    }
    out = {}
    for name, mixer in mixers.items():
        cfg = config_from_dict(
            {
                "model": {"block_size": SEQ, "n_layer": 2, "n_head": 2, "d_model": 16}
                | {"mixer": mixer},
                "data": {
                    "inputs": [str(corpus)],
                    "dir": str(root / "data"),
                    "tokenizer": {"vocab_size": 384},
                },
                "train": {
                    "seq_len": SEQ,
                    "micro_batch_size": 4,
                    "max_steps": 3,
                    "lr": 1e-2,
                    "warmup_steps": 1,
                    "eval_tokens": 64,
                    "threads": 1,
                },
                "run": {"dir": str(root / name), "wandb": "disabled", "sample_tokens": 4},
            }
        )
        train(cfg, log=lambda *_: None)
        out[name] = root / name
    out["corpus"] = corpus
    return out


# --- inspect ------------------------------------------------------------------------


def test_inspect_token_run_against_dot(runs, tmp_path, capsys):
    argv = ["inspect", "--run", str(runs["token"]), "--against", str(runs["dot"])]
    assert main([*argv, "--out", str(tmp_path), "--windows", "3"]) == 0
    assert "lag_kernels.png" in capsys.readouterr().out
    for name in ("lag_kernels.png", "attention_distance.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    profiles = json.loads((tmp_path / "attention_distance.json").read_text())
    assert list(profiles) == ["token (token_xcorr)", "dot (dot)"]
    for profile in profiles.values():
        p = np.array(profile)
        assert p.shape == (2, SEQ)
        # every query's weights sum to 1: sum over distances of mean * (queries that far) = T
        reach = SEQ - np.arange(SEQ)
        np.testing.assert_allclose((p * reach).sum(axis=1), SEQ, rtol=1e-5)


def test_kernels_are_the_trained_factors(runs):
    run = load_run(runs["token"])
    kernels = lag_weights(run)
    assert kernels.shape == (2, 2, 3, 2)  # layers, heads, Wq, Wk
    mixer = run.model.blocks[1].mixer
    expected = torch.einsum("hra,hrb->hab", mixer.f, mixer.g).detach().numpy()
    np.testing.assert_allclose(kernels[1], expected)
    delta = np.zeros((3, 2))
    delta[0, 0] = 1.0
    assert not np.allclose(kernels[0, 0], delta)  # lr 1e-2 moved it off the init


@pytest.mark.parametrize("name", ["token", "channel", "dot"])
def test_materialised_weights_reproduce_the_mixer(runs, name):
    mixer = load_run(runs[name]).model.blocks[0].mixer
    x = torch.randn(2, SEQ, 16)
    p = attention_weights(mixer, x)
    B, T, C = x.shape
    q, k, v = (t.view(B, T, 2, 8).transpose(1, 2) for t in mixer.qkv(x).split(C, dim=2))
    with torch.no_grad():
        fast = mixer.attend(q, k, v, dropout_p=0.0)
    torch.testing.assert_close(p @ v.detach(), fast, rtol=1e-4, atol=1e-5)
    assert torch.all(p.triu(1) == 0)  # causal


def test_inspect_channel_run(runs, tmp_path):
    assert main(["inspect", "--run", str(runs["channel"]), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "channel_lags.png").read_bytes()[:4] == b"\x89PNG"
    profile = distance_profile(load_run(runs["channel"]), windows=2)
    assert profile.shape == (2, SEQ) and np.all(profile > 0)


def test_inspect_refuses_a_dot_run(runs, tmp_path, capsys):
    assert main(["inspect", "--run", str(runs["dot"]), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "uses the 'dot' mixer, which has no lag weights" in err
    assert not list(tmp_path.iterdir())


# --- eval --data --------------------------------------------------------------------


def val_parts(corpus: Path) -> list[str]:
    """The text of the val split as prepare cut it (val_fraction 0.05), one part per doc."""
    _, val, _ = split_documents(read_documents([corpus]), 0.05)
    return [d.text for d in val]


def test_eval_data_on_the_val_text_equals_the_val_split(runs, tmp_path, capsys):
    folder = tmp_path / "val"
    folder.mkdir()
    parts = val_parts(runs["corpus"])
    assert len(parts) == 3
    for i, text in enumerate(parts):  # read back in name order, as the split was written
        (folder / f"{i:03d}.txt").write_bytes(text.encode("utf-8"))
    run = load_run(runs["token"])
    own = run.evaluate()

    tokens, characters = encode_documents(run.tokenizer, read_documents([folder]))
    shards = load_tokens(run.config.data.dir, "val")
    np.testing.assert_array_equal(tokens, shards)
    assert characters == sum(len(t) for t in parts)
    result = run.evaluate_documents(read_documents([folder]))
    assert result.exact and result.bpc == pytest.approx(own.bpc, rel=1e-9)

    assert main(["eval", "--run", str(runs["token"]), "--data", str(folder / "*.txt")]) == 0
    out = capsys.readouterr().out
    assert f"BPC {own.bpc:.4f} on 3 document(s)" in out


def test_eval_data_reads_jsonl_and_several_inputs(runs, tmp_path, capsys):
    parts = val_parts(runs["corpus"])
    (tmp_path / "a.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in parts[:2]), encoding="utf-8"
    )
    (tmp_path / "b.txt").write_bytes(parts[2].encode("utf-8"))
    own = load_run(runs["token"]).evaluate()
    argv = ["eval", "--run", str(runs["token"]), "--data"]
    assert main([*argv, str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")]) == 0
    assert f"BPC {own.bpc:.4f} on 3 document(s)" in capsys.readouterr().out
    assert main([*argv, str(tmp_path / "missing.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
