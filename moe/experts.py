"""Expert MLPs stored as batched weights and run, expert by expert, on their own tokens."""

from __future__ import annotations

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


def activate_backward(grad: torch.Tensor, h: torch.Tensor, activation: str) -> torch.Tensor:
    """d activate(h) / dh applied to grad (same layouts as `activate`)."""
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad, h)
    gate, up = h.chunk(2, dim=-1)
    s = torch.sigmoid(gate)
    d_up = grad * gate * s
    d_gate = grad * up * s * (1 + gate * (1 - s))
    return torch.cat([d_gate, d_up], dim=-1)


class _RoutedExperts(torch.autograd.Function):
    """out[tok[r]] += gate[r] * expert_e(x[tok[r]]) for the rows r of each expert's slice.

    One hand-written pass per expert: gather its tokens, two matmuls, scatter-add back.
    Every temporary is one expert's slice, never a (T*k, d) tensor: fine-grained
    experts (k = 8) would otherwise allocate, fault in and copy several tensors k times
    the size of the input per step.

    The gate is applied at the narrower of the hidden and output widths. At the hidden
    width (fine-grained experts): g * (a @ w_out) = (g * a) @ w_out, and the gate gradient
    is <dy, a @ w_out + b_out> = <dy @ w_out^T, a> + <dy, b_out>, so y is not kept. At the
    output width: out += g * y, and y is kept for the gate gradient <dy, y>.
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
    ) -> torch.Tensor:
        out = x.new_zeros(n_out, w_out.shape[2])
        # Gate at the narrower of the hidden and output widths (see the class docstring).
        gate_a = gates is not None and w_out.shape[1] <= w_out.shape[2]
        keep_y = gates is not None and not gate_a and ctx.needs_input_grad[1]
        used, acts = [], []  # per used expert: (e, start, n); h, a and (keep_y) y
        start = 0
        for e, n in enumerate(counts):
            if not n:
                continue
            te = tok.narrow(0, start, n)
            xe = x.index_select(0, te)
            h = xe @ w_in[e] if b_in is None else torch.addmm(b_in[e], xe, w_in[e])
            a = activate(h, activation)
            if gate_a:
                ge = gates.narrow(0, start, n).unsqueeze(1)
                ag = a * ge
                if b_out is None:
                    y = ag @ w_out[e]
                else:  # g * (a @ w + b) = (g * a) @ w + g * b
                    y = torch.addmm(ge * b_out[e], ag, w_out[e])
                out.index_add_(0, te, y)
            else:
                y = a @ w_out[e] if b_out is None else torch.addmm(b_out[e], a, w_out[e])
                gy = y if gates is None else y * gates.narrow(0, start, n).unsqueeze(1)
                out.index_add_(0, te, gy)
            acts += [h, a, y] if keep_y else [h, a]
            used.append((e, start, n))
            start += n
        # Through save_for_backward, so saved-tensor hooks (offloading, memory probes) see all.
        ctx.save_for_backward(x, gates, w_in, w_out, b_out, tok, *acts)
        ctx.used, ctx.activation = used, activation
        ctx.gate_a, ctx.keep_y = gate_a, keep_y
        ctx.has_b_in = b_in is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: torch.Tensor):  # type: ignore[override]
        x, gates, w_in, w_out, b_out, tok, *acts = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad = grad.contiguous()
        grad_x = torch.zeros_like(x) if need[0] else None
        grad_g = torch.empty_like(gates) if gates is not None and need[1] else None
        # Experts without tokens get zero gradients; the others are written whole below.
        unused = sorted(set(range(w_in.shape[0])) - {e for e, _, _ in ctx.used})

        def buffer(wanted: bool, *shape: int) -> torch.Tensor | None:
            if not wanted:
                return None
            g = w_in.new_empty(shape)
            if unused:
                g[unused] = 0
            return g

        n_experts, d, width = w_in.shape
        grad_w_in = buffer(need[2], n_experts, d, width)
        grad_w_out = buffer(need[3], *w_out.shape)
        grad_b_in = buffer(need[4] and ctx.has_b_in, n_experts, width)
        grad_b_out = buffer(need[5] and b_out is not None, n_experts, d)
        per = 3 if ctx.keep_y else 2
        for i, (e, start, n) in enumerate(ctx.used):
            h, a = acts[i * per], acts[i * per + 1]
            te = tok.narrow(0, start, n)
            ge = None if gates is None else gates.narrow(0, start, n).unsqueeze(1)
            gy = grad.index_select(0, te)  # d out / d y, before the gate
            if ge is not None and not ctx.gate_a:  # gate at the output width
                if grad_g is not None:
                    grad_g[start : start + n] = torch.linalg.vecdot(gy, acts[i * per + 2])
                gy.mul_(ge)
                ge = None
            # From here on the gate, if any left, applies to a: a^T (g * gy) = (g * a)^T gy.
            if grad_w_out is not None:
                torch.mm((a if ge is None else a * ge).t(), gy, out=grad_w_out[e])
            if grad_b_out is not None:
                if ge is None:
                    torch.sum(gy, 0, out=grad_b_out[e])
                else:
                    torch.mv(gy.t(), ge.squeeze(1), out=grad_b_out[e])
            u = gy @ w_out[e].t()  # d out / d a, before any gate left
            if ge is not None:
                if grad_g is not None:
                    gg = torch.linalg.vecdot(u, a)
                    if b_out is not None:
                        gg += gy @ b_out[e]
                    grad_g[start : start + n] = gg
                u.mul_(ge)
            gh = activate_backward(u, h, ctx.activation)
            if grad_w_in is not None:
                torch.mm(x.index_select(0, te).t(), gh, out=grad_w_in[e])
            if grad_b_in is not None:
                torch.sum(gh, 0, out=grad_b_in[e])
            if grad_x is not None:
                grad_x.index_add_(0, te, gh @ w_in[e].t())
        return grad_x, grad_g, grad_w_in, grad_w_out, grad_b_in, grad_b_out, *[None] * 4


def _in_width(hidden: int, activation: str) -> int:
    if activation not in ("gelu", "swiglu"):
        raise ValueError(f"activation: expected gelu or swiglu, got {activation!r}")
    return 2 * hidden if activation == "swiglu" else hidden


class Experts(nn.Module):
    """The local slice of n_experts MLPs d -> hidden -> d, as batched parameters.

    w_in: (E_local, d, hidden) for gelu, (E_local, d, 2*hidden) for swiglu ([gate | up]);
    w_out: (E_local, hidden, d); optional b_in / b_out. All E experts' weights are drawn
    from the torch RNG (each N(0, 0.02), independently) and this rank keeps experts
    ep_rank*E_local .. (ep_rank+1)*E_local-1, so expert e starts identical for every
    ep_size. Rescaling w_out like a residual projection is the caller's business.

    Every parameter is tagged `expert=True`. With ep_size > 1 the ranks hold different
    experts, so they are also tagged `allreduce=False, group_name="ep_size_<n>"`
    (DeepSpeed's convention): the trainer reduces their gradients over the
    expert-data-parallel group instead of the whole world. With ep_size == 1 every rank
    holds all experts and they are reduced like any replicated parameter.
    """

    def __init__(
        self,
        n_experts: int,
        d_model: int,
        hidden: int,
        activation: str = "gelu",
        bias: bool = False,
        *,
        ep_size: int = 1,
        ep_rank: int = 0,
    ) -> None:
        super().__init__()
        if n_experts % ep_size or not 0 <= ep_rank < ep_size:
            raise ValueError(f"cannot split {n_experts} experts as rank {ep_rank} of {ep_size}")
        self.n_experts, self.d_model, self.hidden = n_experts, d_model, hidden
        self.activation = activation
        self.n_local = n_experts // ep_size
        self.first = ep_rank * self.n_local  # global id of the first local expert
        mine = slice(self.first, self.first + self.n_local)
        width = _in_width(hidden, activation)
        self.w_in = nn.Parameter(torch.randn(n_experts, d_model, width)[mine] * 0.02)
        self.w_out = nn.Parameter(torch.randn(n_experts, hidden, d_model)[mine] * 0.02)
        self.b_in = nn.Parameter(torch.zeros(self.n_local, width)) if bias else None
        self.b_out = nn.Parameter(torch.zeros(self.n_local, d_model)) if bias else None
        for p in self.parameters():
            p.expert = True  # type: ignore[attr-defined]
            if ep_size > 1:
                p.allreduce = False  # type: ignore[attr-defined]
                p.group_name = f"ep_size_{ep_size}"  # type: ignore[attr-defined]

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
        with torch.autocast(device, enabled=False):
            return _RoutedExperts.apply(
                *args, tok, counts, x.shape[0] if n_out is None else n_out, self.activation
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

    def __init__(self, d_model: int, hidden: int, activation: str = "gelu", bias: bool = False):
        super().__init__()
        self.activation = activation
        width = _in_width(hidden, activation)
        self.w_in = nn.Parameter(torch.randn(d_model, width) * 0.02)
        self.w_out = nn.Parameter(torch.randn(hidden, d_model) * 0.02)
        self.b_in = nn.Parameter(torch.zeros(width)) if bias else None
        self.b_out = nn.Parameter(torch.zeros(d_model)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.w_in if self.b_in is None else torch.addmm(self.b_in, x, self.w_in)
        a = activate(h, self.activation)
        return a @ self.w_out if self.b_out is None else torch.addmm(self.b_out, a, self.w_out)
