"""Activation checkpointing: the same steps as the plain run, MoE metrics counted once."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import small_config  # tests/ is on the path under pytest

from leviathan.config import Config, load_config, save_config
from leviathan.model import Leviathan
from leviathan.parallel.activation_checkpointing import apply_activation_checkpointing
from leviathan.parallel.torch_engine import TorchEngine
from leviathan.parallel.world import World
from leviathan.train.trainer import train

REPO = Path(__file__).resolve().parents[1]
VOCAB, T, B, STEPS = 64, 16, 4, 4
MOE = {"kind": "moe", "n_experts": 4, "top_k": 2, "expert_hidden_mult": 1.0}
FFNS = {
    "dense": {"kind": "dense"},
    "moe": MOE | {"jitter": 0.1},  # aux + z losses; jitter draws from the RNG
    "moe-loss-free": MOE | {"balance": "loss_free", "capacity_factor": 1.0},
}


def tiny_model(ffn: dict, checkpointed: bool) -> Leviathan:
    """test_train's model (dropout 0.1: masks must be redrawn alike in the recomputation)."""
    nowhere = Path("unused")
    cfg = small_config(nowhere, nowhere, nowhere, model={"vocab_size": VOCAB, "ffn": ffn})
    torch.manual_seed(0)
    model = Leviathan(cfg.model)
    if checkpointed:
        assert apply_activation_checkpointing(model) == 2
        assert apply_activation_checkpointing(model) == 0  # once is enough
    return model


def run_steps(ffn: dict, checkpointed: bool) -> dict:
    model = tiny_model(ffn, checkpointed)
    calls = []
    model.blocks[0].ffn.register_forward_pre_hook(lambda *_: calls.append(1))
    engine = TorchEngine(model, Config(), World("torch", 0, 1, torch.device("cpu")))  # AdamW 0.1
    data = torch.Generator().manual_seed(1)
    out = {"loss": [], "aux": [], "norm": [], "metrics": []}
    torch.manual_seed(2)
    for _ in range(STEPS):
        tokens = torch.randint(0, VOCAB, (2, B, T + 1), generator=data)
        micro = [(t[:, :-1], t[:, 1:]) for t in tokens]
        result = engine.train_step(micro, lr=1e-2)
        out["loss"].append(result.loss)
        out["aux"].append(result.aux_loss)
        out["norm"].append(result.grad_norm)
        out["metrics"].append(model.pop_layer_metrics())
    out["forwards"] = len(calls)
    out["state"] = {k: v.clone() for k, v in model.state_dict().items()}
    return out


@pytest.mark.parametrize("name", FFNS)
def test_checkpointed_steps_equal_plain_steps(name):
    plain, ckpt = run_steps(FFNS[name], False), run_steps(FFNS[name], True)
    assert plain["forwards"] == 2 * STEPS  # two micro-batches a step
    assert ckpt["forwards"] == 2 * plain["forwards"]  # recomputed in every backward
    for key in ("loss", "aux", "norm"):
        assert max(abs(a - b) for a, b in zip(plain[key], ckpt[key], strict=True)) <= 1e-6, key
    assert ckpt["metrics"] == plain["metrics"]  # each step counted once, loads included
    if name != "dense":
        assert all(m["layer0"]["load"] for m in plain["metrics"])
    for key, value in plain["state"].items():  # the loss-free router bias included
        torch.testing.assert_close(ckpt["state"][key], value, rtol=0, atol=1e-6, msg=key)


def test_eval_and_cached_generation_are_not_checkpointed():
    plain, ckpt = tiny_model(MOE, False), tiny_model(MOE, True)
    idx = torch.randint(0, VOCAB, (2, T))
    for model in (plain, ckpt):
        model.eval()
    with torch.no_grad():
        torch.testing.assert_close(ckpt(idx)[0], plain(idx)[0], rtol=0, atol=0)
    prompt = idx[:, :4]
    assert torch.equal(ckpt.generate(prompt, 8, temperature=0), plain.generate(prompt, 8, 0))
    for model in (plain, ckpt):  # training mode with a graph: checkpointed
        model.train()
        torch.manual_seed(3)  # the same dropout masks
        model(idx)[0].sum().backward()
    assert ckpt.pop_layer_metrics() == plain.pop_layer_metrics()


def loop_config(corpus: Path, root: Path, run: str) -> Path:
    """test_train's run with a loss-free, jittered MoE, written to `run`.yaml."""
    cfg = small_config(
        corpus,
        root / "data",
        root / run,
        model={"ffn": MOE | {"balance": "loss_free", "jitter": 0.1}},
        train={"max_steps": 6, "eval_interval": 6, "ckpt_interval": 6},
        run={"sample_tokens": 4},
    )
    path = root / f"{run}.yaml"
    save_config(cfg, path)
    return path


TIMINGS = ("tokens_per_s", "elapsed_s", "flops_per_s", "mfu")


def records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines]


def assert_same_records(got: list[dict], want: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want, strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-6, (a, b)
        assert a["moe"] == b["moe"]  # loads, drops, entropies: one count per step


def test_loop_with_checkpointing_takes_the_plain_steps(corpus, tmp_path):
    plain = load_config(loop_config(corpus, tmp_path, "plain"))
    ckpt = load_config(
        loop_config(corpus, tmp_path, "ckpt"), ["train.activation_checkpointing=true"]
    )
    a, b = train(plain, log=lambda _: None), train(ckpt, log=lambda _: None)
    assert_same_records(records(tmp_path / "ckpt"), records(tmp_path / "plain"))
    assert abs(a.val_loss - b.val_loss) <= 1e-6


@pytest.mark.slow
def test_deepspeed_zero3_with_checkpointing_takes_the_plain_steps(corpus, tmp_path):
    """DeepSpeed (one gloo rank, ZeRO-3: parameters gathered again for the recomputation)."""
    runs = {"plain": [], "ckpt": ["train.activation_checkpointing=true"]}
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    for run, extra in runs.items():
        path = loop_config(corpus, tmp_path, run)
        layout = ["parallel.engine=deepspeed", "parallel.zero_stage=3", *extra]
        command = [sys.executable, str(REPO / "launch/train.py"), "--config", str(path), *layout]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert_same_records(records(tmp_path / "ckpt"), records(tmp_path / "plain"))
