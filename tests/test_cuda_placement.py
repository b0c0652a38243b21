"""CUDA placement on a CPU-only build: what ZeRO-3's `zero.Init` does to device defaults.

zero.Init gives every tensor factory called without `device=` the rank's GPU. Here the
second device is `meta` (tests/placement.py): a model built under those factories and
materialised on the CPU keeps, on `meta`, whatever it made without naming a device, and
the first op that meets it with a CPU tensor raises. Each check has a self-test that a
planted `torch.arange(T)` without a device is caught.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from placement import MixedDevices, single_device, zero_init_factories
from test_moe_model import moe_model

from leviathan.config import config_from_dict
from leviathan.model import MIXERS, Leviathan
from leviathan.model.gpt import init_parameters
from leviathan.parallel.activation_checkpointing import apply_activation_checkpointing
from leviathan.parallel.deepspeed.zero3 import gathered
from moe import MoE, MoEOptions

ROUTING = {
    "aux": {},
    "loss_free": {"balance": "loss_free"},
    "capacity_sequence": {"capacity_factor": 1.0},
    "capacity_batch": {"capacity_factor": 1.0, "capacity_policy": "batch"},
    "sigmoid_shared": {"score": "sigmoid", "n_shared": 1, "z_coef": 0.0},
    "swiglu_grouped": {"activation": "swiglu", "expert_matmul": "grouped"},
}


def built_as_under_zero_init(build):
    """`build()` with zero.Init's factories aiming at `meta`, materialised on the CPU."""
    torch.manual_seed(0)
    with zero_init_factories("meta"):
        module = build()
    module.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(std=0.02)
    return module


def test_the_check_catches_a_tensor_made_without_a_device():
    with zero_init_factories("meta"):
        planted = torch.arange(8)
    with pytest.raises(MixedDevices), single_device():
        _ = torch.ones(8) + planted


@pytest.mark.parametrize("routing", list(ROUTING))
def test_moe_bookkeeping_names_its_device(routing):
    """Defect 1: the load counter and routing statistics land where zero.Init sends them."""
    opts = MoEOptions(n_experts=4, top_k=2, expert_hidden_mult=1.0, **ROUTING[routing])
    layer = built_as_under_zero_init(lambda: MoE(16, opts))
    x = torch.randn(2, 8, 16, requires_grad=True)
    with single_device():
        (layer(x).sum() + layer.aux_loss).backward()
        layer.update_bias()
        metrics = layer.pop_metrics()
    assert sum(metrics["load"]) == 2 * 8 * 2
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("routing", ["aux", "loss_free", "capacity_sequence"])
def test_moe_model_trains_checkpointed_and_generates_on_one_device(routing):
    model = built_as_under_zero_init(lambda: moe_model(**ROUTING[routing]))
    init_parameters(model)
    apply_activation_checkpointing(model)
    idx = torch.randint(0, 50, (2, 16))
    with single_device():
        model.train()
        _, loss = model(idx, idx)
        (loss + model.aux_loss()).backward()
        model.after_optimizer_step()
        model.pop_layer_metrics()
        model.eval()
        out = model.generate(idx[:, :4], 4, temperature=0.0, use_cache=model.can_cache())
    assert out.shape == (2, 8)


def test_zero3_build_starts_from_the_eager_values_whatever_zero_init_aims_at():
    """Defect 3: one gloo rank whose zero.Init aims unnamed tensors at `meta` (a GPU rank's
    CUDA generator, on a CPU build) still starts from the eager model's values."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MASTER_PORT="29563")
    probe = [sys.executable, str(Path(__file__).with_name("zero3_probe.py"))]
    done = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "SAME VALUES" in done.stdout


def test_replayed_init_draws_in_fp32_on_the_cpu():
    """Defect 3: what init_parameters draws into gathered parameters comes from the CPU
    generator in fp32, as the eager build's, whatever dtype the parameter has, and goes back
    into the parameter as it was. The device half a CPU build cannot show by values: a
    meta parameter has none to copy (the zero3 probe shows the construction's)."""
    param = torch.nn.Parameter(torch.zeros(64, 8, dtype=torch.bfloat16))
    torch.manual_seed(0)
    with gathered([param]):
        assert (param.device.type, param.dtype) == ("cpu", torch.float32)
        torch.nn.init.normal_(param, std=0.02)
    torch.manual_seed(0)
    want = torch.empty(64, 8).normal_(std=0.02).bfloat16()
    assert param.dtype == torch.bfloat16 and torch.equal(param.detach(), want)


# The fake-CUDA tier, and why it runs on `meta`: FakeTensorMode on this CPU build makes
# fake CUDA tensors (empty, mm), but the first op whose kernel takes a CUDA device guard
# (the token embedding) aborts the process ("PyTorch is not linked with support for cuda
# devices", thrown from getDeviceGuardImpl: not catchable); `to_empty(device="cuda")` of
# fake tensors fails in swap_tensors, and autocast("cuda") needs torch.cuda shims. So the
# model lives on `meta` (as `.to("cuda")` would put it on the GPU), its inputs too, and a
# tensor the forward or the cached generation makes without naming a device meets it on
# the CPU and raises. Autocast has no meta kernels: bf16 and fp16 here are the weights'
# dtype. MoE's split sizes need values (`.tolist()`), so the FFN is dense.
MIXER_CASES = [
    (kind, positions, dtype)
    for kind, mixer in MIXERS.items()
    for positions in ("learned", "rope")
    if positions == "learned" or mixer.refuses_rope is None
    for dtype in (torch.float32, torch.float16, torch.bfloat16)
]


def dense_model_on_meta(kind: str, positions: str, dtype: torch.dtype) -> Leviathan:
    model = {"vocab_size": 50, "block_size": 16, "n_layer": 2, "n_head": 2, "d_model": 16}
    raw = {"model": {**model, "positions": positions, "mixer": {"kind": kind}}}
    cfg = config_from_dict({**raw, "train": {"seq_len": 16}}).model
    with torch.device("meta"):
        return Leviathan(cfg).to(dtype)


@pytest.mark.parametrize("kind, positions, dtype", MIXER_CASES)
def test_every_mixer_runs_and_generates_on_the_models_device(kind, positions, dtype):
    model = dense_model_on_meta(kind, positions, dtype)
    idx = torch.zeros(2, 8, dtype=torch.long, device="meta")
    with single_device():
        logits, _ = model(idx)
        model.eval()
        out = model.generate(idx[:, :4], 4, temperature=0.0)
    assert logits.dtype == dtype and out.shape == (2, 8)


def test_the_meta_tier_catches_a_planted_tensor_without_a_device(monkeypatch):
    model = dense_model_on_meta("dot", "learned", torch.float32)
    norm = model.norm.forward
    monkeypatch.setattr(model.norm, "forward", lambda x: norm(x) + torch.arange(x.shape[-1]))
    with pytest.raises(MixedDevices), single_device():
        model(torch.zeros(2, 8, dtype=torch.long, device="meta"))
