"""A run's checkpoint, of any layout, leaving the project: one safetensors file that
`Leviathan.from_export` loads (`export.safetensors`), or a Hugging Face folder that
transformers loads without this package (`export.hf`)."""

from leviathan.export.hf import HF_EXPORT, export_hf
from leviathan.export.safetensors import EXPORT, checked_state, export_run, read_export

__all__ = ["EXPORT", "HF_EXPORT", "checked_state", "export_hf", "export_run", "read_export"]
