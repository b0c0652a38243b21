"""The model: mixers and FFNs by name, assembled into a GPT-style decoder."""

from leviathan.model.ffn import FFNS
from leviathan.model.gpt import Leviathan
from leviathan.model.mixers import MIXERS

__all__ = ["FFNS", "MIXERS", "Leviathan"]
