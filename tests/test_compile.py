"""`train.compile`: compiled steps equal eager ones, recompiles bounded, generation works."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import read_metrics, small_config  # tests/ is on the path under pytest
from torch._dynamo.utils import counters

from leviathan.config import Config, config_from_dict, save_config
from leviathan.errors import ConfigError
from leviathan.model import Leviathan
from leviathan.parallel.activation_checkpointing import apply_activation_checkpointing
from leviathan.parallel.torch_compile import apply_compile, has_cxx_compiler, resolve_compile
from leviathan.parallel.torch_engine import TorchEngine
from leviathan.parallel.world import World
from leviathan.train.trainer import train

REPO = Path(__file__).resolve().parents[1]
VOCAB, T, B, STEPS = 64, 16, 4, 4
MIXERS = {
    "dot": {"kind": "dot"},
    "token_xcorr": {"kind": "token_xcorr", "window_q": 3, "window_k": 3, "rank": 2},
    "involution": {"kind": "involution", "kernel": 3},
    "inv_xcorr": {"kind": "inv_xcorr", "window_q": 3, "window_k": 3, "rank": 2},
}
MOE = {"kind": "moe", "n_experts": 4, "top_k": 2, "expert_hidden_mult": 1.0}


def tiny_model(mixer: dict, ffn: dict, compiled: bool, checkpointed: bool = False) -> Leviathan:
    nowhere = Path("unused")
    model_keys = {"vocab_size": VOCAB, "dropout": 0.0, "mixer": mixer, "ffn": ffn}
    cfg = small_config(nowhere, nowhere, nowhere, model=model_keys)
    torch.manual_seed(0)
    model = Leviathan(cfg.model)
    if compiled:
        assert apply_compile(model, T) == 2
        assert apply_compile(model, T) == 0  # once is enough
    if checkpointed:
        apply_activation_checkpointing(model)
    return model


def frames_compiled() -> int:
    """Frames dynamo has compiled so far (each recompile is one more)."""
    return counters["frames"]["ok"]


def run_steps(model: Leviathan) -> tuple[list[float], list[int]]:
    """Losses of STEPS steps and, after each, how many frames dynamo had compiled."""
    engine = TorchEngine(model, Config(), World("torch", 0, 1, torch.device("cpu")))  # AdamW 0.1
    data = torch.Generator().manual_seed(1)
    losses, frames = [], []
    for _ in range(STEPS):
        tokens = torch.randint(0, VOCAB, (2, B, T + 1), generator=data)
        micro = [(t[:, :-1], t[:, 1:]) for t in tokens]
        losses.append(engine.train_step(micro, lr=1e-2).loss)
        frames.append(frames_compiled())
    return losses, frames


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize(
    "mixer, ffn, checkpointed",
    [
        ("dot", "dense", False),
        ("token_xcorr", "dense", False),
        ("token_xcorr", "moe", False),  # mixer compiled, the MoE FFN eager
        ("token_xcorr", "dense", True),  # activation checkpointing around compiled blocks
        ("involution", "dense", False),
        ("inv_xcorr", "dense", False),
    ],
)
def test_compiled_losses_equal_eager_and_compile_once(mixer, ffn, checkpointed):
    ffn_keys = MOE if ffn == "moe" else {"kind": "dense"}
    eager, _ = run_steps(tiny_model(MIXERS[mixer], ffn_keys, False, checkpointed))
    assert frames_compiled() == 0
    compiled, frames = run_steps(tiny_model(MIXERS[mixer], ffn_keys, True, checkpointed))
    assert compiled == pytest.approx(eager, abs=1e-4)
    assert frames[0] > 0  # it did compile
    assert frames[1:] == [frames[1]] * (STEPS - 1)  # nothing recompiled after step 2
    assert not counters["graph_break"]  # one graph per compiled frame


@pytest.mark.slow
def test_compiled_model_generates_as_eager_with_cache():
    eager = tiny_model(MIXERS["token_xcorr"], {"kind": "dense"}, False).eval()
    compiled = tiny_model(MIXERS["token_xcorr"], {"kind": "dense"}, True).eval()
    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(3))
    want = eager.generate(prompt, 20, temperature=0)
    assert torch.equal(compiled.generate(prompt, 20, temperature=0), want)
    assert torch.equal(compiled.generate(prompt, 20, temperature=0, use_cache=False), want)
    with torch.no_grad():  # a full window (T positions) takes the compiled path
        window = torch.randint(0, VOCAB, (2, T))
        torch.testing.assert_close(compiled(window)[0], eager(window)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_train_compiled_completes_with_bounded_recompiles(corpus, tmp_path):
    cfg = small_config(
        corpus,
        tmp_path / "data",
        tmp_path / "run",
        model={"mixer": {"kind": "dot"}},
        train={"compile": True, "max_steps": 6, "eval_interval": 2, "eval_tokens": 400},
    )
    lines = []
    summary = train(cfg, log=lines.append)
    assert any("compiled True" in line for line in lines)
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == list(range(1, 7))
    assert summary.val_bpc is not None and summary.sample
    # one frame (both blocks share Block.forward's) for training and one per eval batch
    # shape at seq_len: the periodic eval's (12 windows), the final eval's full 16 and its
    # last, shorter batch: 4 for any number of steps and evals (3 evals here); the final
    # partial window (fewer positions) runs eager
    assert frames_compiled() <= 4
    assert not counters["graph_break"]


def test_compile_key_takes_auto_true_false():
    def parsed(value):
        return config_from_dict({"train": {"compile": value}}).train.compile

    assert parsed("auto") == "auto" and parsed(True) is True and parsed(False) is False
    assert config_from_dict({}).train.compile == "auto"
    for wrong in ("yes", 1, None):
        with pytest.raises(ConfigError, match="train.compile"):
            parsed(wrong)


def test_auto_rule():
    cpu, cuda, long, short = torch.device("cpu"), torch.device("cuda"), 1e14, 1e9
    assert resolve_compile("auto", cuda, "dot", short) is True
    assert resolve_compile(False, cuda, "token_xcorr", long) is False
    assert resolve_compile(True, cpu, "dot", short) is True
    assert resolve_compile("auto", cpu, "dot", long) is False  # no faster compiled
    assert resolve_compile("auto", cpu, "token_xcorr", short) is False  # does not pay back
    assert resolve_compile("auto", cpu, "token_xcorr", long) is has_cxx_compiler()
    assert resolve_compile("auto", cpu, "involution", long) is has_cxx_compiler()
    assert resolve_compile("auto", cpu, "inv_xcorr", long) is False  # measured: no faster


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])
def test_deepspeed_engine_runs_compiled_with_eager_losses(corpus, tmp_path, stage):
    """One DeepSpeed rank (gloo, CPU) with train.compile=true: the torch engine's eager losses."""
    keys = {"compile": False, "max_steps": 4, "eval_interval": 4, "eval_tokens": 256}
    data = tmp_path / "data"
    model = {"dropout": 0.0, "mixer": {"kind": "dot"}}
    eager_cfg = small_config(corpus, data, tmp_path / "eager", model=model, train=keys)
    train(eager_cfg, log=lambda _: None)
    config = tmp_path / "ds.yaml"
    save_config(eager_cfg, config)
    cmd = [
        sys.executable,
        str(REPO / "launch/train.py"),
        "--config",
        str(config),
        f"run.dir={tmp_path / 'ds'}",
        "parallel.engine=deepspeed",
        f"parallel.zero_stage={stage}",
        "train.compile=true",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "compiled True" in done.stdout + done.stderr
    eager = [r["train_loss"] for r in read_metrics(tmp_path / "eager")]
    compiled = [r["train_loss"] for r in read_metrics(tmp_path / "ds")]
    assert compiled == pytest.approx(eager, abs=2e-4)  # test_distributed's tolerance
