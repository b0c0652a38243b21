"""Expert MLPs stored as batched weights and run, expert by expert, on their own tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import FunctionCtx, once_differentiable


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """GELU, or SwiGLU on a hidden laid out as [gate | up] along the last dim."""
    if activation == "gelu":
        return F.gelu(h)
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def activate_backward(
    grad: torch.Tensor, h: torch.Tensor, activation: str, out: torch.Tensor | None = None
) -> torch.Tensor:
    """d activate(h) / dh applied to grad (same layouts as `activate`), into `out` if given."""
    if activation == "gelu":
        if out is None:
            return torch.ops.aten.gelu_backward(grad, h)
        return torch.ops.aten.gelu_backward.grad_input(grad, h, grad_input=out)
    gate, up = h.chunk(2, dim=-1)
    s = torch.sigmoid(gate)
    d_up = grad * gate * s
    d_gate = grad * up * s * (1 + gate * (1 - s))
    return torch.cat([d_gate, d_up], dim=-1, out=out)


class _Scratch:
    """Row buffers one pass reuses for every expert's transient slices (gathered tokens,
    outputs, gradients): a fresh tensor per expert would be new memory each time, page
    faults and a cold cache, which on CPU cost the mid-sized expert matmuls up to 1.4x."""

    def __init__(self, like: torch.Tensor, rows: int) -> None:
        self.like, self.rows, self.buffers = like, rows, {}

    def __call__(self, name: str, n: int, width: int) -> torch.Tensor:
        """The first n rows of buffer `name`, made anew only when its width changes."""
        buf = self.buffers.get(name)
        if buf is None or buf.shape[1] != width:
            buf = self.buffers[name] = self.like.new_empty(self.rows, width)
        return buf.narrow(0, 0, n)


class GradBuffers:
    """The expert weights' gradient tensors, kept from one backward to the next.

    An expert weight's gradient is as large as the weight; allocated fresh every step it
    is new memory that every per-expert matmul writing into it page-faults on. Autograd
    takes the returned gradient as `param.grad` without copying it when nothing else
    references the tensor, so each backward returns a new alias of a kept storage, and
    reuses that storage only once it is referenced by nothing else (the optimizer step
    freed `param.grad`); while a gradient is still alive (accumulation over micro-batches,
    an engine holding it) a new storage is allocated instead, so nothing is overwritten.
    """

    def __init__(self) -> None:
        self.kept: dict[str, torch.Tensor] = {}

    def take(self, name: str, like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Gradient tensor `name` of `shape`: the kept storage when it is free, else new."""
        buf = self.kept.get(name)
        fits = buf is not None and buf.shape == shape and buf.dtype == like.dtype
        if not (fits and buf.device == like.device and _only_owner(buf)):
            buf = self.kept[name] = like.new_empty(shape)
        return buf.view(shape)


def _only_owner(t: torch.Tensor) -> bool:
    """No tensor but `t` holds its storage (the count includes the temporary handle)."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata) <= 2


class _RoutedExperts(torch.autograd.Function):
    """out[tok[r]] += gate[r] * expert_e(x[tok[r]]) for the rows r of each expert's slice.

    One hand-written pass per expert: gather its tokens, two matmuls, scatter-add back.
    Every temporary is one expert's slice, never a (T*k, d) tensor: fine-grained
    experts (k = 8) would otherwise allocate, fault in and copy several tensors k times
    the size of the input per step. The slices that do not outlive their expert live in
    scratch buffers shared by all experts of the pass (`_Scratch`).

    The gate is applied at the narrower of the hidden and output widths. At the hidden
    width (fine-grained experts): g * (a @ w_out) = (g * a) @ w_out, and g * a is kept in
    place of a: it is what w_out's gradient needs, and the gate gradient
    <dy, a @ w_out + b_out> = <dy @ w_out^T, a> + <dy, b_out> takes <u, g * a> / g, one
    dot per row (exact to rounding; where some gate is exactly 0, or in fp16, where g * a
    can be subnormal, a is recomputed from h instead). At the output width: out += g * y,
    and y is kept for the gate gradient <dy, y>.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: torch.Tensor,
        gates: torch.Tensor | None,
        w_in: torch.Tensor,
        w_out: torch.Tensor,
        b_in: torch.Tensor | None,
        b_out: torch.Tensor | None,
        tok: torch.Tensor,
        counts: list[int],
        n_out: int,
        activation: str,
        grad_buffers: GradBuffers | None,
    ) -> torch.Tensor:
        d_out, hidden = w_out.shape[2], w_out.shape[1]
        out = x.new_zeros(n_out, d_out)
        # Gate at the narrower of the hidden and output widths (see the class docstring).
        gate_a = gates is not None and hidden <= d_out
        keep_y = gates is not None and not gate_a and ctx.needs_input_grad[1]
        scratch = _Scratch(x, max(counts, default=0))
        acts = []  # per expert with rows: h, a (g * a when gate_a) and (keep_y) y
        # every expert's slices, one split / unbind call each, not indexing ops per expert
        toks, gs = tok.split(counts), _split(_column(gates), counts)
        w1s, w2s, b1s, b2s = (_unbind(w, len(counts)) for w in (w_in, w_out, b_in, b_out))
        for e, n in enumerate(counts):
            if not n:
                continue
            te, ge, w1, w2, b1, b2 = toks[e], gs[e], w1s[e], w2s[e], b1s[e], b2s[e]
            xe = torch.index_select(x, 0, te, out=scratch("x", n, x.shape[1]))
            h = xe @ w1 if b1 is None else torch.addmm(b1, xe, w1)
            a = activate(h, activation)
            ys = scratch("y", n, d_out)
            if gate_a:
                a = ag = a.mul_(ge)  # kept as g * a (see the class docstring)
                if b2 is None:
                    y = torch.mm(ag, w2, out=ys)
                else:  # g * (a @ w + b) = (g * a) @ w + g * b
                    y = torch.addmm(ge * b2, ag, w2, out=ys)
                out.index_add_(0, te, y)
            else:
                y = a @ w2 if b2 is None else torch.addmm(b2, a, w2)
                out.index_add_(0, te, y if ge is None else torch.mul(y, ge, out=ys))
            acts += [h, a, y] if keep_y else [h, a]
        # Through save_for_backward, so saved-tensor hooks (offloading, memory probes) see all.
        ctx.save_for_backward(x, gates, w_in, w_out, b_out, tok, *acts)
        ctx.counts, ctx.activation, ctx.rows = counts, activation, scratch.rows
        ctx.grad_buffers = grad_buffers
        ctx.gate_a, ctx.keep_y = gate_a, keep_y
        # <u, g * a> / g is undefined where g == 0, and in fp16 (5 exponent bits) g * a goes
        # subnormal for small gates and loses its digits: then a is recomputed from h
        ctx.recompute_a = (
            gate_a
            and ctx.needs_input_grad[1]
            and (x.dtype == torch.float16 or bool((gates == 0).any()))
        )
        ctx.has_b_in = b_in is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        x, gates, w_in, w_out, b_out, tok, *acts = ctx.saved_tensors
        need, counts = ctx.needs_input_grad, ctx.counts
        grad = grad.contiguous()
        grad_x = torch.zeros_like(x) if need[0] else None
        grad_g = torch.empty_like(gates) if gates is not None and need[1] else None
        # Experts without tokens get zero gradients; the others are written whole below.
        unused = [e for e, n in enumerate(counts) if not n]

        def buffer(name: str, wanted: bool, *shape: int) -> torch.Tensor | None:
            if not wanted:
                return None
            kept = ctx.grad_buffers
            g = w_in.new_empty(shape) if kept is None else kept.take(name, w_in, shape)
            if unused:
                g[unused] = 0
            return g

        n_experts, d, width = w_in.shape
        hidden, d_out = w_out.shape[1], w_out.shape[2]
        grad_w_in = buffer("w_in", need[2], n_experts, d, width)
        grad_w_out = buffer("w_out", need[3], *w_out.shape)
        grad_b_in = buffer("b_in", need[4] and ctx.has_b_in, n_experts, width)
        grad_b_out = buffer("b_out", need[5] and b_out is not None, n_experts, d)
        scratch = _Scratch(grad, ctx.rows)
        saved = iter(acts)
        toks, gs, ggs = tok.split(counts), _split(_column(gates), counts), _split(grad_g, counts)
        w1s, w2s, b2s = (_unbind(w, n_experts) for w in (w_in, w_out, b_out))
        grads = (grad_w_in, grad_w_out, grad_b_in, grad_b_out)
        gw1s, gw2s, gb1s, gb2s = (_unbind(g, n_experts) for g in grads)
        for e, n in enumerate(counts):
            if not n:
                continue
            te, ge, gg, w1, w2, b2 = toks[e], gs[e], ggs[e], w1s[e], w2s[e], b2s[e]
            gw1, gw2, gb1, gb2 = gw1s[e], gw2s[e], gb1s[e], gb2s[e]
            h, a = next(saved), next(saved)
            # d out / d y, before the gate
            gy = torch.index_select(grad, 0, te, out=scratch("gy", n, d_out))
            if ge is not None and not ctx.gate_a:  # gate at the output width
                y = next(saved)
                if gg is not None:
                    torch.linalg.vecdot(gy, y, out=gg)
                gy.mul_(ge)
                ge = None
            # From here on a gate, if any is left, applies to a, and `a` holds g * a.
            if gw2 is not None:
                torch.mm(a.t(), gy, out=gw2)
            if gb2 is not None:
                if ge is None:
                    torch.sum(gy, 0, out=gb2)
                else:
                    torch.mv(gy.t(), ge.squeeze(1), out=gb2)
            u = torch.mm(gy, w2.t(), out=scratch("u", n, hidden))  # d out / d a
            if ge is not None:
                if gg is not None:  # <u, a> (+ <gy, b_out>)
                    if ctx.recompute_a:
                        torch.linalg.vecdot(u, activate(h, ctx.activation), out=gg)
                    else:
                        torch.linalg.vecdot(u, a, out=gg).div_(ge.squeeze(1))
                    if b2 is not None:
                        gg += gy @ b2
                u.mul_(ge)
            gh = activate_backward(u, h, ctx.activation, out=scratch("h", n, width))
            if gw1 is not None:
                xe = torch.index_select(x, 0, te, out=scratch("x", n, d))
                torch.mm(xe.t(), gh, out=gw1)
            if gb1 is not None:
                torch.sum(gh, 0, out=gb1)
            if grad_x is not None:
                grad_x.index_add_(0, te, torch.mm(gh, w1.t(), out=scratch("gx", n, d)))
        return grad_x, grad_g, grad_w_in, grad_w_out, grad_b_in, grad_b_out, *[None] * 5


def _column(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.unsqueeze(1)


def _split(t: torch.Tensor | None, counts: list[int]) -> list[torch.Tensor | None]:
    """Each expert's rows of a routed-row tensor (None for every expert if None)."""
    return [None] * len(counts) if t is None else list(t.split(counts))


def _unbind(t: torch.Tensor | None, n_experts: int) -> list[torch.Tensor | None]:
    """Each expert's slice of a tensor with a leading expert axis (None if None)."""
    return [None] * n_experts if t is None else list(t.unbind(0))


def grouped_routed_experts(
    x: torch.Tensor,
    gates: torch.Tensor | None,
    weights: tuple[torch.Tensor | None, ...],
    tok: torch.Tensor,
    counts: list[int],
    n_out: int,
    activation: str,
) -> torch.Tensor:
    """`_RoutedExperts`' function through torch's grouped GEMM: the tokens gathered once
    into expert order, each matmul one kernel over every expert; autograd differentiates.
    weights: (w_in, w_out, b_in, b_out) as `Experts` holds them.
    Where `grouped_mm_fits` (CUDA bf16 on SM 9.x/10.x, aligned) that replaces E small
    launches by one; elsewhere torch's grouped_mm is a loop itself (on SM 8.x with a host
    sync; on CPU torch 2.13 measured 1.09-1.94x slower than ours), so `auto` skips it."""
    w_in, w_out, b_in, b_out = weights
    sizes = torch.tensor(counts, device=x.device)
    offs = sizes.cumsum(0).to(torch.int32)
    expert_of_row = torch.repeat_interleave(torch.arange(len(counts), device=x.device), sizes)
    h = F.grouped_mm(x.index_select(0, tok), w_in, offs=offs)
    if b_in is not None:
        h = h + b_in.index_select(0, expert_of_row)
    y = F.grouped_mm(activate(h, activation), w_out, offs=offs)
    if b_out is not None:
        y = y + b_out.index_select(0, expert_of_row)
    if gates is not None:
        y = y * gates.unsqueeze(1)
    return y.new_zeros(n_out, y.shape[1]).index_add(0, tok, y)


GROUPED_MM_MAJORS = (9, 10)  # SM 9.x, 10.x: torch's fused bf16 kernel; 8.x loops, host-synced


def grouped_mm_fits(
    device_type: str,
    capability: tuple[int, int] | None,
    dtypes: Sequence[torch.dtype],
    widths: Sequence[int],
    pointers: Sequence[int],
) -> bool:
    """Whether CUDA's fused grouped GEMM takes these operands: bf16, SM 9.x or 10.x, every
    matmul width a multiple of 8 and every data pointer 16-byte aligned (its checks; a
    weight inside DeepSpeed's flat bf16 buffer can sit at any element offset)."""
    return (
        device_type == "cuda"
        and capability is not None
        and capability[0] in GROUPED_MM_MAJORS
        and all(d == torch.bfloat16 for d in dtypes)
        and all(w % 8 == 0 for w in widths)
        and all(ptr % 16 == 0 for ptr in pointers)
    )


def use_grouped_mm(matmul: str, x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor) -> bool:
    """`auto`: grouped GEMM where `grouped_mm_fits` these operands, at call time."""
    if matmul != "auto":
        return matmul == "grouped"
    if not (x.is_cuda and hasattr(F, "grouped_mm")):
        return False
    operands = (x, w_in, w_out)
    return grouped_mm_fits(
        x.device.type,
        torch.cuda.get_device_capability(x.device),
        [t.dtype for t in operands],
        (x.shape[-1], *w_in.shape[1:], *w_out.shape[1:]),
        [t.data_ptr() for t in operands],
    )


def normal_weight(*shape: int) -> nn.Parameter:
    """N(0, 0.02) drawn into the tensor as made: under ZeRO-3's zero.Init, which makes it
    bf16, the values are the fp32 draw rounded once, as the eager model cast to bf16 has
    (`torch.randn(...) * 0.02` would round twice)."""
    return nn.Parameter(nn.init.normal_(torch.empty(*shape), std=0.02))


def _in_width(hidden: int, activation: str) -> int:
    if activation not in ("gelu", "swiglu"):
        raise ValueError(f"activation: expected gelu or swiglu, got {activation!r}")
    return 2 * hidden if activation == "swiglu" else hidden


class Experts(nn.Module):
    """n_experts MLPs d -> hidden -> d as batched parameters, or this rank's slice of them.

    w_in: (E_local, d, hidden) for gelu, (E_local, d, 2*hidden) for swiglu ([gate | up]);
    w_out: (E_local, hidden, d); optional b_in / b_out. All E experts' weights are drawn
    from the torch RNG (each N(0, 0.02), independently); `shard` then keeps experts
    ep_rank*E_local .. (ep_rank+1)*E_local-1, so expert e starts identical for every
    ep_size. Rescaling w_out like a residual projection is the caller's business.
    """

    def __init__(
        self,
        n_experts: int,
        d_model: int,
        hidden: int,
        activation: str = "gelu",
        bias: bool = False,
        *,
        matmul: str = "auto",
    ) -> None:
        super().__init__()
        self.n_experts, self.d_model, self.hidden = n_experts, d_model, hidden
        self.activation, self.matmul = activation, matmul
        self.n_local, self.first = n_experts, 0  # first: global id of the first local expert
        width = _in_width(hidden, activation)
        self.w_in = normal_weight(n_experts, d_model, width)
        self.w_out = normal_weight(n_experts, hidden, d_model)
        self.b_in = nn.Parameter(torch.zeros(n_experts, width)) if bias else None
        self.b_out = nn.Parameter(torch.zeros(n_experts, d_model)) if bias else None
        self.grad_buffers = GradBuffers()

    @torch.no_grad()
    def shard(self, ep_size: int, ep_rank: int) -> None:
        """Keep only expert-parallel rank `ep_rank`'s n_experts / ep_size experts (their
        values unchanged); the other ranks hold the rest."""
        if self.n_local != self.n_experts:
            raise ValueError("the experts are already sharded")
        if self.n_experts % ep_size or not 0 <= ep_rank < ep_size:
            raise ValueError(
                f"cannot split {self.n_experts} experts as rank {ep_rank} of {ep_size}"
            )
        self.n_local = self.n_experts // ep_size
        self.first = ep_rank * self.n_local
        mine = slice(self.first, self.first + self.n_local)
        for name, p in list(self.named_parameters(recurse=False)):
            setattr(self, name, nn.Parameter(p[mine].clone(), requires_grad=p.requires_grad))
        self.grad_buffers = GradBuffers()

    def forward(
        self,
        x: torch.Tensor,
        tok: torch.Tensor,
        counts: list[int],
        gates: torch.Tensor | None = None,
        n_out: int | None = None,
    ) -> torch.Tensor:
        """out[tok[r]] += gates[r] * expert(x[tok[r]]), rows r grouped by local expert.

        x: (T, d) tokens; tok: (N,) token of each row, the first counts[0] rows for local
        expert 0, and so on (an expert with no rows is skipped; nothing is padded);
        gates: (N,) weights (None: 1); out: (n_out or T, d).
        """
        if sum(counts) != tok.numel() or len(counts) != self.n_local:
            raise ValueError(f"counts {counts} do not match {tok.numel()} rows")
        args = [x, gates, self.w_in, self.w_out, self.b_in, self.b_out]
        device = x.device.type
        if torch.is_autocast_enabled(device):  # a custom Function is not autocast by itself
            dtype = torch.get_autocast_dtype(device)
            args = [None if a is None else a.to(dtype) for a in args]
        n_out = x.shape[0] if n_out is None else n_out
        with torch.autocast(device, enabled=False):
            if use_grouped_mm(self.matmul, args[0], args[2], args[3]):
                x, gates, *weights = args
                return grouped_routed_experts(
                    x, gates, tuple(weights), tok, counts, n_out, self.activation
                )
            return _RoutedExperts.apply(
                *args, tok, counts, n_out, self.activation, self.grad_buffers
            )

    def forward_grouped(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Run local expert e on the next counts[e] rows of x_sorted (N, d) -> (N, d)."""
        return self(x_sorted, torch.arange(x_sorted.shape[0], device=x_sorted.device), counts)

    def forward_expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Local expert e on x (..., d), written plainly (reference and debugging)."""
        h = x @ self.w_in[e]
        if self.b_in is not None:
            h = h + self.b_in[e]
        y = activate(h, self.activation) @ self.w_out[e]
        return y if self.b_out is None else y + self.b_out[e]

    def extra_repr(self) -> str:
        return (
            f"n_experts={self.n_experts}, local={self.first}..{self.first + self.n_local - 1}, "
            f"d_model={self.d_model}, hidden={self.hidden}, activation={self.activation}"
        )


class MLP(nn.Module):
    """Dense MLP d -> hidden -> d with the experts' layout; n shared experts are one MLP
    of width n * hidden (the sum of n MLPs is exactly a single wider one)."""

    def __init__(
        self, d_model: int, hidden: int, activation: str = "gelu", bias: bool = False
    ) -> None:
        super().__init__()
        self.activation = activation
        width = _in_width(hidden, activation)
        self.w_in = normal_weight(d_model, width)
        self.w_out = normal_weight(hidden, d_model)
        self.b_in = nn.Parameter(torch.zeros(width)) if bias else None
        self.b_out = nn.Parameter(torch.zeros(d_model)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.w_in if self.b_in is None else torch.addmm(self.b_in, x, self.w_in)
        a = activate(h, self.activation)
        return a @ self.w_out if self.b_out is None else torch.addmm(self.b_out, a, self.w_out)
