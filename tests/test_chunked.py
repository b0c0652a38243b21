"""The blocked causal attention for a V narrower than q and k, against materialised scores."""

from __future__ import annotations

import pytest
import torch

from leviathan.model import correlation as xc
from leviathan.model.chunked import block_rows, chunked_causal_attention

F64 = torch.float64


def inputs(T: int, width: int, d: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(2, 3, T, width), (2, 3, T, width), (2, 3, T, d)]
    return [torch.randn(*s, dtype=F64, generator=gen).requires_grad_() for s in shapes]


def materialised(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return xc.causal_softmax_attend((q @ k.transpose(-2, -1)) * scale, v)


def test_block_rows() -> None:
    assert [block_rows(t) for t in (1, 512, 1024, 2048, 4096)] == [64, 64, 64, 128, 256]


# one partial block, exact blocks, a remainder of one row, several blocks and a remainder
@pytest.mark.parametrize("T", [1, 5, 64, 65, 150])
@pytest.mark.parametrize("width,d", [(8, 4), (6, 6), (4, 8)])
def test_equals_materialised(T: int, width: int, d: int) -> None:
    q, k, v = inputs(T, width, d)
    d_out = torch.randn(2, 3, T, d, dtype=F64, generator=torch.Generator().manual_seed(9))
    results = []
    for attend in (materialised, chunked_causal_attention):
        out = attend(q, k, v, 0.3)
        results.append((out, torch.autograd.grad(out, (q, k, v), d_out)))
    (out_ref, grads_ref), (out, grads) = results
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)


def test_gradcheck_across_blocks() -> None:
    q, k, v = (t.detach()[:1, :1].requires_grad_() for t in inputs(70, 3, 2))
    assert torch.autograd.gradcheck(lambda *a: chunked_causal_attention(*a, 0.5), (q, k, v))


def test_token_xcorr_rank2_fast_equals_reference_across_blocks() -> None:
    q, k, v = inputs(150, 4, 4)
    gen = torch.Generator().manual_seed(3)
    f, g = (torch.randn(3, 2, 3, dtype=F64, generator=gen).requires_grad_() for _ in range(2))
    results = []
    for reference in (True, False):
        out = xc.token_xcorr_attention(q, k, v, f, g, reference=reference)
        results.append((out, torch.autograd.grad(out.square().sum(), (q, k, v, f, g))))
    (out_ref, grads_ref), (out, grads) = results
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-9, atol=1e-9)


def test_compiles_whole_and_matches_eager() -> None:
    """One graph (fullgraph: a break raises), the same values and gradients as eager."""
    q, k, v = (t.detach().float().requires_grad_() for t in inputs(130, 8, 4))
    compiled = torch.compile(chunked_causal_attention, fullgraph=True, dynamic=False)
    results = []
    for attend in (chunked_causal_attention, compiled):
        out = attend(q, k, v, 0.25)
        results.append((out, torch.autograd.grad(out.square().sum(), (q, k, v))))
    (out_eager, grads_eager), (out, grads) = results
    torch.testing.assert_close(out, out_eager, rtol=1e-5, atol=1e-5)
    for g, g_eager in zip(grads, grads_eager, strict=True):
        torch.testing.assert_close(g, g_eager, rtol=1e-4, atol=1e-5)
