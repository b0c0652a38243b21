"""Causality of the MoE decoder in every routing mode: dropless, and capacity mode with
slots per sequence (the default policy). The batch-pooled policy is shown to be what it
is documented as: not causal, and warned about at evaluation."""

import math

import pytest
import torch

import moe
from leviathan.config import config_from_dict
from leviathan.model import Leviathan

VOCAB, T, B = 61, 24, 4

ROUTING = {
    "dropless": {},
    "capacity": {"capacity_factor": 0.5},
    "capacity-top1-sigmoid": {"capacity_factor": 0.75, "top_k": 1, "score": "sigmoid"},
    "capacity-loss-free-shared": {
        "capacity_factor": 0.5,
        "balance": "loss_free",
        "n_shared": 1,
        "activation": "swiglu",
    },
    "capacity-every-2nd": {"capacity_factor": 0.5, "moe_every": 2},
}


def moe_model(routing: dict, **ffn) -> Leviathan:
    raw = {
        "model": {
            "vocab_size": VOCAB,
            "block_size": T,
            "n_layer": 2,
            "n_head": 2,
            "d_model": 16,
            "mixer": {"kind": "token_xcorr", "window_q": 3, "window_k": 2, "rank": 1},
            "ffn": {"kind": "moe", "n_experts": 4, "top_k": 2, "expert_hidden_mult": 1.0}
            | routing
            | ffn,
        },
        "train": {"seq_len": T},
    }
    torch.manual_seed(0)
    model = Leviathan(config_from_dict(raw).model).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".f", ".g")):  # lag kernels off their delta
                p.add_(0.3 * torch.randn_like(p))
        for ffn_layer in model.sparse_layers():  # overload expert 0 so capacity drops
            ffn_layer.router.weight[0] += 0.4
            if ffn_layer.options.balance == "loss_free":
                ffn_layer.router.bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
    return model.eval()


def dropped_fraction(model: Leviathan, idx: torch.Tensor) -> float:
    model.train()  # metrics are kept for training forwards (dropout is 0: same function)
    model(idx)
    model.eval()
    stats = model.pop_layer_metrics().values()
    return sum(s["dropped_frac"] for s in stats) / len(stats)


@pytest.mark.parametrize("mode", sorted(ROUTING))
def test_later_tokens_in_any_row_leave_earlier_logits_unchanged(mode):
    model = moe_model(ROUTING[mode])
    torch.manual_seed(1)
    idx = torch.randint(0, VOCAB, (B, T))
    if "capacity" in mode:
        assert dropped_fraction(model, idx) > 0.05  # the capacity is really binding
    before, _ = model(idx)
    for t in (0, 7, 15):
        changed = idx.clone()
        changed[:, t + 1 :] = torch.randint(0, VOCAB, (B, T - t - 1))
        after, _ = model(changed)
        # to rounding: a later token changes how many rows an expert's matmul has, and BLAS
        # may then block the sums differently (float64: ~1e-16); a routing leak moves
        # logits by 1e-3 and more (0.74 before causal capacity)
        torch.testing.assert_close(
            before[:, : t + 1], after[:, : t + 1], rtol=0, atol=1e-12, msg=f"position <= {t} moved"
        )
        assert not torch.allclose(before[:, t + 1 :], after[:, t + 1 :])
    # other rows replaced entirely: row 0 is untouched at every position
    others = idx.clone()
    others[1:] = torch.randint(0, VOCAB, (B - 1, T))
    assert torch.equal(model(others)[0][0], before[0])


@pytest.mark.parametrize("mode", sorted(ROUTING))
def test_a_row_alone_equals_the_same_row_in_a_batch(mode):
    model = moe_model(ROUTING[mode])
    torch.manual_seed(2)
    idx = torch.randint(0, VOCAB, (B, T))
    batch, _ = model(idx)
    for row in range(B):
        alone, _ = model(idx[row : row + 1])
        torch.testing.assert_close(alone[0], batch[row], rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", sorted(ROUTING))
def test_generation_equals_full_sequence_scoring(mode):
    model = moe_model(ROUTING[mode])
    torch.manual_seed(3)
    prompt = torch.randint(0, VOCAB, (2, 5))
    out = model.generate(prompt, T - 5, temperature=0)
    full, _ = model(out)
    # greedy: every generated token is the full-sequence argmax at the position before it
    assert torch.equal(full[:, 4:-1].argmax(-1), out[:, 5:])
    for length in range(5, T + 1):  # what generate scored at each step
        prefix, _ = model(out[:, :length])
        torch.testing.assert_close(prefix[:, -1], full[:, length - 1], rtol=0, atol=1e-10)


def test_capacity_is_sized_from_the_configured_sequence_length():
    model = moe_model(ROUTING["capacity"])
    layer = model.sparse_layers()[0]
    assert layer.options.capacity_seq_len == T
    assert layer._capacity(n_tokens=5, seq_len=5) == (moe.capacity(T, 4, 2, 0.5), 5)
    again = moe_model(ROUTING["capacity"], capacity_seq_len=12)  # an explicit value stays
    assert again.sparse_layers()[0].options.capacity_seq_len == 12


def test_batch_policy_is_not_causal_and_warns_at_evaluation():
    model = moe_model({"capacity_factor": 0.5, "capacity_policy": "batch"})
    torch.manual_seed(1)
    idx = torch.randint(0, VOCAB, (B, T))
    with pytest.warns(UserWarning, match="capacity_policy 'batch'"):
        before, _ = model(idx)
    changed = idx.clone()
    changed[:, 12:] = torch.randint(0, VOCAB, (B, T - 12))
    after, _ = model(changed)
    assert not torch.equal(before[:, :12], after[:, :12])  # the documented hazard
    alone, _ = model(idx[B - 1 :])
    assert not torch.allclose(alone[0], before[B - 1])


def brute_force_plan(indices: torch.Tensor, n_experts: int, cap: int, seq_len: int):
    """Kept (token, slot) pairs and dropped counts per position, by walking each sequence."""
    n_tokens, top_k = indices.shape
    keep, drops = set(), [0] * seq_len
    for start in range(0, n_tokens, seq_len):
        used = [0] * n_experts
        for t in range(start, min(start + seq_len, n_tokens)):
            for j in range(top_k):
                e = int(indices[t, j])
                if used[e] < cap:
                    keep.add((t, j))
                else:
                    drops[t - start] += 1
                used[e] += 1
    return keep, drops


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_sequence_plan_and_drops_per_position_match_a_brute_force_walk(top_k):
    torch.manual_seed(top_k)
    n_experts, seq_len, rows = 5, 9, 6
    skew = torch.tensor([3.0, 1.0, 0.0, 0.0, -1.0])
    scores = torch.randn(rows * seq_len, n_experts) + skew
    indices = scores.topk(top_k, dim=-1).indices
    cap = moe.capacity(seq_len, n_experts, top_k, 0.8)
    keep, drops = brute_force_plan(indices, n_experts, cap, seq_len)
    assert sum(drops) > 0

    p = moe.plan(indices, n_experts, cap, group=seq_len)
    assert {(int(s) // top_k, int(s) % top_k) for s in p.slot_idx} == keep
    assert p.dropped == sum(drops) and sum(p.counts) == len(keep)
    experts = indices.reshape(-1)[p.slot_idx]
    assert torch.equal(experts, experts.sort(stable=True).values)  # grouped by expert
    assert moe.drops_per_position(p, top_k, seq_len).tolist() == drops

    options = moe.MoEOptions(n_experts=n_experts, top_k=top_k, capacity_factor=0.8)
    layer = moe.MoE(8, options).train()
    x = torch.randn(rows, seq_len, 8)
    r = layer.router(x.reshape(-1, 8))
    keep, drops = brute_force_plan(r.indices, n_experts, cap, seq_len)
    layer(x)
    got = layer.pop_metrics()
    spans = [i * min(16, seq_len) // seq_len for i in range(seq_len)]
    per_span = [rows * top_k * spans.count(b) for b in range(max(spans) + 1)]
    want = [
        sum(d for d, s in zip(drops, spans, strict=True) if s == b) / n
        for b, n in enumerate(per_span)
    ]
    assert got["dropped_frac_by_position"] == pytest.approx(want)
    assert got["dropped_frac"] == pytest.approx(sum(drops) / (rows * seq_len * top_k))


def test_batch_policy_plan_is_the_pooled_rule():
    torch.manual_seed(0)
    indices = (torch.randn(20, 4) + torch.tensor([2.0, 0, 0, 0])).topk(2, dim=-1).indices
    cap = math.ceil(2 * 20 / 4 * 0.6)
    keep, _ = brute_force_plan(indices, 4, cap, seq_len=20)  # the batch is one group
    p = moe.plan(indices, 4, cap)
    assert {(int(s) // 2, int(s) % 2) for s in p.slot_idx} == keep
