"""The sparse MoE FFN layer, in Megatron-core's stages: route, dispatch, experts, combine.

The router picks each token's experts, `dispatch.plan` sorts the assignments by expert,
and a dispatcher takes the rows through their experts and back, gate-weighted and
summed per token; shared experts are added un-gated.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn

from moe import balance, dispatch
from moe.dispatch import Dispatcher, LocalDispatch
from moe.experts import MLP, Experts
from moe.options import MoEOptions, check_options
from moe.parallel import AllToAllDispatch
from moe.router import Router, Routing
from moe.stats import RoutingStats

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


class MoE(nn.Module):
    """Sparse Mixture-of-Experts FFN: each token gets the gated sum of its top-k experts.

    forward(x (..., d)) -> (..., d) and sets `self.aux_loss`, the scalar to add to the
    training loss (aux_coef * Switch loss when balance == "aux", plus z_coef * z-loss).
    Expert width is round(expert_hidden_mult * d_model); `n_shared` shared experts of that
    width see every token and are added un-gated.

    The layer is built whole, all experts local: how experts are laid out over ranks is
    not part of the model. `shard_experts(group)` then splits them over the ranks of an
    expert-parallel group (every rank must have built the layer from the same torch seed).

    `balance_group`: the ranks that hold replicas of this router and share its batch
    (data and expert parallel); `update_bias` sums the loss-free load over them, so the
    replicated bias moves alike everywhere by the global batch. None (the default): this
    process alone. Unless the experts are sharded or a balance group is set, the layer
    never touches torch.distributed.
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
        # Same RNG draw order whatever the later layout: router, all experts, shared experts.
        self.router = Router(d_model, o.n_experts, o.score, o.top_k, o.renormalize, o.jitter)
        h, act = self.hidden, o.activation
        self.experts = Experts(o.n_experts, d_model, h, act, bias, matmul=o.expert_matmul)
        self.shared = MLP(d_model, o.n_shared * h, act, bias) if o.n_shared else None
        self.dropout = nn.Dropout(dropout)
        self.dispatcher: Dispatcher = LocalDispatch()  # shard_experts swaps it
        self.balance_group: ProcessGroup | None = None
        # Bookkeeping lives on the CPU, named (zero.Init sends unnamed tensors to the GPU):
        # the split sizes cross to the host every forward anyway, and the counts ride along.
        self.aux_loss = torch.zeros((), device="cpu")
        self._stats = RoutingStats.empty(o.n_experts)
        self._bias_load = torch.zeros(o.n_experts, dtype=torch.long, device="cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., T, d), a batch of sequences of T positions ((T, d): one sequence)."""
        shape = x.shape
        seq_len = shape[-2] if x.dim() > 2 else shape[0]
        x = x.reshape(-1, self.d_model)
        r = self.router(x)  # route
        cap, group = self._capacity(x.shape[0], seq_len)
        p = dispatch.plan(r.indices, self.options.n_experts, cap, group)  # kept rows, by expert
        out = self.dispatcher(x, r.gates, p, self.experts)  # dispatch, experts, combine
        if self.shared is not None:
            out = out + self.shared(x)
        self.aux_loss = self._balance_losses(r, p, seq_len)
        return self.dropout(out).reshape(shape)

    def shard_experts(self, group: ProcessGroup) -> None:
        """Keep this rank's share of the experts, split evenly over the ranks of `group`
        (which hold the rest); the forward then sends each row to the rank of its expert."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("shard_experts: the expert group needs torch.distributed initialised")
        ep_size, n_experts = dist.get_world_size(group), self.options.n_experts
        if n_experts % ep_size:
            raise ValueError(
                f"n_experts: {n_experts} is not divisible by the expert group's {ep_size} ranks"
            )
        self.experts.shard(ep_size, dist.get_rank(group))
        self.dispatcher = AllToAllDispatch(group)

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
        """The loss terms; a training forward is also counted in the routing statistics
        and, for loss-free balancing, in the load the next bias update follows."""
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
            self._stats = self._stats.add(r, p, probs, seq_len, aux, z)
            if o.balance == "loss_free":
                self._bias_load += p.routed
        return total

    def pop_metrics(self) -> dict[str, float | list[int]]:
        """Statistics of the training forwards since the last call, then reset ({} if none).

        load: routed assignments per expert (summed over the forwards, this rank's tokens);
        imbalance: max/mean of load; load_cv: std/mean (population std); dropped_frac:
        dropped / routed assignments; dropped_frac_by_position (capacity mode): the dropped
        fraction in each of up to `moe.stats.POSITION_BINS` equal spans of the sequence,
        first to last; router_entropy: mean over tokens of the entropy (nats) of the
        normalised scores; aux_loss, z_loss: raw (uncoefficiented) values averaged over
        the forwards; bias_norm: L2 norm of the loss-free bias (balance: loss_free).
        """
        out = self._stats.summary()
        if out and self.options.balance == "loss_free":
            out["bias_norm"] = self.router.bias.norm().item()
        self._stats = RoutingStats.empty(self.options.n_experts)
        return out

    @torch.no_grad()
    def update_bias(self) -> None:
        """Loss-free balancing step from the load routed since the last call (call it after
        each optimizer step; a no-op unless balance == "loss_free").

        The load is first summed over `balance_group` (when set), so every replica of the
        router applies the same update, from the load of the batch they share.
        """
        o = self.options
        if o.balance != "loss_free":
            return
        load = self._bias_load.to(self.router.bias.device, torch.float64)
        if self.balance_group is not None:
            import torch.distributed as dist

            dist.all_reduce(load, group=self.balance_group)
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

        Total parameters are sum(p.numel()); once `shard_experts` has split the experts,
        that sum is this rank's share.
        """
        shared = 0 if self.shared is None else sum(p.numel() for p in self.shared.parameters())
        return self.router.weight.numel() + self.options.top_k * self._expert_params() + shared

    def extra_repr(self) -> str:
        o = self.options
        return (
            f"d_model={self.d_model}, n_experts={o.n_experts}, top_k={o.top_k}, "
            f"n_shared={o.n_shared}, hidden={self.hidden}"
        )
