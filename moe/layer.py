"""The sparse MoE FFN layer: router -> dispatch -> experts -> weighted combine (+ shared)."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from moe import balance, dispatch
from moe.experts import MLP, Experts
from moe.options import MoEOptions, check_options
from moe.parallel import exchange_and_run
from moe.router import Router, Routing


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


POSITION_BINS = 16  # spans of the sequence the per-position drop fractions are reported in


def _add_padded(total: torch.Tensor, more: torch.Tensor) -> torch.Tensor:
    """total + more, the shorter zero-padded (sequence lengths may differ between calls)."""
    n = max(total.numel(), more.numel())
    return F.pad(total, (0, n - total.numel())) + F.pad(more, (0, n - more.numel()))


def _binned_fraction(part: torch.Tensor, whole: torch.Tensor, bins: int) -> list[float]:
    """sum(part) / sum(whole) over `bins` equal spans (fewer when shorter)."""
    spans = torch.arange(whole.numel()) * min(bins, whole.numel()) // whole.numel()
    n = int(spans.max()) + 1
    num = torch.zeros(n, dtype=torch.float64).index_add_(0, spans, part.double())
    den = torch.zeros(n, dtype=torch.float64).index_add_(0, spans, whole.double())
    return (num / den.clamp(min=1)).tolist()


class MoE(nn.Module):
    """Sparse Mixture-of-Experts FFN: each token gets the gated sum of its top-k experts.

    forward(x (..., d)) -> (..., d) and sets `self.aux_loss`, the scalar to add to the
    training loss (aux_coef * Switch loss when balance == "aux", plus z_coef * z-loss).
    Expert width is round(expert_hidden_mult * d_model); `n_shared` shared experts of that
    width see every token and are added un-gated.

    The layer is built whole, all experts local. With options.ep_size > 1, `shard_experts`
    then splits them over a process group (every rank must have built the layer from the
    same torch seed). Until then, or with ep_size == 1, the forward never touches
    torch.distributed.
    """

    def __init__(
        self,
        d_model: int,
        options: MoEOptions,
        *,
        dropout: float = 0.0,
        bias: bool = False,
    ) -> None:
        super().__init__()
        check_options(options)
        o = self.options = options
        self.d_model, self.hidden = d_model, max(1, round(o.expert_hidden_mult * d_model))
        self.ep_group: object | None = None  # set by shard_experts
        # Same RNG draw order for every ep_size: router, all experts, shared experts.
        self.router = Router(d_model, o.n_experts, o.score, o.top_k, o.renormalize, o.jitter)
        h, act = self.hidden, o.activation
        self.experts = Experts(o.n_experts, d_model, h, act, bias, matmul=o.expert_matmul)
        self.shared = MLP(d_model, o.n_shared * h, act, bias) if o.n_shared else None
        self.dropout = nn.Dropout(dropout)
        self.aux_loss = torch.zeros(())
        self._reset_metrics()
        self._bias_load = torch.zeros(o.n_experts, dtype=torch.long)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., T, d), a batch of sequences of T positions ((T, d): one sequence)."""
        o, shape = self.options, x.shape
        seq_len = shape[-2] if x.dim() > 2 else shape[0]
        x = x.reshape(-1, self.d_model)
        n_tokens = x.shape[0]
        r = self.router(x)
        cap, group = self._capacity(n_tokens, seq_len)
        p = dispatch.plan(r.indices, o.n_experts, cap, group)
        if self.ep_group is not None:
            ys = exchange_and_run(dispatch.gather(x, p), p.counts, self.experts, self.ep_group)
            out = dispatch.combine(ys, r.gates, p, n_tokens)
        else:  # gather, run and scatter-add expert by expert, in one pass
            gates = r.gates.reshape(-1).index_select(0, p.slot_idx).to(x.dtype)
            out = self.experts(x, p.token_idx, p.counts, gates)
        if self.shared is not None:
            out = out + self.shared(x)
        self.aux_loss = self._balance_losses(r, p, seq_len)
        return self.dropout(out).reshape(shape)

    def shard_experts(self, group: object) -> None:
        """Keep this rank's share of the experts of `group` (options.ep_size ranks, which
        hold the rest); the forward then sends each token to the rank of its expert."""
        import torch.distributed as dist

        ep_size = self.options.ep_size
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(f"ep_size: {ep_size} needs torch.distributed initialised")
        if dist.get_world_size(group) != ep_size:
            size = dist.get_world_size(group)
            raise ValueError(f"ep_size: {ep_size} but the expert group has {size} ranks")
        self.experts.shard(ep_size, dist.get_rank(group))
        self.ep_group = group

    def _capacity(self, n_tokens: int, seq_len: int) -> tuple[int | None, int | None]:
        """(slots per expert, tokens that compete for them); (None, None) when dropless.

        The sequence policy sizes the slots from `capacity_seq_len` (the length trained
        at), not the input's length, so a prefix scored alone (generation) drops exactly
        what it drops inside the full sequence.
        """
        o = self.options
        if o.capacity_factor is None:
            return None, None
        if o.capacity_policy == "sequence":
            length = o.capacity_seq_len or seq_len
            return dispatch.capacity(length, o.n_experts, o.top_k, o.capacity_factor), seq_len
        if not self.training:
            warnings.warn(
                "MoE capacity_policy 'batch': the sequences of a batch compete for expert "
                "slots, so scores depend on the other rows and on later tokens (not causal); "
                "evaluation and generation differ from training. Use capacity_policy "
                "'sequence' for causal scores.",
                stacklevel=2,
            )
        return dispatch.capacity(n_tokens, o.n_experts, o.top_k, o.capacity_factor), None

    def _balance_losses(self, r: Routing, p: dispatch.Plan, seq_len: int) -> torch.Tensor:
        """Sets the loss terms; while training also accumulates the detached metrics."""
        o = self.options
        if not r.indices.numel():  # an empty batch: nothing to balance, nothing to count
            return r.logits.new_zeros(())
        probs = r.scores if o.score == "softmax" else r.scores / r.scores.sum(-1, keepdim=True)
        need_aux = o.balance == "aux" and o.aux_coef > 0
        aux = balance.switch_aux_loss(probs, r.indices, o.n_experts) if need_aux else None
        z = balance.z_loss(r.logits) if o.z_coef > 0 else None
        total = r.logits.new_zeros(())
        if aux is not None:
            total = total + o.aux_coef * aux
        if z is not None:
            total = total + o.z_coef * z
        if self.training:
            with torch.no_grad():
                m = self._metrics
                m["steps"] += 1
                m["load"] += p.routed.cpu()
                m["dropped"] += p.dropped
                m["assigned"] += r.indices.numel()
                if o.capacity_factor is not None:
                    drops = dispatch.drops_per_position(p, o.top_k, seq_len)
                    per_pos = torch.full((seq_len,), r.indices.numel() // seq_len)
                    m["dropped_at"] = _add_padded(m["dropped_at"], drops)
                    m["assigned_at"] = _add_padded(m["assigned_at"], per_pos)
                m["entropy"] += float(torch.special.entr(probs).sum(-1).mean())
                if aux is None:
                    aux = balance.switch_aux_loss(probs, r.indices, o.n_experts)
                m["aux_loss"] += float(aux)
                m["z_loss"] += float(z if z is not None else balance.z_loss(r.logits))
                if o.balance == "loss_free":
                    self._bias_load += p.routed.cpu()
        return total

    def _reset_metrics(self) -> None:
        load = torch.zeros(self.options.n_experts, dtype=torch.long)
        self._metrics: dict = dict(steps=0, load=load, dropped=0, assigned=0)
        empty = torch.zeros(0, dtype=torch.long)
        self._metrics.update(dropped_at=empty, assigned_at=empty)  # per position
        self._metrics.update(entropy=0.0, aux_loss=0.0, z_loss=0.0)

    def pop_metrics(self) -> dict[str, float | list[int]]:
        """Statistics of the training forwards since the last call, then reset ({} if none).

        load: routed assignments per expert (summed over the forwards, this rank's tokens);
        imbalance: max/mean of load; load_cv: std/mean (population std); dropped_frac:
        dropped / routed assignments; dropped_frac_by_position (capacity mode): the dropped
        fraction in each of up to POSITION_BINS equal spans of the sequence, first to last;
        router_entropy: mean over tokens of the entropy (nats)
        of the normalised scores; aux_loss, z_loss: raw (uncoefficiented) values averaged
        over the forwards; bias_norm: L2 norm of the loss-free bias (balance: loss_free).
        """
        m = self._metrics
        if not m["steps"]:
            return {}
        load = m["load"].double()
        mean = load.mean().item()
        out: dict[str, float | list[int]] = {
            "load": m["load"].tolist(),
            "imbalance": load.max().item() / mean if mean else 0.0,
            "load_cv": load.std(unbiased=False).item() / mean if mean else 0.0,
            "dropped_frac": m["dropped"] / max(1, m["assigned"]),
            "router_entropy": m["entropy"] / m["steps"],
            "aux_loss": m["aux_loss"] / m["steps"],
            "z_loss": m["z_loss"] / m["steps"],
        }
        if m["assigned_at"].numel():
            out["dropped_frac_by_position"] = _binned_fraction(
                m["dropped_at"], m["assigned_at"], POSITION_BINS
            )
        if self.options.balance == "loss_free":
            out["bias_norm"] = self.router.bias.norm().item()
        self._reset_metrics()
        return out

    @torch.no_grad()
    def update_bias(self) -> None:
        """Loss-free balancing step from the load routed since the last call (call it after
        each optimizer step; a no-op unless balance == "loss_free").

        When torch.distributed runs with more than one rank (data and/or expert parallel),
        the load is all-reduced over the default world first, so every replica applies the
        same update from the global batch and the replicated bias stays identical.
        """
        o = self.options
        if o.balance != "loss_free":
            return
        load = self._bias_load.to(self.router.bias.device, torch.float64)
        if _world_size() > 1:
            import torch.distributed as dist

            dist.all_reduce(load)
        balance.update_bias(self.router.bias, load, o.bias_rate)
        self._bias_load.zero_()

    def _expert_params(self) -> int:
        return sum(p.numel() for p in self.experts.parameters()) // self.experts.n_local

    def flops_per_token(self) -> int:
        """Active forward FLOPs per token (2 per multiply-add): router + k experts + shared.

        Activations, gating, bias adds and the dispatch are not counted.
        """
        o, d, h = self.options, self.d_model, self.hidden
        width = 2 * h if o.activation == "swiglu" else h
        expert = 2 * d * width + 2 * h * d
        return 2 * d * o.n_experts + (o.top_k + o.n_shared) * expert

    def active_params(self) -> int:
        """Parameters a token uses: router + k experts + shared experts.

        Total parameters are sum(p.numel()); with ep_size > 1 that sum is this rank's share.
        """
        shared = 0 if self.shared is None else sum(p.numel() for p in self.shared.parameters())
        return self.router.weight.numel() + self.options.top_k * self._expert_params() + shared

    def extra_repr(self) -> str:
        o = self.options
        return (
            f"d_model={self.d_model}, n_experts={o.n_experts}, top_k={o.top_k}, "
            f"n_shared={o.n_shared}, hidden={self.hidden}, ep_size={o.ep_size}"
        )
