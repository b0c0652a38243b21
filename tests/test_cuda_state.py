"""What a GPU run keeps and reads back, checked on a CPU build: the CUDA generator saved is
the training device's, AdamW's state is read onto the CPU, fp16 has an MFU peak."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from leviathan.config import config_from_dict
from leviathan.errors import ConfigError
from leviathan.model import Leviathan
from leviathan.parallel.torch_engine import TorchEngine
from leviathan.parallel.world import World, cuda_device
from leviathan.train import checkpoint_state, mfu

REPO = Path(__file__).resolve().parents[1]


def test_the_cuda_generator_kept_is_the_training_devices(monkeypatch):
    """Not the current device's: a rank training on cuda:1 with cuda:0 current."""
    seen = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": seen.append(device))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": seen.append(device))
    device = torch.device("cuda:1")
    state = checkpoint_state.rng_state(device)
    checkpoint_state.set_rng_state(state, device)
    assert seen == [device, device]
    assert "cuda" not in checkpoint_state.rng_state(torch.device("cpu"))


def test_optimizer_state_is_read_onto_the_cpu(tmp_path, monkeypatch):
    """AdamW's `step` stays a CPU tensor: the optimizer file is mapped to the CPU, the
    model's to the training device."""
    cfg = config_from_dict({"model": {"vocab_size": 20, "n_layer": 1, "d_model": 8, "n_head": 2}})
    engine = TorchEngine(Leviathan(cfg.model), cfg, World("torch", 0, 1, torch.device("cpu")))
    x = torch.randint(0, 20, (1, 8))
    engine.train_step([(x, x)], lr=1e-3)
    engine.save(tmp_path)
    mapped, load = {}, torch.load

    def spy(path, map_location=None, **kwargs):
        mapped[path.name] = torch.device(map_location)
        return load(path, map_location="cpu", **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    engine.device = torch.device("cuda:0")  # what it would be on a GPU
    engine.load(tmp_path)
    assert mapped == {"model.pt": torch.device("cuda:0"), "optimizer.pt": torch.device("cpu")}
    steps = [s["step"] for s in engine.optimizer.state.values()]
    assert steps and all(s.device.type == "cpu" for s in steps)


def test_fp16_has_the_tensor_core_peak_of_bf16():
    for name in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H200", "NVIDIA A100"):
        assert mfu.lookup_peak(name, "fp16") == mfu.lookup_peak(name, "bf16") is not None


def test_a_fraction_of_a_gpu_per_worker_is_refused_naming_the_option(capsys):
    spec = importlib.util.spec_from_file_location("train_moe", REPO / "launch/train_moe.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    parse_args = job.parse_args
    assert parse_args(["--gpus-per-worker", "2"]).gpus_per_worker == 2
    assert parse_args([]).gpus_per_worker == 0
    with pytest.raises(SystemExit):
        parse_args(["--gpus-per-worker", "0.5"])
    assert "--gpus-per-worker: must be 0 (CPU workers) or at least 1" in capsys.readouterr().err


def test_a_local_rank_past_the_visible_gpus_is_refused():
    assert cuda_device(1, 2) == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="LOCAL_RANK 1: this process sees 1 GPU"):
        cuda_device(1, 1)


class _SkippingDeepSpeed:
    """What train_step sees of a DeepSpeed engine whose fp16 step overflowed (or not)."""

    optimizer = type("Optimizer", (), {"param_groups": [{}]})()

    def __init__(self, applied: bool):
        self.applied = applied

    def train(self):
        pass

    def __call__(self, x, y):
        return None, torch.zeros((), requires_grad=True)

    def backward(self, loss):
        pass

    def step(self):
        pass

    def was_step_applied(self):
        return self.applied

    def get_global_grad_norm(self):
        return None


@pytest.mark.parametrize("applied", [True, False])
def test_the_loss_free_bias_waits_out_a_skipped_fp16_step(applied, monkeypatch):
    from leviathan.parallel.deepspeed import engine as ds_engine

    moved = []
    model = type("Model", (), {})()
    model.aux_loss = lambda: torch.zeros(())
    model.after_optimizer_step = lambda: moved.append(True)
    monkeypatch.setattr(ds_engine.dist, "all_reduce", lambda t: None)
    engine = object.__new__(ds_engine.DeepSpeedEngine)
    engine.model, engine.ds, engine.grad_accum = model, _SkippingDeepSpeed(applied), 1
    engine.device, engine.world_size = torch.device("cpu"), 1
    x = torch.zeros(1, 4, dtype=torch.long)
    engine.train_step([(x, x)], lr=1e-3)
    assert moved == ([True] if applied else [])
