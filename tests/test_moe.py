"""Sparse MoE FFN (`moe/`): dispatch vs a per-token reference, capacity dropping, balance
losses, loss-free bias, options, parameter tags, cost counts and metrics."""

from __future__ import annotations

import ast
import copy
import math
import pathlib

import pytest
import torch

import moe
from moe import MoE, MoEOptions, check_options
from moe.balance import switch_aux_loss, z_loss
from moe.dispatch import plan
from moe.experts import Experts


def mlp(x, w_in, w_out, activation, b_in=None, b_out=None):
    h = x @ w_in if b_in is None else x @ w_in + b_in
    if activation == "gelu":
        a = torch.nn.functional.gelu(h)
    else:
        gate, up = h.chunk(2, dim=-1)
        a = torch.nn.functional.silu(gate) * up
    return a @ w_out if b_out is None else a @ w_out + b_out


def shared_reference(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """The fused shared MLP, taken apart into n_shared MLPs of the expert width and summed
    (their output biases sum to the one fused output bias)."""
    s, h, act = layer.shared, layer.hidden, layer.options.activation
    out = torch.zeros_like(x) if s.b_out is None else s.b_out.expand_as(x)
    for i in range(layer.options.n_shared):
        cols = torch.arange(i * h, (i + 1) * h)
        if act == "swiglu":  # [gate | up] halves, each n_shared * h wide
            cols = torch.cat([cols, cols + layer.options.n_shared * h])
        b_in = None if s.b_in is None else s.b_in[cols]
        out = out + mlp(x, s.w_in[:, cols], s.w_out[i * h : (i + 1) * h], act, b_in)
    return out


def reference(layer: MoE, x: torch.Tensor, keep=None) -> torch.Tensor:
    """For each token: sum over its chosen (and kept) experts of gate * expert(token)."""
    r = layer.router(x)
    ex = layer.experts
    rows = []
    for t in range(x.shape[0]):
        y = torch.zeros_like(x[t])
        for j in range(layer.options.top_k):
            if keep is not None and (t, j) not in keep:
                continue
            e = int(r.indices[t, j])
            b_in = None if ex.b_in is None else ex.b_in[e]
            b_out = None if ex.b_out is None else ex.b_out[e]
            y = y + r.gates[t, j] * mlp(x[t], ex.w_in[e], ex.w_out[e], ex.activation, b_in, b_out)
        rows.append(y)
    out = torch.stack(rows)
    return out if layer.shared is None else out + shared_reference(layer, x)


def grads(layer: MoE, x: torch.Tensor, out: torch.Tensor, weight: torch.Tensor) -> dict:
    names = [n for n, p in layer.named_parameters()]
    gs = torch.autograd.grad((out * weight).sum(), [x, *layer.parameters()])
    return dict(zip(["x", *names], gs, strict=True))


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("n_shared", [0, 2])
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_dropless_matches_per_token_loop(top_k, n_shared, activation):
    torch.manual_seed(top_k)
    layer = MoE(
        6,
        MoEOptions(n_experts=8, top_k=top_k, n_shared=n_shared, activation=activation),
        bias=activation == "swiglu",
    ).double()
    with torch.no_grad():  # experts 2 and 5 are never chosen: zero-token slices
        layer.router.bias[[2, 5]] = -1e4
        for name, p in layer.named_parameters():
            if name.split(".")[-1] in ("b_in", "b_out"):
                p.normal_(std=0.1)
    x = torch.randn(2, 10, 6, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape
    ref = reference(layer, x.reshape(-1, 6)).reshape(x.shape)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)

    w = torch.randn_like(out)
    got, want = grads(layer, x, out, w), grads(layer, x, ref, w)
    assert got.keys() == want.keys()
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=name)
    assert got["experts.w_in"][[2, 5]].abs().max() == 0
    assert got["router.weight"].abs().max() > 0


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize(
    ("hidden", "zero_gate"),
    [(3, False), (3, True), (5, False)],  # gate at the hidden width (a zero gate), at d
)
def test_routed_experts_gradcheck_with_empty_expert(activation, hidden, zero_gate):
    torch.manual_seed(0)
    ex = moe.Experts(3, 4, hidden, activation, bias=True).double()
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    gates = torch.rand(7, dtype=torch.float64)
    if zero_gate:  # <u, g * a> / g cannot give this row's gate gradient
        gates[5] = 0.0
    gates.requires_grad_()
    tok = torch.tensor([0, 3, 4, 1, 0, 2, 3])  # expert 0: 4 rows, 1: none, 2: 3 rows

    def f(x, gates, *params):
        return ex(x, tok, [4, 0, 3], gates, n_out=6)

    assert torch.autograd.gradcheck(f, (x, gates, *ex.parameters()))
    with pytest.raises(ValueError):
        ex(x, tok, [4, 0, 2], gates)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_grouped_gemm_path_matches_the_per_token_oracle(activation, bias):
    """torch's grouped_mm (opt-in on CPU, the auto choice on CUDA bf16) against the
    per-token reference, values and gradients."""
    torch.manual_seed(0)
    opts = MoEOptions(n_experts=4, top_k=2, activation=activation, expert_matmul="grouped")
    layer = MoE(8, opts, bias=bias)
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(12, 8, requires_grad=True)
    out = layer(x)
    ref = reference(layer, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(out)
    got, want = grads(layer, x, out, w), grads(layer, x, ref, w)
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


def test_grouped_gemm_and_loop_agree_with_an_empty_expert():
    torch.manual_seed(0)
    ex = moe.Experts(3, 8, 8, "swiglu", bias=True, matmul="grouped")
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_()
    x = torch.randn(5, 8, requires_grad=True)
    gates = torch.rand(7, requires_grad=True)
    tok = torch.tensor([0, 3, 4, 1, 0, 2, 3])  # expert 0: 4 rows, 1: none, 2: 3 rows
    results = {}
    for matmul in ("grouped", "loop"):
        ex.matmul = matmul
        out = ex(x, tok, [4, 0, 3], gates, n_out=6)
        inputs = [x, gates, *ex.parameters()]
        results[matmul] = [out, *torch.autograd.grad((out * out).sum(), inputs)]
    for got, want in zip(results["grouped"], results["loop"], strict=True):  # fp32, O(1) values
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert results["grouped"][3][1].abs().max() == 0  # w_in of the empty expert


FITS = dict(
    device_type="cuda",
    capability=(9, 0),
    dtypes=[torch.bfloat16] * 3,
    widths=(16, 64, 32, 16),
    pointers=(0, 256, 4096),
)


@pytest.mark.parametrize(
    "change, fits",
    [
        ({}, True),
        ({"capability": (10, 0)}, True),
        ({"capability": (8, 0)}, False),  # torch loops per group there, with a host sync
        ({"capability": (8, 9)}, False),
        ({"capability": (12, 0)}, False),
        ({"device_type": "cpu", "capability": None}, False),
        ({"dtypes": [torch.bfloat16, torch.float16, torch.bfloat16]}, False),
        ({"dtypes": [torch.float32] * 3}, False),
        ({"widths": (16, 60, 32, 16)}, False),
        ({"pointers": (0, 256 + 8, 4096)}, False),
    ],
)
def test_auto_takes_grouped_gemm_only_where_cuda_fuses_it(change, fits):
    assert moe.experts.grouped_mm_fits(**{**FITS, **change}) is fits


def test_a_weight_at_an_odd_offset_of_a_flat_bf16_buffer_takes_the_loop():
    """DeepSpeed's flat bf16 buffer: tiny-moe's w_in sits at an element offset 4 mod 8."""
    flat = torch.zeros(4 + 2 * 16 * 64, dtype=torch.bfloat16)
    w_in = flat[4:].view(2, 16, 64)
    assert w_in.data_ptr() % 16 == 8
    ptrs = (0, w_in.data_ptr(), 4096)
    assert not moe.experts.grouped_mm_fits(**{**FITS, "pointers": ptrs})
    x = torch.zeros(3, 16, dtype=torch.bfloat16)
    assert not moe.experts.use_grouped_mm("auto", x, w_in, w_in.transpose(1, 2))  # CPU
    assert moe.experts.use_grouped_mm("grouped", x, w_in, w_in.transpose(1, 2))


def test_expert_gradient_buffers_are_reused_only_when_free():
    torch.manual_seed(0)
    layer = MoE(8, MoEOptions(n_experts=4, top_k=2, balance="none", z_coef=0.0)).double()
    w = layer.experts.w_in
    x = torch.randn(12, 8, dtype=torch.float64)

    def backward(inputs):
        layer(inputs).pow(2).sum().backward()

    backward(x)
    first, storage = w.grad.clone(), w.grad.data_ptr()
    backward(2 * x)  # accumulation: the live gradient must not be written over
    w.grad, once = None, w.grad
    backward(2 * x)
    assert w.grad.data_ptr() != storage  # the first storage is still held by `once`
    torch.testing.assert_close(once, first + w.grad, rtol=1e-12, atol=0)
    held = w.grad.data_ptr()
    w.grad = once = None
    backward(x)  # nothing holds the last storage any more: it is reused, and right
    assert w.grad.data_ptr() == held
    torch.testing.assert_close(w.grad, first, rtol=1e-12, atol=0)


def test_forward_expert_equals_grouped_slice():
    torch.manual_seed(0)
    ex = moe.Experts(3, 4, 5, "swiglu", bias=True).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    y = ex.forward_grouped(x, [2, 0, 4])
    torch.testing.assert_close(y[:2], ex.forward_expert(0, x[:2]))
    torch.testing.assert_close(y[2:], ex.forward_expert(2, x[2:]))


def test_capacity_drops_by_position_order():
    torch.manual_seed(3)
    opts = MoEOptions(n_experts=4, top_k=2, capacity_factor=0.75, balance="none", z_coef=0.0)
    layer = MoE(6, opts).double().train()
    with torch.no_grad():  # skew the routing so some experts overflow
        layer.router.weight[1] += 0.5
    x = torch.randn(16, 6, dtype=torch.float64)
    cap = math.ceil(2 * 16 / 4 * 0.75)
    assert moe.capacity(16, 4, 2, 0.75) == cap == 6

    indices = layer.router(x).indices
    used = [0] * 4
    keep = set()
    for t in range(16):  # position order: token, then choice slot
        for j in range(2):
            e = int(indices[t, j])
            if used[e] < cap:
                keep.add((t, j))
            used[e] += 1
    dropped = 32 - len(keep)
    assert dropped > 0

    p = plan(indices, 4, cap)
    assert {(int(s) // 2, int(s) % 2) for s in p.slot_idx} == keep
    assert p.dropped == dropped and sum(p.counts) == len(keep)
    assert p.routed.tolist() == used

    x.requires_grad_(True)
    out = layer(x)
    ref = reference(layer, x, keep)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(out)
    got, want = grads(layer, x, out, w), grads(layer, x, ref, w)
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=name)
    # The expert-parallel path's whole-tensor gather / combine agree with the fused pass.
    r = layer.router(x)
    ys = layer.experts.forward_grouped(moe.gather(x, p), p.counts)
    torch.testing.assert_close(moe.combine(ys, r.gates, p, 16), out, rtol=1e-12, atol=1e-12)
    fully_dropped = [t for t in range(16) if (t, 0) not in keep and (t, 1) not in keep]
    for t in fully_dropped:
        assert out[t].abs().max() == 0  # the token passes through the residual only
    assert layer.pop_metrics()["dropped_frac"] == pytest.approx(dropped / 32)


def test_aux_and_z_loss_hand_values():
    ln3 = math.log(3.0)
    logits = torch.tensor([[0.0, ln3], [ln3, 0.0], [ln3, 0.0]], dtype=torch.float64)
    probs = logits.softmax(-1)  # [.25, .75], [.75, .25], [.75, .25]
    indices = probs.argmax(-1, keepdim=True)  # experts 1, 0, 0
    # f = [2/3, 1/3]; P = [7/12, 5/12]; aux = 2 * (2/3 * 7/12 + 1/3 * 5/12) = 19/18
    assert switch_aux_loss(probs, indices, 2).item() == pytest.approx(19 / 18)
    # logsumexp = ln(1 + 3) = ln 4 for every token
    assert z_loss(logits).item() == pytest.approx(math.log(4.0) ** 2)
    uniform = torch.full((4, 4), 0.25, dtype=torch.float64)
    assert switch_aux_loss(uniform, torch.arange(4).view(4, 1), 4).item() == pytest.approx(1.0)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_layer_aux_loss_value_and_gradient(score):
    torch.manual_seed(0)
    opts = MoEOptions(n_experts=4, top_k=2, score=score, aux_coef=0.3, z_coef=0.2)
    layer = MoE(8, opts).double()
    x = torch.randn(12, 8, dtype=torch.float64)
    layer(x)
    r = layer.router(x)
    probs = r.scores / r.scores.sum(-1, keepdim=True)
    want = 0.3 * switch_aux_loss(probs, r.indices, 4) + 0.2 * z_loss(r.logits)
    torch.testing.assert_close(layer.aux_loss, want)
    layer.aux_loss.backward()
    assert layer.router.weight.grad.abs().max() > 0
    assert layer.experts.w_in.grad is None

    none = MoE(8, MoEOptions(n_experts=4, balance="loss_free", z_coef=0.0)).double()
    none(x)
    assert none.aux_loss.item() == 0.0


def test_loss_free_bias_changes_selection_not_gates():
    torch.manual_seed(0)
    router = moe.Router(8, 4, "softmax", top_k=2, renormalize=False).double()
    x = torch.randn(20, 8, dtype=torch.float64)
    before = router(x)
    router.bias[3] = 10.0
    after = router(x)
    assert (after.indices[:, 0] == 3).all() and not (before.indices == 3).all()
    torch.testing.assert_close(after.scores, before.scores)
    torch.testing.assert_close(after.gates, after.scores.gather(1, after.indices))


def test_loss_free_balancing_reduces_imbalance():
    torch.manual_seed(0)
    opts = MoEOptions(n_experts=8, top_k=1, balance="loss_free", bias_rate=0.002, z_coef=0.0)
    layer = MoE(16, opts).train()
    u = torch.nn.functional.normalize(torch.randn(16), dim=0)
    with torch.no_grad():
        layer.router.weight[0] += 0.5 * u  # inputs lean towards u: expert 0 takes ~all
    imbalance = []
    for _ in range(100):
        with torch.no_grad():
            layer(torch.randn(256, 16) + 2 * u)
        layer.update_bias()
        m = layer.pop_metrics()
        imbalance.append(m["imbalance"])
    assert imbalance[0] > 7.0  # 8.0 = every token on one expert
    last = imbalance[-10:]
    assert sum(last) / 10 < 2.0 and max(last) < 2.5
    assert m["bias_norm"] > 0 and layer.router.bias[0] < 0


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"top_k": 9}, "top_k"),
        ({"aux_coef": -0.1}, "aux_coef"),
        ({"z_coef": -1.0}, "z_coef"),
        ({"bias_rate": -1.0}, "bias_rate"),
        ({"capacity_factor": 0.0}, "capacity_factor"),
        ({"capacity_factor": -1.0}, "capacity_factor"),
    ],
)
def test_check_options_names_the_field(kw, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        check_options(MoEOptions(**kw))
    with pytest.raises(ValueError, match=f"^{field}:"):
        MoE(8, MoEOptions(**kw))


def test_router_jitter_sigmoid_and_renormalisation():
    torch.manual_seed(0)
    router = moe.Router(8, 6, "sigmoid", top_k=3, renormalize=True, jitter=0.2).double()
    x = torch.randn(10, 8, dtype=torch.float64)
    a, b = router(x), router(x)
    assert not torch.equal(a.logits, b.logits)  # training: multiplicative input noise
    torch.testing.assert_close(a.gates.sum(-1), torch.ones(10, dtype=torch.float64))
    router.eval()
    clean = router(x)
    torch.testing.assert_close(clean.logits, x @ router.weight.T)
    torch.testing.assert_close(clean.scores, clean.logits.sigmoid())
    top = clean.scores.topk(3).values
    torch.testing.assert_close(clean.gates, top / top.sum(-1, keepdim=True))


def test_single_rank_never_touches_torch_distributed(monkeypatch):
    import torch.distributed as dist

    def boom(*args, **kwargs):
        raise AssertionError("torch.distributed used by a layer with its experts whole")

    for name in ("is_initialized", "get_world_size", "get_rank", "all_to_all_single"):
        monkeypatch.setattr(dist, name, boom)
    layer = MoE(8, MoEOptions(n_experts=4, top_k=2, n_shared=1)).train()
    layer(torch.randn(2, 3, 8)).sum().backward()
    assert layer(torch.randn(0, 8)).shape == (0, 8)  # an empty batch is fine too


def test_sharding_experts_without_distributed_is_refused():
    layer = MoE(8, MoEOptions(n_experts=4))  # built whole: runs in one process
    assert layer(torch.randn(3, 8)).shape == (3, 8)
    with pytest.raises(ValueError, match="torch.distributed initialised"):
        layer.shard_experts(None)


def fake_group(monkeypatch, size: int, rank: int) -> object:
    """An expert group of `size` ranks as torch.distributed would report it, without one."""
    import torch.distributed as dist

    group = object()
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda g=None: size if g is group else 1)
    monkeypatch.setattr(dist, "get_rank", lambda g=None: rank if g is group else 0)
    return group


def test_shard_experts_takes_the_size_from_the_group(monkeypatch):
    layer = MoE(8, MoEOptions(n_experts=4))
    with pytest.raises(ValueError, match="^n_experts: 4 is not divisible by .* 3 ranks"):
        layer.shard_experts(fake_group(monkeypatch, 3, 0))
    assert layer.experts.n_local == 4 and isinstance(layer.dispatcher, moe.LocalDispatch)
    group = fake_group(monkeypatch, 2, 1)
    layer.shard_experts(group)
    assert (layer.experts.n_local, layer.experts.first) == (2, 2)
    assert isinstance(layer.dispatcher, moe.AllToAllDispatch) and layer.dispatcher.group is group


def test_update_bias_sums_the_load_over_the_balance_group_only(monkeypatch):
    import torch.distributed as dist

    reduced = []

    def all_reduce(t, group=None):
        reduced.append(group)
        t.mul_(2)  # as if a second replica had routed the same load

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    torch.manual_seed(0)
    layer = MoE(8, MoEOptions(n_experts=4, top_k=1, balance="loss_free")).train()
    assert layer.balance_group is None
    x = torch.randn(16, 8)
    layer(x)
    layer.update_bias()  # this process alone: no collective
    assert reduced == []
    alone = layer.router.bias.clone()
    layer.router.bias.zero_()
    layer.balance_group = group = object()
    layer(x)
    layer.update_bias()
    assert reduced == [group]
    torch.testing.assert_close(layer.router.bias, alone)  # the sign of a doubled load


def test_shard_keeps_the_slice_of_the_whole_init():
    torch.manual_seed(0)
    whole = Experts(4, 8, 16, bias=True)
    torch.manual_seed(0)
    split = Experts(4, 8, 16, bias=True)
    split.shard(2, 1)
    assert (split.n_local, split.first) == (2, 2)
    for name, p in split.named_parameters():
        assert torch.equal(p, getattr(whole, name)[2:]), name
    with pytest.raises(ValueError, match="already sharded"):
        split.shard(2, 0)
    with pytest.raises(ValueError, match="cannot split 4 experts as rank 0 of 3"):
        Experts(4, 8, 16).shard(3, 0)


def test_expert_parameters():
    layer = MoE(8, MoEOptions(n_experts=4, n_shared=1), bias=True)
    assert layer.router.weight.dtype == torch.float32
    assert layer.to(torch.bfloat16).router.bias.dtype == torch.float32  # holds small updates
    # Each expert is drawn independently.
    w = layer.experts.w_in
    assert not torch.equal(w[0], w[1])
    assert 0.015 < w.std().item() < 0.025


@pytest.mark.parametrize(
    ("activation", "flops", "params"),
    [
        # d=8, E=4, k=2, h=16, 1 shared. router 8*4 params, 2*8*4 = 64 flops.
        # gelu expert: 8*16 + 16*8 = 256 params, 2*256 = 512 flops.
        ("gelu", 64 + 3 * 512, 32 + 3 * 256),
        # swiglu expert: 8*32 + 16*8 = 384 params, 768 flops.
        ("swiglu", 64 + 3 * 768, 32 + 3 * 384),
    ],
)
def test_flops_and_active_params_hand_counts(activation, flops, params):
    opts = MoEOptions(
        n_experts=4, top_k=2, n_shared=1, expert_hidden_mult=2.0, activation=activation
    )
    layer = MoE(8, opts)
    assert layer.hidden == 16
    assert layer.flops_per_token() == flops
    assert layer.active_params() == params
    expert = (params - 32) // 3
    total = sum(p.numel() for p in layer.parameters())
    assert total == 32 + 5 * expert  # 4 routed + 1 shared


def test_metrics_on_small_example():
    torch.manual_seed(0)
    layer = MoE(8, MoEOptions(n_experts=4, top_k=2, aux_coef=0.1, z_coef=0.01)).train()
    xs = [torch.randn(10, 8), torch.randn(6, 8)]
    load = torch.zeros(4, dtype=torch.long)
    ent, aux, z = [], [], []
    for x in xs:
        layer(x)
        r = layer.router(x)
        load += torch.bincount(r.indices.reshape(-1), minlength=4)
        p = r.scores
        ent.append(-(p * p.log()).sum(-1).mean().item())
        aux.append(switch_aux_loss(p, r.indices, 4).item())
        z.append(z_loss(r.logits).item())
    m = layer.pop_metrics()
    assert set(m) == {"load", "imbalance", "load_cv", "dropped_frac", "router_entropy"} | {
        "aux_loss",
        "z_loss",
    }
    assert m["load"] == load.tolist() and sum(m["load"]) == 32
    lf = load.double()
    assert m["imbalance"] == pytest.approx((lf.max() / lf.mean()).item())
    assert m["load_cv"] == pytest.approx((lf.std(unbiased=False) / lf.mean()).item())
    assert m["dropped_frac"] == 0.0
    assert m["router_entropy"] == pytest.approx(sum(ent) / 2)
    assert m["aux_loss"] == pytest.approx(sum(aux) / 2)
    assert m["z_loss"] == pytest.approx(sum(z) / 2)
    assert layer.pop_metrics() == {}
    layer.eval()(xs[0])  # evaluation does not count
    assert layer.pop_metrics() == {}


def test_update_bias_is_noop_without_loss_free():
    layer = MoE(8, MoEOptions(n_experts=4)).train()
    layer(torch.randn(5, 8))
    layer.update_bias()
    assert layer.router.bias.abs().max() == 0


def test_autocast_bf16_keeps_router_fp32():
    torch.manual_seed(0)
    layer = MoE(8, MoEOptions(n_experts=4, top_k=2, n_shared=1))
    x = torch.randn(3, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        r = layer.router(x.reshape(-1, 8))
    assert out.dtype == torch.bfloat16 and r.logits.dtype == torch.float32
    out.float().sum().backward()
    assert layer.experts.w_in.grad.dtype == torch.float32


def test_moe_package_does_not_import_leviathan():
    for path in pathlib.Path(moe.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] == "leviathan" for n in names), path


def test_fp16_gate_gradient_keeps_its_digits_when_gate_times_activation_is_subnormal():
    """Small gates times small activations fall below fp16's normal range (6.1e-5): the
    gate gradient must not be read back from that product."""
    torch.manual_seed(0)
    ex = moe.Experts(2, 16, 8, "gelu")  # hidden 8 <= d 16: the gate applies to a
    with torch.no_grad():
        ex.w_in.normal_(0, 0.005)  # a ~ 1e-2, g * a ~ 1e-6: subnormal in fp16
        ex.w_out.normal_(0, 1.0)
    x = torch.randn(6, 16)
    tok, counts = torch.tensor([0, 1, 2, 3, 4, 5]), [3, 3]
    gates = torch.full((6,), 1e-4)
    dy = torch.randn(6, 16)

    def gate_grad(dtype):
        experts = copy.deepcopy(ex).to(dtype)
        g = gates.to(dtype).requires_grad_()
        out = experts(x.to(dtype), tok, counts, g)
        (out * dy.to(dtype)).sum().backward()
        return g.grad.double()

    want = gate_grad(torch.float64)
    torch.testing.assert_close(gate_grad(torch.float16), want, rtol=2e-2, atol=0)
