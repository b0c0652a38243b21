"""The transformers config of an exported Leviathan: the run's `model:` mapping, kept whole
(the model is built from it), and the standard names tools read, derived from it
(`max_position_embeddings` is the context length lm-evaluation-harness windows by).

Copied into each HF export with its imports made relative: it must run where neither
`leviathan` nor `moe` can be imported.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig


class LeviathanConfig(PreTrainedConfig):
    model_type = "leviathan"

    leviathan: dict[str, Any] | None = None  # a run's config.json `model:` section
    tie_word_embeddings: bool = True  # the output head is the token embedding
    use_cache: bool = True
    eos_token_id: int | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        model = self.leviathan or {}
        self.vocab_size = model.get("vocab_size")
        self.max_position_embeddings = model.get("block_size")
        self.hidden_size = model.get("d_model")
        self.num_hidden_layers = model.get("n_layer")
        self.num_attention_heads = model.get("n_head")
        super().__post_init__(**kwargs)
