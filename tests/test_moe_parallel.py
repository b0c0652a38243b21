"""Expert parallelism on 2 gloo processes equals ep_size=1 on the whole batch.

Each rank holds half of the experts and routes half of the tokens; with a loss that is a
SUM over tokens, outputs and input gradients must match the single-process layer row for
row, each rank's expert gradients must equal the full-batch gradients of those experts,
and the router gradients summed over ranks must equal the full-batch router gradient.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from leviathan.config import ModelConfig
from leviathan.model import Leviathan
from leviathan.parallel.expert_sharding import shard_experts
from leviathan.parallel.world import World
from moe import MoE, MoEOptions

D_MODEL, TOKENS, SEED = 8, 24, 7
CASES = {
    # k=1 without renormalisation, so the router also learns from the output.
    "k1": dict(n_experts=4, top_k=1, renormalize=False, balance="none", z_coef=0.0),
    # k=2 with a shared expert and loss-free balancing (bias update over the world).
    "k2_shared": dict(n_experts=4, top_k=2, n_shared=1, activation="swiglu", balance="loss_free"),
}


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch and the per-token weights of the summed loss."""
    g = torch.Generator().manual_seed(123)
    x = torch.randn(TOKENS, D_MODEL, generator=g, dtype=torch.float64)
    return x, torch.randn(TOKENS, D_MODEL, generator=g, dtype=torch.float64)


def run(layer: MoE, x: torch.Tensor, w: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    out = layer(x)
    (out * w).sum().backward()
    layer.update_bias()
    res = {"out": out.detach(), "x_grad": x.grad, "bias": layer.router.bias.clone()}
    res.update({f"grad/{n}": p.grad for n, p in layer.named_parameters()})
    return res


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, w = batch()
        mine = slice(rank * TOKENS // world, (rank + 1) * TOKENS // world)
        for name, kw in CASES.items():
            torch.manual_seed(SEED)
            layer = MoE(D_MODEL, MoEOptions(**kw)).double().train()
            layer.shard_experts(dist.group.WORLD)
            layer.balance_group = dist.group.WORLD
            res = run(layer, x[mine], w[mine])
            dist.all_reduce(res["grad/router.weight"])  # replicated router: sum over ranks
            res["first_expert"] = torch.tensor(layer.experts.first)
            torch.save(res, Path(out_dir) / f"{name}_rank{rank}.pt")
        torch.manual_seed(SEED)
        model = shard_experts(
            Leviathan(model_config()),
            World("deepspeed", rank, world, torch.device("cpu"), dist.group.WORLD),
            ep_size=world,
        )
        for name, p in model.named_parameters():  # DeepSpeed's tags on the sharded experts only
            tagged = getattr(p, "allreduce", True) is False and p.group_name == "ep_size_2"
            assert tagged == (".experts." in name), name
        torch.save(model.state_dict(), Path(out_dir) / f"model_rank{rank}.pt")
        dist.barrier()  # no rank tears gloo down while its peer still talks to it
    finally:
        dist.destroy_process_group()


def model_config() -> ModelConfig:
    ffn = MoEOptions(n_experts=4, top_k=2, n_shared=1)
    return ModelConfig(
        vocab_size=11, block_size=8, n_layer=2, n_head=2, d_model=D_MODEL, bias=True, ffn=ffn
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_expert_parallel_matches_single_process(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)

    x, w = batch()
    for name, kw in CASES.items():
        torch.manual_seed(SEED)
        ref = run(MoE(D_MODEL, MoEOptions(**kw)).double().train(), x, w)
        ranks = [torch.load(tmp_path / f"{name}_rank{r}.pt") for r in range(world)]
        torch.testing.assert_close(torch.cat([r["out"] for r in ranks]), ref["out"])
        torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]), ref["x_grad"])
        n_local = kw["n_experts"] // world
        for r in ranks:
            experts = slice(int(r["first_expert"]), int(r["first_expert"]) + n_local)
            for key in ("grad/experts.w_in", "grad/experts.w_out"):
                torch.testing.assert_close(r[key], ref[key][experts], msg=f"{name} {key}")
            torch.testing.assert_close(r["grad/router.weight"], ref["grad/router.weight"])
            torch.testing.assert_close(r["bias"], ref["bias"])
            for key in ref:
                if key.startswith("grad/shared."):
                    # Dense shared weights: per-rank grads add up to the full-batch grad.
                    total = sum(q[key] for q in ranks)
                    torch.testing.assert_close(total, ref[key], msg=f"{name} {key}")
        if kw.get("balance") == "loss_free":
            assert ref["bias"].abs().max() > 0  # the update did happen

    # shard_experts: each rank keeps its slice of the whole model's initial experts, tagged
    # for DeepSpeed; everything else is the whole model's, unchanged
    torch.manual_seed(SEED)
    whole = Leviathan(model_config()).state_dict()
    ranks = [torch.load(tmp_path / f"model_rank{r}.pt") for r in range(world)]
    assert all(r.keys() == whole.keys() for r in ranks)
    for key, value in whole.items():
        if ".experts." in key:
            torch.testing.assert_close(torch.cat([r[key] for r in ranks]), value, rtol=0, atol=0)
        else:
            assert all(torch.equal(r[key], value) for r in ranks), key


def test_rows_cross_the_all_to_all_in_the_autocast_dtype(monkeypatch):
    """Under bf16 autocast the exchanged rows are bf16 both ways, not fp32 (one rank, the
    collective replaced by a copy that notes what it sends)."""
    import torch.distributed as dist

    from moe.dispatch import plan
    from moe.parallel import AllToAllDispatch

    sent = []

    def all_to_all_single(out, inp, out_splits=None, in_splits=None, group=None):
        sent.append(inp.dtype)
        out.copy_(inp)

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)
    monkeypatch.setattr(dist, "all_to_all_single", all_to_all_single)
    torch.manual_seed(0)
    layer = MoE(8, MoEOptions(n_experts=4, top_k=2, expert_hidden_mult=1.0))
    x = torch.randn(6, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = layer.router(x)
        out = AllToAllDispatch(None)(x, r.gates, plan(r.indices, 4), layer.experts)
    out.float().sum().backward()
    rows = [d for d in sent if d != torch.long]  # the counts exchange is int64
    assert rows == [torch.bfloat16] * 4  # forward there and back, backward there and back
