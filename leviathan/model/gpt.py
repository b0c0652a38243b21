"""The Leviathan decoder: GPT-2 with a pluggable token mixer and FFN per block.

Positions are learned absolute embeddings by default (`model.positions: learned`): q and
k stay pure content signals, every mixer's score is exactly the lagged inner product
docs/design.md (Mixers) defines, and token_xcorr at its delta kernel is the `dot` baseline
(bit for bit at rank 1). `model.positions: rope` rotates q and k in each mixer instead
(`leviathan.model.rope`; token_xcorr rotates before its lag filter, so its scores stay
relative); channel_xcorr refuses it, since its circulant would mix channels of different
rotation frequencies. `model.positions: none` adds no position at all: for mixers whose
causal lags already see relative order (involution, dconv), or NoPE experiments.
`model.norm: rmsnorm` swaps every LayerNorm for RMSNorm: with `swiglu` FFNs, the
"Transformer++" of the Mamba and Hyena papers.

Generation is cached (`generate`, `forward(idx, cache=...)`, `leviathan.model.cache`):
the prompt runs once, then each new token is one position's work against the cached keys.
The uncached loop stays, as the oracle and for what the cache cannot serve.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from leviathan.errors import CheckpointError
from leviathan.model.cache import KVCache, LayerCache
from leviathan.model.config import ModelConfig
from leviathan.model.ffn import FFN, FFNS, layer_ffn_options
from leviathan.model.mixers import MIXERS

if TYPE_CHECKING:
    from collections.abc import Mapping

Gather = Callable[[list[nn.Parameter]], contextlib.AbstractContextManager]


def make_norm(cfg: ModelConfig) -> nn.Module:
    """`model.norm`: LayerNorm (GPT-2) or RMSNorm (scale only, no centring)."""
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=1e-5)
    return nn.LayerNorm(cfg.d_model, bias=cfg.bias)


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        ffn = layer_ffn_options(cfg.ffn, layer)
        self.norm1 = make_norm(cfg)
        mixer = MIXERS[cfg.mixer.kind]
        self.mixer = mixer(
            cfg.d_model,
            cfg.n_head,
            mixer.for_layer(cfg.mixer, layer),
            dropout=cfg.dropout,
            bias=cfg.bias,
            rope=cfg.positions == "rope",
        )
        self.norm2 = make_norm(cfg)
        self.ffn = FFNS[ffn.kind](cfg.d_model, ffn, dropout=cfg.dropout, bias=cfg.bias)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x), cache)
        return x + self.ffn(self.norm2(x))


class Leviathan(nn.Module):
    """The decoder, whole: it knows no ranks (`leviathan.parallel.expert_sharding` splits
    its experts over them after construction)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be set (from the tokenizer) to build")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # rope: the mixers rotate q and k; rope and none: the residual stream has no position
        self.pos_emb = (
            nn.Embedding(cfg.block_size, cfg.d_model) if cfg.positions == "learned" else None
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # tied input and output embeddings
        init_parameters(self)

    @classmethod
    def from_export(cls, path: str | os.PathLike) -> Leviathan:
        """The model of a `leviathan export` file (model.safetensors), in eval mode: every
        weight loaded strictly, the tied head restored from the token embedding."""
        state, config, _ = read_export(path)
        try:
            model = cls(model_config(config["model"]))
            model.load_state_dict(state)
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(
                f"{path}: not this version's model: {' '.join(str(err).split())}"
            ) from None
        return model.eval()

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) and, given targets, the mean next-token cross-entropy.

        With a cache (`new_cache`), idx holds the T positions after the `cache.length`
        cached ones, and their keys join the cache.
        """
        T = idx.shape[1]
        start = 0 if cache is None else cache.length
        if start + T > self.cfg.block_size:
            raise ValueError(
                f"sequence of {start + T} tokens is longer than the model's positions "
                f"(block_size={self.cfg.block_size})"
            )
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + T, device=idx.device))
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache.layers[i])
        logits = self.head(self.norm(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss

    def sparse_layers(self) -> list[FFN]:
        """The FFNs that route tokens (they carry auxiliary losses, metrics and state)."""
        return [b.ffn for b in self.blocks if b.ffn.sparse]

    def aux_loss(self) -> torch.Tensor:
        """Sum of the routers' balance losses from the last forward; the loop adds it."""
        losses = [ffn.aux_loss for ffn in self.sparse_layers()]
        return sum(losses) if losses else torch.zeros((), device=self.tok_emb.weight.device)

    def after_optimizer_step(self) -> None:
        """State that moves outside the gradient: the loss-free routers' biases."""
        for ffn in self.sparse_layers():
            ffn.after_optimizer_step()

    def pop_layer_metrics(self) -> dict[str, dict]:
        """Routing statistics per sparse block (keyed `layer{i}`) since the last call."""
        return {f"layer{i}": b.ffn.pop_metrics() for i, b in enumerate(self.blocks) if b.ffn.sparse}

    def set_reference(self, reference: bool) -> None:
        """Switch every mixer to its materialised-score path (for tests) or back."""
        for block in self.blocks:
            block.mixer.reference = reference

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, counting the tied head once; optionally without the embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(e.weight.numel() for e in (self.tok_emb, self.pos_emb) if e is not None)
        return n

    def active_params(self) -> int:
        """Parameters one token passes through: the routed FFNs count only their top-k
        experts (and router and shared experts)."""
        inactive = sum(
            sum(p.numel() for p in ffn.parameters()) - ffn.active_params()
            for ffn in self.sparse_layers()
        )
        return self.num_params() - inactive

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Active forward FLOPs per token at `seq_len` (default block_size); training: 3x."""
        seq_len = seq_len or self.cfg.block_size
        per_block = sum(
            b.mixer.flops_per_token(seq_len) + b.ffn.flops_per_token() for b in self.blocks
        )
        return per_block + 2 * self.cfg.d_model * self.cfg.vocab_size

    def new_cache(self) -> KVCache:
        """An empty key-value cache for one batch of sequences, block_size positions long."""
        return KVCache(len(self.blocks), self.cfg.block_size)

    def can_cache(self) -> bool:
        """False when some FFN's output for a token depends on earlier tokens: an MoE with
        capacity_factor set fills expert slots per sequence in position order (policy
        "sequence", or across the batch with "batch"), which a one-token step cannot see.
        Dropless MoE routes each token alone, like a dense FFN, and is cached."""
        return all(
            getattr(ffn.options, "capacity_factor", None) is None for ffn in self.sparse_layers()
        )

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        *,
        use_cache: bool = True,
        context_keep: int | None = None,
        compiled: bool = False,
    ) -> torch.Tensor:
        """Append `max_new_tokens` sampled tokens to `prompt` (B, T); temperature 0 is greedy.

        The model sees at most block_size tokens (its positions). When the context would
        grow past that it is cut to its last `context_keep` tokens (default block_size:
        a sliding window that drops one token per step; a longer prompt is first cut to
        block_size).

        use_cache (the default where `can_cache`; capacity-mode MoE always falls back to
        the uncached loop): the context runs once (prefill) and each new token is one
        position against the cached keys, O(T) instead of a whole forward, O(T^2). Every
        cut moves all positions, so the cache is refilled from the cut context: with the
        sliding window that is every step past block_size (exact, no faster than
        uncached there); `context_keep=block_size // 2` refills once per block_size // 2
        tokens. Both paths give the same tokens and logits for any `context_keep`
        (use_cache=False is the oracle the tests hold the cache to).

        compiled: the cached one-token steps run under `torch.compile` with automatic
        dynamic shapes: a few graphs whatever the length (the first static, then one with
        the cache length symbolic), no graph breaks; prefills and the uncached loop stay
        eager. A step then sheds most of its eager Python overhead, but the first compile
        takes tens of seconds on a CPU: worth it for long or repeated generation
        (benchmarks/generate.py has the figures).
        """
        block = self.cfg.block_size
        keep = block if context_keep is None else context_keep
        if not 1 <= keep <= block:
            raise ValueError(f"context_keep: must be between 1 and block_size={block}, got {keep}")
        use_cache = use_cache and self.can_cache()
        step = torch.compile(self) if compiled and use_cache else self
        idx, start, cache = prompt, max(0, prompt.shape[1] - block), None
        for _ in range(max_new_tokens):
            if idx.shape[1] - start > block:  # the context idx[:, start:] is full: cut it
                start, cache = idx.shape[1] - keep, None
            if not use_cache:
                logits, _ = self(idx[:, start:])
            elif cache is None:  # prefill the whole context
                cache = self.new_cache()
                logits, _ = self(idx[:, start:], cache=cache)
            else:  # only the token sampled last, copied: a compiled step guards on strides
                last = idx[:, -1:].clone(memory_format=torch.contiguous_format)
                logits, _ = step(last, cache=cache)
            nxt = next_token(logits[:, -1, :], temperature, top_k, generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx


def model_config(raw: Mapping[str, Any]) -> ModelConfig:
    """The `ModelConfig` of a config's `model:` mapping as a run's config.json holds it (the
    mixer and FFN options by their `kind`); the older `ffn.ep_size` is a layout, dropped."""
    mixer = dict(raw["mixer"])
    ffn = {k: v for k, v in raw["ffn"].items() if k != "ep_size"}
    mixer_options = MIXERS[mixer["kind"]].Options(**mixer)
    ffn_options = FFNS[ffn["kind"]].Options(**ffn)
    return ModelConfig(**{**raw, "mixer": mixer_options, "ffn": ffn_options})


def read_export(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict, int]:
    """(state dict with the tied head restored, config dict, step) of an exported file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        config, step = json.loads(metadata["config"]), int(metadata["step"])
    except (OSError, SafetensorError, KeyError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable Leviathan export ({err!r})") from err
    state["head.weight"] = state["tok_emb.weight"]
    return state, config, step


def next_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, V) logits -> (B, 1) token ids: argmax at temperature 0, else sampled from the
    softmax of logits / temperature, restricted to the top_k when given."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def init_parameters(model: Leviathan, gathered: Gather = contextlib.nullcontext) -> None:
    """GPT-2 init, one module at a time in `nn.Module.apply` order (children first): the
    same draws from the torch RNG whether the model is whole or, built under ZeRO-3's
    `zero.Init`, sharded, where `gathered(params)` makes one module's parameters whole
    while they are set. The projections that write into the residual stream (attention
    and FFN outputs, experts' output weights included) start 1/sqrt(2 L) smaller.
    """
    scale = 1 / math.sqrt(2 * model.cfg.n_layer)
    residual = {
        id(p)
        for b in model.blocks
        for p in b.mixer.residual_projections() + b.ffn.residual_projections()
    }
    for module in children_first(model):
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        with gathered(own), torch.no_grad():
            init_weights(module)
            for p in own:
                if id(p) in residual:
                    p.mul_(scale)


def children_first(module: nn.Module) -> Iterator[nn.Module]:
    """The modules in the order `module.apply` visits them."""
    for child in module.children():
        yield from children_first(child)
    yield module


def init_weights(module: nn.Module) -> None:
    """GPT-2 init: N(0, 0.02) for linear and embedding weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
