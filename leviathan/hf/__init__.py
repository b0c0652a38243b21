"""Leviathan for transformers: the config and causal-LM classes an HF export runs
(`configuration_leviathan`, `modeling_leviathan`, copied into the folder by `leviathan
export --format hf`) and the SentencePiece to `tokenizer.json` conversion (`tokenizer`).
Each needs the `hf` extra; nothing here is imported unless asked for."""
