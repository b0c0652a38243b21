"""Leviathan as a transformers causal LM: `AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)` on a `leviathan export --format hf` folder.

The model inside is the package's own `Leviathan`, run as is, so its logits are the
native model's. Generation goes through the model's own key-value cache: `generate`
hands the `cache` a forward returned back to the next one, and asks it only how many
positions it holds (`LeviathanCache.get_seq_length`). A capacity-mode MoE cannot be
cached (a token's expert slot depends on the tokens before it); its export says
`use_cache: false` in generation_config.json, and generate then runs uncached.

Copied into each HF export with its imports made relative: it must run where neither
`leviathan` nor `moe` can be imported.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from leviathan.hf.configuration_leviathan import LeviathanConfig
from leviathan.model.cache import KVCache
from leviathan.model.gpt import Leviathan, init_weights, model_config

# forward's options that change nothing here (transformers' standard ones)
IGNORED = ("return_dict", "output_attentions", "output_hidden_states", "position_ids")


class LeviathanCache(KVCache):
    """The model's own KVCache, behind transformers' `cache` argument."""

    is_compileable = False  # generate does not compile its steps around it
    is_croppable = False

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions cached: what generate asks to slice the next input."""
        return self.length


class LeviathanForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = LeviathanConfig
    base_model_prefix = "model"
    _tied_weights_keys = {"model.head.weight": "model.tok_emb.weight"}
    _no_split_modules = ["Block"]

    def __init__(self, config: LeviathanConfig) -> None:
        super().__init__(config)
        self.model = Leviathan(model_config(config.leviathan))
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        init_weights(module)  # GPT-2's, as the native model starts (weights then load)

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.model.tok_emb

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.model.head

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate must not make a DynamicCache: forward makes its own

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        cache: LeviathanCache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits of the positions in input_ids (after the `cache.length` cached ones).

        `use_cache=True` (generate's) starts a cache when none is given and returns it; a
        plain call computes without one, as the native forward does. Left or inner padding
        in `attention_mask` would shift positions and is refused; right padding is harmless
        (causal) and allowed.
        """
        unknown = sorted(k for k, v in kwargs.items() if k not in IGNORED and v is not None)
        if unknown:
            raise TypeError(f"LeviathanForCausalLM.forward: unsupported {', '.join(unknown)}")
        check_padding(attention_mask)
        if cache is not None and not isinstance(cache, LeviathanCache):
            raise TypeError(f"cache: expected a LeviathanCache, got {type(cache).__name__}")
        if use_cache and cache is None:
            cache = self.new_cache()
        logits, _ = self.model(input_ids, cache=cache)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    def new_cache(self) -> LeviathanCache:
        """An empty cache, block_size positions long; refused where the model cannot cache."""
        if not self.model.can_cache():
            raise ValueError(
                "this model's MoE fills expert slots per sequence (capacity_factor), which a "
                "cache cannot serve: generate with use_cache=False"
            )
        return LeviathanCache(len(self.model.blocks), self.model.cfg.block_size)


def check_padding(attention_mask: torch.Tensor | None) -> None:
    """Refuse a mask with a 0 before a 1 in some row: such a row's tokens would sit at other
    positions than the model gives them."""
    if attention_mask is None:
        return
    mask = attention_mask.bool()
    if (~mask[:, :-1] & mask[:, 1:]).any():
        raise ValueError(
            "attention_mask: left or inner padding is not supported (positions would "
            "shift); pad on the right, or pass sequences of one length"
        )
