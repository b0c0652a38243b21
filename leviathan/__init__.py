"""Leviathan: language models where cross-correlation replaces dot-product attention."""
