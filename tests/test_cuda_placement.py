"""CUDA placement on a CPU-only build.

What ZeRO-3's `zero.Init` does to device defaults: it gives every tensor factory called
without `device=` the rank's GPU. Here the second device is `meta` (tests/placement.py): a
module built under those factories and materialised on the CPU keeps, on `meta`, whatever
it made without naming a device, and the first op that meets it with a CPU tensor raises.

Every mixer on CUDA: the model runs as fake CUDA tensors (tests/fake_cuda.py), where a
tensor made without naming a device is a CPU tensor that raises where it meets the model's.

Each check has a self-test that a planted `torch.arange(T)` without a device is caught.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fake_cuda import GuardFreeBindings, cuda_autocast, fake_cuda, materialise
from placement import MixedDevices, single_device, zero_init_factories
from test_moe_model import moe_model
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError

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
    """Defect 3: one bf16 gloo rank whose zero.Init aims unnamed tensors at `meta` (a GPU
    rank's CUDA generator, on a CPU build) still starts from the eager model's values cast
    to bf16, and keeps the router's balancing bias in fp32 (bf16 rounds its updates away)."""
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


# The fake-CUDA tier (tests/fake_cuda.py): every mixer and position scheme, built on `meta`
# as `Leviathan(cfg).cuda()` would be on a GPU, materialised as fake CUDA tensors, runs its
# forward and cached generation in fp32, with fp16 weights and under bf16 autocast: its
# CUDA branches (SDPA with a narrower V, ...) run, and a tensor made without naming a device
# is a CPU tensor that raises where it meets the model's. Fake tensors hold no values: MoE's
# split sizes need them (`.tolist()`), so the FFN is dense, and generation is greedy over
# whatever argmax returns. No backward (fake_cuda.py, shim 1).
PRECISIONS = ("fp32", "fp16", "bf16_autocast")
MIXER_CASES = [
    (kind, positions, precision)
    for kind, mixer in MIXERS.items()
    for positions in ("learned", "rope", "none")
    if positions != "rope" or mixer.refuses_rope is None
    for precision in PRECISIONS
]


def dense_model_on_meta(kind: str, positions: str, dtype: torch.dtype) -> Leviathan:
    """A small dense model built on `meta` in `dtype` (cast there: fake_cuda.py)."""
    model = {"vocab_size": 50, "block_size": 16, "n_layer": 2, "n_head": 2, "d_model": 16}
    raw = {"model": {**model, "positions": positions, "mixer": {"kind": kind}}}
    cfg = config_from_dict({**raw, "train": {"seq_len": 16}}).model
    with torch.device("meta"):
        return Leviathan(cfg).to(dtype)


def precision(name: str) -> tuple[torch.dtype, contextlib.AbstractContextManager, torch.dtype]:
    """(weights' dtype, the context the model runs in, the logits' dtype) of a case."""
    if name == "bf16_autocast":
        return torch.float32, cuda_autocast(torch.bfloat16), torch.bfloat16
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[name]
    return dtype, contextlib.nullcontext(), dtype


@pytest.mark.parametrize("kind, positions, precision_name", MIXER_CASES)
def test_every_mixer_runs_forward_on_fake_cuda(kind: str, positions: str, precision_name: str):
    """The forward on CUDA, in the logits' dtype that precision gives on a GPU."""
    dtype, context, logits_dtype = precision(precision_name)
    model = dense_model_on_meta(kind, positions, dtype)
    with fake_cuda():
        materialise(model)
        with context:
            logits, _ = model(torch.zeros(2, 8, dtype=torch.long, device="cuda"))
    assert (logits.device.type, logits.dtype, logits.shape) == ("cuda", logits_dtype, (2, 8, 50))


@pytest.mark.parametrize("kind, positions, precision_name", MIXER_CASES)
def test_every_mixer_generates_with_its_cache_on_fake_cuda(
    kind: str, positions: str, precision_name: str
):
    """Prefill of 4 positions, then 3 one-token steps against the cache."""
    dtype, context, _ = precision(precision_name)
    model = dense_model_on_meta(kind, positions, dtype).eval()
    with fake_cuda():
        materialise(model)
        prompt = torch.zeros(2, 4, dtype=torch.long, device="cuda")
        with context:
            out = model.generate(prompt, 4, temperature=0.0, use_cache=True)
    assert model.can_cache() and (out.device.type, out.shape) == ("cuda", (2, 8))


@pytest.mark.parametrize("use", ["forward", "generate"])
def test_fake_cuda_catches_a_planted_tensor_without_a_device(
    monkeypatch: pytest.MonkeyPatch, use: str
):
    """`torch.arange(C)` without a device, inside the first mixer, is a CPU tensor."""
    model = dense_model_on_meta("dot", "learned", torch.float32).eval()
    with fake_cuda():
        materialise(model)
        mixer = model.blocks[0].mixer
        forward = mixer.forward
        monkeypatch.setattr(
            mixer, "forward", lambda x, cache=None: forward(x, cache) + torch.arange(x.shape[-1])
        )
        idx = torch.zeros(2, 4, dtype=torch.long, device="cuda")
        with pytest.raises(FakeTensorDeviceMismatchError, match="cuda:0 and cpu"):
            model(idx) if use == "forward" else model.generate(idx, 2, temperature=0.0)


INDEXES = [
    (Ellipsis, slice(None, 3)),
    (slice(None), None, 1),
    (slice(1, None), [0, 2]),
    (slice(None), -1, slice(None)),
    (slice(None), slice(None), slice(-2, None, 2)),
    (torch.tensor([2, 0]),),
]


@pytest.mark.parametrize("index", INDEXES, ids=str)
def test_the_rerouted_indexing_is_torchs(index: tuple):
    """fake_cuda.py's guard-free indexing gives what Tensor.__getitem__/__setitem__ give."""
    x = torch.arange(60.0).view(3, 4, 5)
    want, got = x.clone(), x.clone()
    with GuardFreeBindings():
        view = x[index]
        got[index] = -view
    want[index] = -x[index]
    assert torch.equal(view, x[index]) and torch.equal(got, want)
